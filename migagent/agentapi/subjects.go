package agentapi

import (
	"strings"

	"github.com/lethe-cc/lethe/internal/natsauth"
)

// SubjectPrefix is the prefix of every agent subject.
const SubjectPrefix = natsauth.AgentSubjectPrefix

// HostsBucket is the JetStream key-value bucket of host records, keyed by host name.
const HostsBucket = natsauth.HostsBucket

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
const ProgressWildcard = natsauth.AgentProgressWildcard

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
const HeartbeatWildcard = natsauth.AgentHeartbeatWildcard

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

// ReplyPrefix returns the prefix of every reply subject host's agent answers on
// (natsauth.AgentReplyPrefix): a part of the broker's inbox reserved for host, so that an agent
// may publish only on replies to requests made to it. It ends with a dot.
func ReplyPrefix(host string) string { return natsauth.AgentReplyPrefix(host) }

// ValidName reports whether s can be used as one NATS subject token and one key-value key
// token (natsauth.ValidName): 1 to 128 characters of ASCII letters, digits, '-' and '_'. Host
// names, tenant names, VM names and migration ids must all be valid names.
func ValidName(s string) error { return natsauth.ValidName(s) }
