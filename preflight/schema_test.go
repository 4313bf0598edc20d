package preflight

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// TestReportSchema checks every report the package can build from the captured facts — every
// pair of QEMUs, each against each domain XML, and the hook's checks — against schema.json, the
// promise `preflight --json` makes to scripts. Both an ok and a failing report are among them.
func TestReportSchema(t *testing.T) {
	c := jsonschema.NewCompiler()
	f, err := os.Open("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := jsonschema.UnmarshalJSON(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.AddResource("schema.json", doc); err != nil {
		t.Fatal(err)
	}
	schema, err := c.Compile("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	validate := func(name string, r Report) {
		b, _ := json.Marshal(r)
		v, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		if err := schema.Validate(v); err != nil {
			t.Errorf("%s: report does not match schema.json: %v", name, err)
		}
	}

	files, _ := filepath.Glob("testdata/facts-*.json")
	doms, _ := filepath.Glob("testdata/domain-*.xml")
	if len(files) < 2 || len(doms) == 0 {
		t.Fatalf("testdata: %d facts, %d domains", len(files), len(doms))
	}
	name := func(p string) string {
		return strings.TrimSuffix(strings.TrimPrefix(filepath.Base(p), "facts-"), ".json")
	}
	seen := map[bool]int{}
	for _, a := range files {
		src := loadFacts(t, name(a))
		for _, b := range files {
			r := Compare(src, asDestination(loadFacts(t, name(b))))
			seen[r.OK]++
			validate(name(a)+" → "+name(b), r)
		}
		for _, x := range doms {
			d := parseTestDomain(t, readTestdata(t, filepath.Base(x)))
			validate(name(a)+" → "+filepath.Base(x), CompareDomain(src, d, nil))
		}
	}
	for _, x := range doms {
		d := parseTestDomain(t, readTestdata(t, filepath.Base(x)))
		validate("incoming "+filepath.Base(x), Report{Destination: d.Name, Checks: CheckIncoming(context.Background(), d)})
	}
	if seen[true] == 0 || seen[false] == 0 {
		t.Errorf("ok reports %d, failing %d: want both kinds validated", seen[true], seen[false])
	}
}
