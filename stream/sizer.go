package stream

import (
	"errors"
	"fmt"
)

// VMDescSizer returns a DeviceSizer that measures FULL section bodies with the vmdesc JSON found
// at the end of the stream (design.md: device sections are not self-delimiting). The JSON is
// parsed once per Reader; a device is matched by its position in the "devices" array and, when
// that entry does not fit, by idstr and instance id. Without a usable JSON it fails, and the
// Reader falls back to footer scanning with a warning. Use one sizer per Reader.
func VMDescSizer() DeviceSizer {
	var (
		from []byte
		desc *VMDesc
		perr error
	)
	return func(dev DeviceRef, body []byte) (int, error) {
		if len(dev.VMDesc) == 0 {
			return 0, errors.New("no vmdesc")
		}
		if len(from) != len(dev.VMDesc) || &from[0] != &dev.VMDesc[0] {
			from = dev.VMDesc
			desc, perr = ParseVMDesc(dev.VMDesc)
		}
		if perr != nil {
			return 0, perr
		}
		var d *VMDescDevice
		if dev.Index < len(desc.Devices) && desc.Devices[dev.Index].Name == dev.Idstr && desc.Devices[dev.Index].InstanceID == dev.InstanceID {
			d = &desc.Devices[dev.Index]
		} else if d = desc.Device(dev.Idstr, dev.InstanceID); d == nil {
			return 0, fmt.Errorf("device %q instance %d is not in the vmdesc", dev.Idstr, dev.InstanceID)
		}
		return d.BodySize(body)
	}
}
