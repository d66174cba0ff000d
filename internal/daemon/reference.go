package daemon

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// envNoteRE matches the environment note of a usage: "(env NAME)", "(env NAME; more)" or
// "(env NAME, more)".
var envNoteRE = regexp.MustCompile(`\s*\(env [A-Z][A-Z0-9_]*(?:[;,] ([^)]*))?\)`)

// Description returns f's usage without its environment note (which Reference shows in a
// column of its own).
func Description(f *flag.Flag) string {
	return strings.TrimSpace(envNoteRE.ReplaceAllStringFunc(f.Usage, func(m string) string {
		sub := envNoteRE.FindStringSubmatch(m)
		if sub[1] == "" {
			return ""
		}
		return " (" + sub[1] + ")"
	}))
}

// Reference returns the Markdown table of fs's settings: per flag, in name order, its file
// key and flag, its environment variable, its type, its default and its description.
// defaults replaces the shown default of the flags it names (a default computed from the
// machine, such as the host name). The defaults shown are fs's DefValue, so build fs with no
// LETHE_* variable set.
func Reference(fs *flag.FlagSet, defaults map[string]string) string {
	var b strings.Builder
	b.WriteString("| key / flag | environment | type | default | description |\n")
	b.WriteString("|---|---|---|---|---|\n")
	fs.VisitAll(func(f *flag.Flag) {
		key := "`" + f.Name + "`"
		env := "—"
		if e := EnvVar(f); e != "" {
			env = "`" + e + "`"
		}
		if f.Name == ConfigFlag || EnvVar(f) == "" {
			key = "`--" + f.Name + "` (command line only)"
			if f.Name == ConfigFlag {
				key = "`--" + f.Name + "` (not in the file)"
			}
		}
		typ, _ := flag.UnquoteUsage(f)
		switch {
		case repeatable(f):
			typ = "list"
		case typ == "":
			typ = "bool"
		case typ == "value":
			typ = "string"
		}
		def, ok := defaults[f.Name]
		if !ok {
			def = "`" + f.DefValue + "`"
			if f.DefValue == "" {
				def = "—"
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", key, env, typ, def, escapeCell(Description(f)))
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
