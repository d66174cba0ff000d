package natsauth

import "fmt"

// Role is a kind of NATS user of Lethe.
type Role string

// The roles that get NATS users.
const (
	RoleBroker Role = "broker"
	// RoleBrokerStore is the broker's JetStream user (broker.Config.StoreConn): it alone holds
	// JetStream's API and Lethe's buckets, and it serves nothing, so no caller can make it
	// publish on a subject of the caller's choosing.
	RoleBrokerStore Role = "broker-store"
	RoleKeybroker   Role = "keybroker"
	RoleAgent       Role = "agent"
	RoleTenant      Role = "tenant"
	RoleOperator    Role = "operator"
	// RoleAuditor reads the audit stream (AuditStream) and nothing else: no other stream, no
	// bucket, no service (docs/audit.md).
	RoleAuditor Role = "auditor"
)

// Permissions are the subjects a user may publish on and subscribe to (nats-server's
// permissions block, allow lists only).
type Permissions struct {
	Publish, Subscribe []string
}

// UserPermissions returns u's subject permissions. It returns an error for an unknown role,
// or for an agent, tenant or named operator whose name is not a ValidName.
//
// No user may answer a request through a general response permission (allow_responses):
// a server answers only under the inbox prefixes of the roles allowed to call it, so that no
// caller can make it publish, with its own permissions, on a subject of the caller's choosing
// (JetStream's API above all). Servers check the same before they answer (ReplyAllowed,
// AgentReplyPrefix, the keybroker's natsapi.Service). Only the broker's store user
// (RoleBrokerStore) may use JetStream, and it subscribes to nothing but its own inbox: the
// broker's serving user, which answers requests, holds no JetStream rights to lend. Agents do
// not even write their own host records: they send heartbeats that the broker
// stores, because a key-value put allowed on one key could carry a purge or roll-up header
// for the whole bucket. Nobody may publish on $SRV.>, so no one can make a server answer a
// service-discovery request on a subject of its choosing either.
func UserPermissions(u User) (Permissions, error) {
	inbox := InboxPrefix(u.Role, u.Name) + ".>"
	var pub, sub []string
	switch u.Role {
	case RoleBroker:
		pub = []string{
			AgentSubjectPrefix + ".*.*", // agent operations, never progress
			KeybrokerSubjectPrefix + ".>",
			// Events and audit records: plain publishes that streams LETHE_EVENTS and
			// LETHE_AUDIT capture, no JetStream right; audit records under its own prefix only.
			EventsSubjectPrefix + ".>",
			BrokerAuditPrefix + ".>",
			// Answers to its callers: tenants, operators, agents' heartbeats.
			InboxPrefix(RoleTenant, "*") + ".>",
			InboxPrefix(RoleOperator, "") + ".>",
			InboxPrefix(RoleAgent, "*") + ".>",
		}
		sub = []string{BrokerSubjectPrefix + ".>", AgentProgressWildcard, AgentHeartbeatWildcard, "$SRV.>", inbox}
	case RoleBrokerStore:
		// JetStream's API, flow control and acks of its own consumers (key-value watches),
		// and Lethe's buckets; its only subscription is its inbox, where JetStream answers.
		pub = []string{"$JS.API.>", "$JS.FC.>", "$JS.ACK.>"}
		for _, bucket := range Buckets {
			pub = append(pub, "$KV."+bucket+".>")
		}
		sub = []string{inbox}
	case RoleKeybroker:
		// Answers to its callers: the broker, operators, and tenants (who publish their signed
		// policies and key rotations to it directly; the signature, not the NATS user, says
		// whose they are).
		pub = []string{EventsSubjectPrefix + ".>", KeybrokerAuditPrefix + ".>", InboxPrefix(RoleBroker, "") + ".>", InboxPrefix(RoleOperator, "") + ".>", InboxPrefix(RoleTenant, "*") + ".>"}
		sub = []string{KeybrokerSubjectPrefix + ".>", "$SRV.>", inbox}
	case RoleAgent:
		if err := ValidName(u.Name); err != nil {
			return Permissions{}, fmt.Errorf("agent user: host: %w", err)
		}
		own := AgentSubjectPrefix + "." + u.Name + ".>"
		// Answers only to the broker's requests made to this host.
		pub = []string{own, AgentReplyPrefix(u.Name) + ">"}
		sub = []string{own, "$SRV.>", inbox}
	case RoleTenant:
		if err := ValidName(u.Name); err != nil {
			return Permissions{}, fmt.Errorf("tenant user: tenant: %w", err)
		}
		pub = []string{
			BrokerSubjectPrefix + ".tenant." + u.Name + ".>",
			keybrokerPolicyPublish,
			keybrokerTenantRotateKey,
			keybrokerLog,
			keybrokerPublicKey,
		}
		sub = []string{inbox}
	case RoleOperator:
		if u.Name != "" {
			if err := ValidName(u.Name); err != nil {
				return Permissions{}, fmt.Errorf("operator user: %w", err)
			}
		}
		// Operators register tenants with the keybroker (an admin call, signed with the admin
		// key the keybroker pins, on top of this permission).
		pub = []string{BrokerSubjectPrefix + ".operator.>", keybrokerTenantRegister, keybrokerLog, keybrokerPublicKey}
		sub = []string{inbox}
	case RoleAuditor:
		pub, sub = AuditorPublish(), []string{inbox}
	default:
		return Permissions{}, fmt.Errorf("unknown role %q", u.Role)
	}
	return Permissions{Publish: pub, Subscribe: sub}, nil
}

// AuditorAPIPrefix is the JetStream API prefix of auditors (jetstream.NewWithAPIPrefix): in
// their own account (AuditorAccount), $JS.LETHE.API.<x> is $JS.API.<x> of Lethe's account,
// imported for the audit stream's read operations alone.
const AuditorAPIPrefix = "$JS.LETHE.API"

// auditorAPI are the JetStream API operations of AuditStream an auditor may call: look at
// the stream, and create, look at, pull from and delete its consumers.
var auditorAPI = []string{
	"STREAM.INFO." + AuditStream,
	"CONSUMER.CREATE." + AuditStream + ".>",
	"CONSUMER.INFO." + AuditStream + ".>",
	"CONSUMER.MSG.NEXT." + AuditStream + ".>",
	"CONSUMER.DELETE." + AuditStream + ".>",
}

// AuditorPublish returns the subjects an auditor may publish on, in its own account: the
// audit stream's read operations under AuditorAPIPrefix, and nothing else.
//
// An auditor may look at the stream, create, look at, pull from and delete consumers of it:
// none of these changes a stored record. It may not update, purge or delete the stream or
// its messages (the stream also denies deletes and purges to everyone), read any other stream
// or bucket, publish an audit record, or call a service. It lives in an account of its own
// (AuditorAccount) that imports these operations alone, so JetStream's answers, whatever
// reply subject the auditor names, go back to that account: it cannot make JetStream
// publish in Lethe's. What it can spend is consumers, which the stream's MaxConsumers
// bounds, and each expires once idle; deleting a consumer stops another auditor's read, never
// loses a record. Ordered consumers acknowledge nothing and pull, so no $JS.ACK or $JS.FC
// subject is needed.
func AuditorPublish() []string {
	out := make([]string, len(auditorAPI))
	for i, op := range auditorAPI {
		out[i] = AuditorAPIPrefix + "." + op
	}
	return out
}
