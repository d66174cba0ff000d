package daemon

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"strings"
)

// Reference returns the Markdown table of f's settings: per flag, in name order, its file
// key and flag, its environment variable, its type, its default and its description.
// defaults replaces the shown default of the flags it names (a default computed from the
// machine, such as the host name).
func Reference(f *Flags, defaults map[string]string) string {
	var b strings.Builder
	b.WriteString("| key / flag | environment | type | default | description |\n")
	b.WriteString("|---|---|---|---|---|\n")
	f.VisitAll(func(fl *flag.Flag) {
		key := "`" + fl.Name + "`"
		env := "—"
		if e := f.EnvVar(fl.Name); e != "" {
			env = "`" + e + "`"
			if f.settings[fl.Name].secret {
				env += " or `" + e + "_FILE`"
			}
			if a := f.Aliases(fl.Name); len(a) > 0 {
				env += " (formerly `" + strings.Join(a, "`, `") + "`)"
			}
		}
		if fl.Name == ConfigFlag || f.EnvVar(fl.Name) == "" {
			key = "`--" + fl.Name + "` (command line only)"
			if fl.Name == ConfigFlag {
				key = "`--" + fl.Name + "` (not in the file)"
			}
		}
		typ, _ := flag.UnquoteUsage(fl)
		switch {
		case f.Repeatable(fl.Name):
			typ = "list"
		case typ == "":
			typ = "bool"
		case typ == "value":
			typ = "string"
		}
		def, ok := defaults[fl.Name]
		if !ok {
			def = "`" + fl.DefValue + "`"
			if fl.DefValue == "" {
				def = "—"
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", key, env, typ, def, escapeCell(f.Description(fl.Name)))
	})
	return b.String()
}

func escapeCell(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

// ReplaceSection returns doc with the text between the lines "<!-- BEGIN name -->" and
// "<!-- END name -->" replaced by content. It returns an error if the markers are missing.
func ReplaceSection(doc []byte, name, content string) ([]byte, error) {
	begin := []byte("<!-- BEGIN " + name + " -->\n")
	end := []byte("<!-- END " + name + " -->")
	i := bytes.Index(doc, begin)
	j := bytes.Index(doc, end)
	if i < 0 || j < i+len(begin) {
		return nil, fmt.Errorf("replacing section %s: markers %q and %q not found in order", name, strings.TrimSpace(string(begin)), end)
	}
	var out bytes.Buffer
	out.Write(doc[:i+len(begin)])
	out.WriteString(content)
	out.Write(doc[j:])
	return out.Bytes(), nil
}

// SyncSection checks that the section name (see ReplaceSection) of the file at path holds
// content; with update it rewrites the section instead. It returns an error saying how to
// update the file when they differ.
func SyncSection(path, name, content string, update bool) error {
	doc, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	want, err := ReplaceSection(doc, name, content)
	if err != nil {
		return err
	}
	if bytes.Equal(doc, want) {
		return nil
	}
	if !update {
		return fmt.Errorf("section %s of %s is out of date: run the test again with -update", name, path)
	}
	if err := os.WriteFile(path, want, 0o644); err != nil {
		return fmt.Errorf("updating %s: %w", path, err)
	}
	return nil
}
