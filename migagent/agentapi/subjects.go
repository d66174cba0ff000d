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

// HeartbeatSubject returns the subject on which host's agent sends its host record (a
// request: the broker that stores it in the lethe-hosts bucket answers). Agents never write
// the bucket themselves, so that none can roll up or purge the other hosts' records.
func HeartbeatSubject(host string) string { return SubjectPrefix + "." + host + ".heartbeat" }

// HeartbeatWildcard matches the heartbeat subjects of every host.
const HeartbeatWildcard = SubjectPrefix + ".*.heartbeat"

// ParseHeartbeatSubject returns the host of a heartbeat subject.
func ParseHeartbeatSubject(subject string) (host string, ok bool) {
	rest, ok := strings.CutPrefix(subject, SubjectPrefix+".")
	if !ok {
		return "", false
	}
	host, ok = strings.CutSuffix(rest, ".heartbeat")
	if !ok || ValidName(host) != nil {
		return "", false
	}
	return host, true
}

// InboxPrefix returns the inbox prefix the agent of host must connect with
// (nats.CustomInboxPrefix), so that its permissions can confine its replies to itself.
func InboxPrefix(host string) string { return "_INBOX.agent." + host }

// BrokerInboxPrefix is the inbox prefix of the broker's NATS user, the only caller of the
// agent API.
const BrokerInboxPrefix = "_INBOX.broker"

// ReplyPrefix returns the prefix of every reply subject host's agent answers on: the broker
// calls host under its own inbox, in a part reserved for host, so that an agent may publish
// only on replies to requests made to it and can neither answer for another host nor reach
// any other subject (JetStream's API above all) through a reply. It ends with a dot.
func ReplyPrefix(host string) string { return BrokerInboxPrefix + ".agent." + host + "." }

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
