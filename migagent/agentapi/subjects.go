package agentapi

import (
	"fmt"
	"strings"
)

// SubjectPrefix is the prefix of every agent subject.
const SubjectPrefix = "lethe.v1.agent"

// HostsBucket is the JetStream key-value bucket of host records, keyed by host name.
const HostsBucket = "lethe-hosts"

// Op is an operation of the agent API.
type Op string

// The operations every agent serves.
const (
	OpAttest   Op = "attest"
	OpPrepare  Op = "prepare"
	OpKeys     Op = "keys"
	OpTransfer Op = "transfer"
	OpStatus   Op = "status"
	OpErase    Op = "erase"
	OpAbort    Op = "abort"
)

// Ops lists every operation, in the order of a migration.
var Ops = []Op{OpAttest, OpPrepare, OpKeys, OpTransfer, OpStatus, OpErase, OpAbort}

// Subject returns the subject of op on host.
func Subject(host string, op Op) string { return SubjectPrefix + "." + host + "." + string(op) }

// ProgressSubject returns the subject on which host's agent publishes the progress of a
// migration.
func ProgressSubject(host, migrationID string) string {
	return SubjectPrefix + "." + host + ".progress." + migrationID
}

// ProgressWildcard matches the progress subjects of every host and migration.
const ProgressWildcard = SubjectPrefix + ".*.progress.*"

// ParseProgressSubject returns the host and migration of a progress subject.
func ParseProgressSubject(subject string) (host, migrationID string, ok bool) {
	rest, ok := strings.CutPrefix(subject, SubjectPrefix+".")
	if !ok {
		return "", "", false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 3 || parts[1] != "progress" || ValidName(parts[0]) != nil || ValidName(parts[2]) != nil {
		return "", "", false
	}
	return parts[0], parts[2], true
}

// HostKVSubject returns the subject an agent publishes its host record on (the key-value
// bucket's subject for the host's key).
func HostKVSubject(host string) string { return "$KV." + HostsBucket + "." + host }

// InboxPrefix returns the inbox prefix the agent of host must connect with
// (nats.CustomInboxPrefix), so that its permissions can confine its replies to itself.
func InboxPrefix(host string) string { return "_INBOX.agent." + host }

// maxNameLen bounds host names, tenant names, VM names and migration ids.
const maxNameLen = 128

// ValidName reports whether s can be used as one NATS subject token and one key-value key
// token: 1 to 128 characters of ASCII letters, digits, '-' and '_'. Host names, tenant names,
// VM names and migration ids must all be valid names.
func ValidName(s string) error {
	if s == "" {
		return fmt.Errorf("empty name")
	}
	if len(s) > maxNameLen {
		return fmt.Errorf("name of %d characters exceeds %d", len(s), maxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return fmt.Errorf("name %q: character %q not allowed (letters, digits, '-', '_')", s, c)
		}
	}
	return nil
}
