package stream

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// TestVMStateReal walks every device section of every real stream with its vmdesc entry: the
// consumed length and BodySize equal the real distance to the footer, and re-encoding is
// byte-identical.
func TestVMStateReal(t *testing.T) {
	for _, s := range vmdescTestLoad(t) {
		t.Run(s.name, func(t *testing.T) {
			for k, sec := range s.sections {
				dev := &s.desc.Devices[k]
				want := sec.bodyEnd - sec.bodyStart
				rest := s.data[sec.bodyStart:]
				n, err := dev.BodySize(rest)
				if err != nil || n != want {
					t.Errorf("%s/%d: BodySize = %d, %v; want %d", dev.Name, dev.InstanceID, n, err, want)
					continue
				}
				root, n2, err := DecodeVMState(rest, dev, &VMStateOptions{BaseOffset: int64(sec.bodyStart), SectionID: sec.id})
				if err != nil || n2 != want {
					t.Errorf("%s: DecodeVMState = %d, %v; want %d", dev.Name, n2, err, want)
					continue
				}
				if root.Offset != int64(sec.bodyStart) || root.Size != want {
					t.Errorf("%s: root offset/size %d/%d", dev.Name, root.Offset, root.Size)
				}
				body := s.data[sec.bodyStart:sec.bodyEnd]
				if enc := EncodeVMState(root, nil); !bytes.Equal(enc, body) {
					t.Errorf("%s: re-encoding differs (%d vs %d bytes)", dev.Name, len(enc), len(body))
				}
				// Exact body without footer decodes too.
				if _, n3, err := DecodeVMState(body, dev, nil); err != nil || n3 != want {
					t.Errorf("%s: exact body: %d, %v", dev.Name, n3, err)
				}
				vmstateTestCheckOffsets(t, root, s.data)
			}
			vmstateTestSemantics(t, s)
		})
	}
}

// vmstateTestCheckOffsets checks that every leaf's Offset points at its Raw bytes in the stream.
func vmstateTestCheckOffsets(t *testing.T, n *Node, data []byte) {
	if n.Raw != nil && !bytes.Equal(data[n.Offset:n.Offset+int64(len(n.Raw))], n.Raw) {
		t.Errorf("%s: offset %d does not hold its bytes", n.Name, n.Offset)
	}
	for _, c := range n.Children {
		vmstateTestCheckOffsets(t, c, data)
	}
}

func vmstateTestDecode(t *testing.T, s *vmdescTestStream, name string) *Node {
	for k, sec := range s.sections {
		if s.desc.Devices[k].Name == name {
			root, _, err := DecodeVMState(s.data[sec.bodyStart:], &s.desc.Devices[k], nil)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			return root
		}
	}
	return nil
}

func vmstateTestSemantics(t *testing.T, s *vmdescTestStream) {
	gs := vmstateTestDecode(t, s, "globalstate")
	if gs == nil {
		t.Fatalf("no globalstate")
	}
	size := gs.Child("size")
	rs := gs.Child("runstate")
	if size == nil || rs == nil {
		t.Fatalf("globalstate children: %v", gs.Children)
	}
	if v, err := size.Uint(); err != nil || v != uint64(len("running")+1) {
		// Other captures may legitimately be in another state; only check consistency.
		if err != nil || int(v) > len(rs.Raw) {
			t.Errorf("globalstate size = %d, %v", v, err)
		}
	}
	state := string(bytes.TrimRight(rs.Raw[:min(len(rs.Raw), 32)], "\x00"))
	if !strings.HasPrefix(s.name, "idle") || state != "running" {
		if state == "" {
			t.Errorf("globalstate runstate empty")
		}
	} else if state != "running" {
		t.Errorf("runstate %q", state)
	}
	if kc := vmstateTestDecode(t, s, "kvmclock"); kc != nil {
		if _, err := kc.Child("clock").Uint(); err != nil {
			t.Errorf("kvmclock clock: %v", err)
		}
		if rel := kc.Lookup("kvmclock/clock_is_reliable", "clock_is_reliable"); rel != nil {
			if _, err := rel.Bool(); err != nil {
				t.Errorf("clock_is_reliable: %v", err)
			}
		}
	}
	// PCI devices: "int32 le" version_id of the PCIDevice struct reads as 2.
	if lpc := vmstateTestDecode(t, s, "0000:00:1f.0/ICH9LPC"); lpc != nil {
		if v, err := lpc.Lookup("d", "version_id").Int(); err != nil || v != 2 {
			t.Errorf("ICH9LPC d.version_id = %d, %v", v, err)
		}
	}
}

// vmstateTestKvmclock is the kvmclock section body of stream-format.md §5 (7.2, KVM) and a
// matching vmdesc entry.
var (
	vmstateTestKvmclockBody = []byte("\x00\x00\x00\x00\x4b\xc6\x99\xa5\x05\x1akvmclock/clock_is_reliable\x00\x00\x00\x01\x01")
	vmstateTestDescJSON     = `{"page_size": 4096, "devices": [
{"name": "kvmclock", "instance_id": 0, "vmsd_name": "kvmclock", "version": 1, "fields": [{"name": "clock", "type": "uint64", "size": 8}], "subsections": [{"vmsd_name": "kvmclock/clock_is_reliable", "version": 1, "fields": [{"name": "clock_is_reliable", "type": "bool", "size": 1}]}]},
{"name": "mix", "instance_id": 0, "vmsd_name": "mix", "version": 3, "fields": [
  {"name": "i8", "type": "int8", "size": 1}, {"name": "i16", "type": "int16", "size": 2},
  {"name": "eq", "type": "int32 equal", "size": 4}, {"name": "le", "type": "int32 le", "size": 4},
  {"name": "u64eq", "type": "int64 equal", "size": 8}, {"name": "tm", "type": "timer", "size": 8},
  {"name": "arr", "array_len": 3, "type": "uint16", "size": 2},
  {"name": "ptr", "index": 0, "type": "uint32", "size": 1},
  {"name": "ptr", "index": 1, "type": "nullptr", "size": 1},
  {"name": "t", "type": "tmp", "vmsd_name": "tt", "version": 0, "fields": [{"name": "x", "type": "uint8", "size": 1}], "size": 3},
  {"name": "s", "array_len": 2, "type": "struct", "struct": {"vmsd_name": "st", "version": 1, "fields": [{"name": "a", "type": "uint8", "size": 1}, {"name": "b", "type": "buffer", "size": 40}]}, "size": 41},
  {"name": "n", "type": "struct", "struct": {"vmsd_name": "nest", "version": 2, "fields": [{"name": "c", "type": "bool", "size": 1}], "subsections": [{"vmsd_name": "nest/sub", "version": 7, "fields": [{"name": "d", "type": "uint8", "size": 1}]}]}, "size": 16}]},
{"name": "old", "instance_id": 0, "vmsd_name": "old", "version": 1, "size": 4, "fields": [{"name": "data", "size": 4, "type": "buffer"}]}
]}`
)

func vmstateTestMixBody() []byte {
	var b []byte
	b = append(b, 0xff)                                           // i8 = -1
	b = append(b, 0x80, 0x00)                                     // i16 = -32768
	b = append(b, 0xff, 0xff, 0xff, 0xfe)                         // eq = -2
	b = append(b, 0, 0, 0, 2)                                     // le = 2
	b = append(b, 0xff, 0, 0, 0, 0, 0, 0, 1)                      // u64eq (unsigned)
	b = append(b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff) // timer not armed
	b = append(b, 0, 1, 0, 2, 0, 3)                               // arr
	b = append(b, 0x30)                                           // ptr[0]: 7.2 NULL placeholder typed uint32
	b = append(b, 0x30)                                           // ptr[1]: nullptr
	b = append(b, 1, 2, 3)                                        // tmp
	for i := 0; i < 2; i++ {
		b = append(b, byte(i))
		b = append(b, bytes.Repeat([]byte{byte(0xa0 + i)}, 40)...)
	}
	b = append(b, 1)                                                              // n.c
	b = append(b, 0x05, 8, 'n', 'e', 's', 't', '/', 's', 'u', 'b', 0, 0, 0, 7, 9) // n/sub
	return b
}

func vmstateTestDesc(t testing.TB) *VMDesc {
	d, err := ParseVMDesc([]byte(vmstateTestDescJSON))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestVMStateSmall(t *testing.T) {
	d := vmstateTestDesc(t)
	// kvmclock as in the spec example, followed by its footer.
	body := append(append([]byte(nil), vmstateTestKvmclockBody...), 0x7e, 0, 0, 0, 8)
	root, n, err := DecodeVMState(body, &d.Devices[0], nil)
	if err != nil || n != len(vmstateTestKvmclockBody) {
		t.Fatalf("kvmclock: %d, %v", n, err)
	}
	if v, err := root.Child("clock").Uint(); err != nil || v != 0x4bc699a5 {
		t.Errorf("clock = %x, %v", v, err)
	}
	rel := root.Lookup("kvmclock/clock_is_reliable", "clock_is_reliable")
	if b, err := rel.Bool(); err != nil || !b {
		t.Errorf("clock_is_reliable = %v, %v", b, err)
	}
	if !root.Child("kvmclock/clock_is_reliable").Subsection {
		t.Errorf("subsection flag missing")
	}

	mix := vmstateTestMixBody()
	root, n, err = DecodeVMState(mix, &d.Devices[1], nil)
	if err != nil || n != len(mix) {
		t.Fatalf("mix: %d, %v", n, err)
	}
	if !bytes.Equal(EncodeVMState(root, nil), mix) {
		t.Errorf("mix re-encoding differs")
	}
	ints := map[string]int64{"i8": -1, "i16": -32768, "eq": -2, "le": 2, "tm": -1}
	for name, want := range ints {
		if v, err := root.Child(name).Int(); err != nil || v != want {
			t.Errorf("%s = %d, %v; want %d", name, v, err, want)
		}
	}
	if v, err := root.Child("u64eq").Uint(); err != nil || v != 0xff00000000000001 {
		t.Errorf("u64eq = %x, %v", v, err)
	}
	if _, err := root.Child("u64eq").Int(); err == nil {
		t.Errorf("u64eq Int should overflow")
	}
	var arr []uint64
	for _, c := range root.Children {
		if c.Name == "arr" {
			v, _ := c.Uint()
			arr = append(arr, v)
			if c.Index != len(arr)-1 {
				t.Errorf("arr index %d", c.Index)
			}
		}
	}
	if len(arr) != 3 || arr[2] != 3 {
		t.Errorf("arr = %v", arr)
	}
	p0 := root.Children[9]
	if p0.Name != "ptr" || !p0.Opaque || p0.Index != 0 {
		t.Errorf("7.2 nullptr element = %+v", p0)
	}
	if _, err := p0.Uint(); err == nil {
		t.Errorf("opaque uint32 of 1 byte should not read as integer")
	}
	if tm := root.Child("t"); !tm.Opaque || len(tm.Raw) != 3 {
		t.Errorf("tmp = %+v", tm)
	}
	if s1 := root.Children[13]; s1.Name != "s" || s1.Index != 1 || s1.VMSD != "st" || s1.Size != 41 || len(s1.Children) != 2 {
		t.Errorf("s[1] = %+v", s1)
	}
	if d := root.Lookup("n", "nest/sub", "d"); d == nil {
		t.Errorf("nested subsection missing")
	} else if v, _ := d.Uint(); v != 9 {
		t.Errorf("nest/sub d = %d", v)
	}

	var out strings.Builder
	if err := Format(&out, root); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"mix (vmsd mix v3, ",
		"  i8 int8 = -1 (0xff)\n",
		"  tm timer = -1 (not armed)\n",
		"  arr[2] uint16 = 3 (0x0003)\n",
		"  ptr[0] uint32 = 30 (opaque 1 bytes)\n",
		"  ptr[1] nullptr = 30 (1 bytes)\n",
		"  s[1] struct st v1 (41 bytes)\n",
		"    b buffer = a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1… (40 bytes)\n",
		"    subsection nest/sub v7 (15 bytes)\n",
		"      d uint8 = 9 (0x09)\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("Format output lacks %q:\n%s", want, out.String())
		}
	}

	// Old-style: object-level size must match.
	old := []byte{1, 2, 3, 4}
	root, n, err = DecodeVMState(old, &d.Devices[2], nil)
	if err != nil || n != 4 || !root.Children[0].Opaque {
		t.Errorf("old-style: %v %d %v", root, n, err)
	}
	bad := d.Devices[2]
	bad.VMSD.Size = 5
	if _, err := bad.BodySize(old); !errors.Is(err, ErrVMDescMismatch) {
		t.Errorf("old-style size mismatch: %v", err)
	}
}

func vmstateTestWantErr(t *testing.T, what string, err error, sentinel error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || !errors.Is(err, sentinel) {
		t.Errorf("%s: got %v, want *Error wrapping %v", what, err, sentinel)
		return
	}
	if !e.InSection {
		t.Errorf("%s: InSection not set", what)
	}
}

func TestVMStateErrors(t *testing.T) {
	d := vmstateTestDesc(t)
	kvm := &d.Devices[0]
	body := append([]byte(nil), vmstateTestKvmclockBody...)

	for n := 0; n < len(body); n++ {
		_, err := kvm.BodySize(body[:n])
		vmstateTestWantErr(t, "truncated", err, ErrUnexpectedEOF)
	}
	// Wrong subsection marker / name / version.
	for _, c := range []struct {
		at  int
		val byte
	}{{8, 0x06}, {9, 0x19}, {12, 'X'}, {39, 2}} {
		b := append([]byte(nil), body...)
		b[c.at] = c.val
		_, _, err := DecodeVMState(b, kvm, &VMStateOptions{BaseOffset: 100, SectionID: 8})
		vmstateTestWantErr(t, "corrupt subsection", err, ErrVMDescMismatch)
		var e *Error
		if errors.As(err, &e) && (e.Offset < 108 || e.Idstr != "kvmclock" || e.SectionID != 8) {
			t.Errorf("error location %+v", e)
		}
	}
	// Not followed by a footer.
	_, err := kvm.BodySize(append(append([]byte(nil), body...), 0x00))
	vmstateTestWantErr(t, "no footer", err, ErrVMDescMismatch)
	if _, _, err := DecodeVMState(append(append([]byte(nil), body...), 0x00), kvm, &VMStateOptions{NoFooterCheck: true}); err != nil {
		t.Errorf("NoFooterCheck: %v", err)
	}
	// Undescribed subsection: description without the subsection.
	noSub := *kvm
	noSub.VMSD.Subsections = nil
	_, err = noSub.BodySize(body)
	vmstateTestWantErr(t, "undescribed subsection", err, ErrVMDescMismatch)
	// Wrong field size.
	wrong := *kvm
	wrong.VMSD.Fields = []VMDescField{{Name: "clock", Type: "uint64", Size: 7, Index: -1}}
	_, err = wrong.BodySize(body)
	vmstateTestWantErr(t, "wrong size", err, ErrVMDescMismatch)
	// Struct whose recorded size disagrees with its fields.
	st := VMDescDevice{Name: "s", VMSD: VMSD{Name: "s", Size: -1, Fields: []VMDescField{
		{Name: "x", Type: "struct", Size: 3, Index: -1, Struct: &VMSD{Name: "in", Size: -1, Fields: []VMDescField{{Name: "a", Type: "uint16", Size: 2, Index: -1}}}}}}}
	_, err = st.BodySize([]byte{1, 2, 3})
	vmstateTestWantErr(t, "struct size", err, ErrVMDescMismatch)
	// Field without size.
	nos := VMDescDevice{Name: "n", VMSD: VMSD{Name: "n", Size: -1, Fields: []VMDescField{{Name: "a", Type: "uint8", Size: -1, Index: -1}}}}
	_, err = nos.BodySize([]byte{1})
	vmstateTestWantErr(t, "no size", err, ErrVMDescMismatch)
	// nullptr byte wrong.
	np := VMDescDevice{Name: "n", VMSD: VMSD{Name: "n", Size: -1, Fields: []VMDescField{{Name: "p", Type: "nullptr", Size: 1, Index: -1}}}}
	_, err = np.BodySize([]byte{0x31})
	vmstateTestWantErr(t, "nullptr", err, ErrVMDescMismatch)
	// Cyclic hand-built description: bounded by MaxDepth.
	cyc := &VMSD{Name: "c", Size: -1}
	cyc.Fields = []VMDescField{{Name: "self", Type: "struct", Size: -1, Index: -1, Struct: cyc}}
	cdev := VMDescDevice{Name: "c", VMSD: *cyc}
	_, err = cdev.BodySize(nil)
	vmstateTestWantErr(t, "cycle", err, ErrVMDescMismatch)
	// Huge zero-size array: bounded by MaxNodes.
	huge := VMDescDevice{Name: "h", VMSD: VMSD{Name: "h", Size: -1, Fields: []VMDescField{{Name: "z", Type: "buffer", Size: 0, ArrayLen: 1 << 30, Index: -1}}}}
	_, _, err = DecodeVMState(nil, &huge, &VMStateOptions{MaxNodes: 1000})
	vmstateTestWantErr(t, "huge array", err, ErrTooLarge)
}

// TestVMStateRealCorrupt damages real bodies and descriptions: errors are *Error, never panics,
// and a successful decode still re-encodes identically.
func TestVMStateRealCorrupt(t *testing.T) {
	s := vmdescTestLoad(t)[0]
	for k, sec := range s.sections {
		dev := s.desc.Devices[k]
		body := append([]byte(nil), s.data[sec.bodyStart:sec.bodyEnd+5]...)
		for i := 0; i < len(body); i += 1 + len(body)/50 {
			old := body[i]
			for _, v := range []byte{0x05, 0x7e, 0x00, old ^ 0xff} {
				body[i] = v
				root, n, err := DecodeVMState(body, &dev, nil)
				if err != nil {
					var e *Error
					if !errors.As(err, &e) {
						t.Fatalf("%s: non-*Error %v", dev.Name, err)
					}
					continue
				}
				if !bytes.Equal(EncodeVMState(root, nil), body[:n]) {
					t.Fatalf("%s: re-encoding differs after corruption at %d", dev.Name, i)
				}
			}
			body[i] = old
		}
		// Every field size off by one: must not silently succeed with the real footer position.
		for fi := range dev.VMSD.Fields {
			bad := dev
			bad.VMSD.Fields = append([]VMDescField(nil), dev.VMSD.Fields...)
			bad.VMSD.Fields[fi].Size++
			bad.VMSD.Fields[fi].Struct = nil
			if n, err := bad.BodySize(body); err == nil && n == sec.bodyEnd-sec.bodyStart {
				t.Errorf("%s: size+1 of field %d accepted", dev.Name, fi)
			}
		}
	}
}

// BenchmarkVMStateTail decodes every device section of a real stream (the whole device tail).
func BenchmarkVMStateTail(b *testing.B) {
	s := vmdescTestLoad(b)[0]
	total := 0
	for _, sec := range s.sections {
		total += sec.bodyEnd - sec.bodyStart
	}
	b.SetBytes(int64(total))
	b.ReportAllocs()
	b.Run("Decode", func(b *testing.B) {
		for b.Loop() {
			for k, sec := range s.sections {
				if _, _, err := DecodeVMState(s.data[sec.bodyStart:], &s.desc.Devices[k], nil); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("BodySize", func(b *testing.B) {
		for b.Loop() {
			for k, sec := range s.sections {
				if _, err := s.desc.Devices[k].BodySize(s.data[sec.bodyStart:]); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("ParseVMDesc", func(b *testing.B) {
		for b.Loop() {
			if _, err := ParseVMDesc(s.json); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// FuzzVMState fuzzes the vmstate walker: the body bytes against a fixed description (js empty:
// vmstateTestDescJSON) or against fuzzed vmdesc JSON. Any error must be an *Error; a successful
// decode must re-encode to exactly the consumed bytes and agree with BodySize.
func FuzzVMState(f *testing.F) {
	fixed := vmstateTestDesc(f)
	f.Add([]byte(nil), vmstateTestKvmclockBody, uint8(0))
	f.Add([]byte(nil), vmstateTestMixBody(), uint8(1))
	f.Add([]byte(nil), []byte{1, 2, 3, 4, 0x7e}, uint8(2))
	f.Add([]byte(vmstateTestDescJSON), vmstateTestMixBody(), uint8(1))
	f.Fuzz(func(t *testing.T, js, body []byte, idx uint8) {
		d := fixed
		if len(js) > 0 {
			var err error
			d, err = ParseVMDescWith(js, VMDescOptions{MaxItems: 20000})
			if err != nil {
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("ParseVMDesc: non-*Error %v", err)
				}
				return
			}
		}
		if len(d.Devices) == 0 {
			return
		}
		dev := &d.Devices[int(idx)%len(d.Devices)]
		opts := &VMStateOptions{MaxNodes: 200000}
		root, n, err := DecodeVMState(body, dev, opts)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("DecodeVMState: non-*Error %v", err)
			}
			return
		}
		if enc := EncodeVMState(root, nil); !bytes.Equal(enc, body[:n]) {
			t.Fatalf("re-encoding differs: %x vs %x", enc, body[:n])
		}
		if bs, err := dev.BodySize(body); err != nil || bs != n {
			t.Fatalf("BodySize = %d, %v; DecodeVMState consumed %d", bs, err, n)
		}
		var sb strings.Builder
		_ = Format(&sb, root)
	})
}
