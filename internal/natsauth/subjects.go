package natsauth

import (
	"fmt"
	"strings"
)

// The subject roots of Lethe's services. Packages broker, agentapi and kbwire re-export them.
const (
	// KeybrokerSubjectPrefix is the prefix of the keybroker API's subjects.
	KeybrokerSubjectPrefix = "lethe.v1.keybroker"
	// BrokerSubjectPrefix is the prefix of the broker API's subjects.
	BrokerSubjectPrefix = "lethe.v1.broker"
	// EventsSubjectPrefix is the prefix of the events subjects, lethe.v1.events.<migration-id>.
	EventsSubjectPrefix = "lethe.v1.events"
	// AgentSubjectPrefix is the prefix of every agent subject, lethe.v1.agent.<host>.….
	AgentSubjectPrefix = "lethe.v1.agent"
	// AgentProgressWildcard matches the progress subjects of every host and migration.
	AgentProgressWildcard = AgentSubjectPrefix + ".*.progress.*"
	// AgentHeartbeatWildcard matches the heartbeat subjects of every host.
	AgentHeartbeatWildcard = AgentSubjectPrefix + ".*.heartbeat"
	// AuditSubjectPrefix is the prefix of the audit subjects: the keybroker publishes on
	// lethe.v1.audit.keybroker.<kind>, the broker on lethe.v1.audit.broker.<action>
	// (docs/audit.md). A breaking change of the records' schema takes a new prefix.
	AuditSubjectPrefix = "lethe.v1.audit"
	// KeybrokerAuditPrefix and BrokerAuditPrefix are the audit subjects of each publisher.
	KeybrokerAuditPrefix = AuditSubjectPrefix + ".keybroker"
	BrokerAuditPrefix    = AuditSubjectPrefix + ".broker"
	// AuditStream is the JetStream stream that keeps the audit subjects, the only one the
	// auditor role may read.
	AuditStream = "LETHE_AUDIT"
)

// The keybroker operations callable by tenants and operators (kbwire's OpPolicyPublish,
// OpTenantRotateKey, OpTenantRegister), the only ones besides the broker's calls.
const (
	keybrokerPolicyPublish   = KeybrokerSubjectPrefix + ".policy.publish"
	keybrokerTenantRotateKey = KeybrokerSubjectPrefix + ".tenant.rotate-key"
	keybrokerTenantRegister  = KeybrokerSubjectPrefix + ".tenant.register"
	// keybrokerLog are the residency log's operations (kbwire's OpLog*), which tenants,
	// operators and witnesses call: the log's proofs are public, a guest's history its
	// tenant's (the keybroker answers a tenant's inbox about its own guests only).
	keybrokerLog = KeybrokerSubjectPrefix + ".log.>"
	// keybrokerPublicKey is the receipt-signing key's operation (kbwire's OpPublicKey): the
	// key tenants verify receipts and the log with.
	keybrokerPublicKey = KeybrokerSubjectPrefix + ".pubkey"
)

// The JetStream key-value buckets of the broker, the only ones its store user may use.
const (
	MigrationsBucket = "lethe-migrations"
	HostsBucket      = "lethe-hosts"
	PoliciesBucket   = "lethe-policies"
	GuestsBucket     = "lethe-guests"
	ReceiptsBucket   = "lethe-receipts"
	// FleetBucket holds the operator's host states and the fleet operations.
	FleetBucket = "lethe-fleet"
	// ArchiveBucket holds the ended migrations moved out of MigrationsBucket, whose every
	// record the broker reads at each check.
	ArchiveBucket = "lethe-archive"
)

// Buckets lists the broker's key-value buckets.
var Buckets = []string{MigrationsBucket, HostsBucket, PoliciesBucket, GuestsBucket, ReceiptsBucket, FleetBucket, ArchiveBucket}

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

// The inbox prefixes of the roles (see InboxPrefix).
const (
	// BrokerInboxPrefix is the inbox prefix of the broker's serving user, the only caller of
	// the agent API.
	BrokerInboxPrefix = "_INBOX.broker"
	// OperatorInboxPrefix is the inbox prefix of operators (one shared by all, or the root of
	// each named operator's).
	OperatorInboxPrefix = "_INBOX.operator"
	// TenantInboxPrefix is the root of the tenants' inbox prefixes, _INBOX.tenant.<tenant>.
	TenantInboxPrefix = "_INBOX.tenant"
	// AgentInboxPrefix is the root of the agents' inbox prefixes, _INBOX.agent.<host>.
	AgentInboxPrefix = "_INBOX.agent"
	// AuditorInboxPrefix is the inbox prefix of auditors, where JetStream answers them and
	// delivers the audit stream's messages.
	AuditorInboxPrefix = "_INBOX.auditor"
)

// InboxPrefix returns the inbox prefix a client of role (and name) must connect with
// (nats.CustomInboxPrefix): each user may subscribe only to its own inbox, so no one reads
// another's replies. name is the host of an agent, the tenant of a tenant, and optionally an
// operator's own name; other roles ignore it.
func InboxPrefix(role Role, name string) string {
	switch role {
	case RoleAgent:
		return AgentInboxPrefix + "." + name
	case RoleTenant:
		return TenantInboxPrefix + "." + name
	case RoleOperator:
		if name != "" {
			return OperatorInboxPrefix + "." + name
		}
		return OperatorInboxPrefix
	case RoleBroker:
		return BrokerInboxPrefix
	case RoleAuditor:
		return AuditorInboxPrefix
	}
	return "_INBOX." + string(role)
}

// ReplyAllowed reports whether reply is a subject under the inbox prefix of the caller of
// role and name: the only subjects a server answers that caller on.
func ReplyAllowed(reply string, role Role, name string) bool {
	return strings.HasPrefix(reply, InboxPrefix(role, name)+".")
}

// AgentReplyPrefix returns the prefix of every reply subject host's agent answers on: the
// broker calls host under its own inbox, in a part reserved for host, so that an agent may
// publish only on replies to requests made to it and can neither answer for another host nor
// reach any other subject (JetStream's API above all) through a reply. It ends with a dot.
func AgentReplyPrefix(host string) string { return BrokerInboxPrefix + ".agent." + host + "." }
