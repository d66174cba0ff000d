package broker

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"io"
	"strconv"
	"strings"

	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats-server/v2/server"
)

// Role is a kind of NATS user of Lethe.
type Role string

// The roles that get NATS users.
const (
	RoleBroker Role = "broker"
	// RoleBrokerStore is the broker's JetStream user (Config.StoreConn): it alone holds
	// JetStream's API and Lethe's buckets, and it serves nothing, so no caller can make it
	// publish on a subject of the caller's choosing.
	RoleBrokerStore Role = "broker-store"
	RoleKeybroker   Role = "keybroker"
	RoleAgent       Role = "agent"
	RoleTenant      Role = "tenant"
	RoleOperator    Role = "operator"
)

// ErrNoAuth is returned for a server configuration without users that is not for development.
var ErrNoAuth = errors.New("NATS server configuration without authentication (allowed only in dev mode)")

// User is a NATS user of one role.
type User struct {
	Role Role
	// Name is the host of an agent or the tenant of a tenant (required for those roles); for
	// an operator, it optionally separates operators' inboxes.
	Name string
	// Login is the user name; empty means the role, or "<role>-<name>". Ignored with NKey.
	Login string
	// Password is the user's password (or its bcrypt hash, which nats-server accepts).
	// Exactly one of Password and NKey must be set.
	Password string
	// NKey is the user's public nkey (U…).
	NKey string
}

// ServerConfig describes a NATS server for Lethe.
type ServerConfig struct {
	// Listen is the client address. Empty means 127.0.0.1:4222.
	Listen string
	// StoreDir is the JetStream store directory. Empty leaves nats-server's default.
	StoreDir string
	// Account is the account that holds every user. Empty means LETHE.
	Account string
	// Users are the users; an empty list is refused unless Dev.
	Users []User
	// Dev allows a configuration without users (no authentication).
	Dev bool
	// TLS, if set, makes the server require TLS from its clients. Nil: no TLS (development,
	// or TLS terminated in front of the server).
	TLS *ServerTLS
}

// ServerTLS are the TLS files of a NATS server.
type ServerTLS struct {
	// Cert and Key are the server's certificate chain and private key (PEM). Required.
	Cert, Key string
	// CA verifies client certificates (PEM). Empty: the system roots.
	CA string
	// Verify requires every client to present a certificate that CA verifies (mutual TLS).
	Verify bool
}

// InboxPrefix returns the inbox prefix a client of role (and name) must connect with
// (nats.CustomInboxPrefix): each user may subscribe only to its own inbox, so no one reads
// another's replies.
func InboxPrefix(role Role, name string) string {
	switch role {
	case RoleAgent:
		return agentapi.InboxPrefix(name)
	case RoleTenant:
		return "_INBOX.tenant." + name
	case RoleOperator:
		if name != "" {
			return "_INBOX.operator." + name
		}
		return "_INBOX.operator"
	case RoleBroker:
		return agentapi.BrokerInboxPrefix
	}
	return "_INBOX." + string(role)
}

// replyAllowed reports whether reply is a subject under the inbox prefix of the caller of
// role and name: the only subjects a server answers on.
func replyAllowed(reply string, role Role, name string) bool {
	return strings.HasPrefix(reply, InboxPrefix(role, name)+".")
}

// Permissions returns u's subject permissions.
//
// No user may answer a request through a general response permission (allow_responses):
// a server answers only under the inbox prefixes of the roles allowed to call it, so that no
// caller can make it publish, with its own permissions, on a subject of the caller's choosing
// (JetStream's API above all). Servers check the same before they answer (replyAllowed,
// agentapi.ReplyPrefix, the keybroker's natsapi.Service). Only the broker's store user
// (RoleBrokerStore) may use JetStream, and it subscribes to nothing but its own inbox: the
// broker's serving user, which answers requests, holds no JetStream rights to lend. Agents do
// not even write their own host records: they send heartbeats that the broker
// stores, because a key-value put allowed on one key could carry a purge or roll-up header
// for the whole bucket. Nobody may publish on $SRV.>, so no one can make a server answer a
// service-discovery request on a subject of its choosing either.
func Permissions(u User) (*server.Permissions, error) {
	inbox := InboxPrefix(u.Role, u.Name) + ".>"
	var pub, sub []string
	switch u.Role {
	case RoleBroker:
		pub = []string{
			agentapi.SubjectPrefix + ".*.*", // agent operations, never progress
			KeyBrokerSubjectPrefix + ".>",
			// Events: a plain publish that stream LETHE_EVENTS captures, no JetStream right.
			EventsSubjectPrefix + ".>",
			// Answers to its callers: tenants, operators, agents' heartbeats.
			InboxPrefix(RoleTenant, "*") + ".>",
			InboxPrefix(RoleOperator, "") + ".>",
			agentapi.InboxPrefix("*") + ".>",
		}
		sub = []string{SubjectPrefix + ".>", agentapi.ProgressWildcard, agentapi.HeartbeatWildcard, "$SRV.>", inbox}
	case RoleBrokerStore:
		// JetStream's API, flow control and acks of its own consumers (key-value watches),
		// and Lethe's buckets; its only subscription is its inbox, where JetStream answers.
		pub = []string{"$JS.API.>", "$JS.FC.>", "$JS.ACK.>"}
		for _, bucket := range []string{MigrationsBucket, HostsBucket, PoliciesBucket, GuestsBucket, ReceiptsBucket} {
			pub = append(pub, "$KV."+bucket+".>")
		}
		sub = []string{inbox}
	case RoleKeybroker:
		// Answers to its callers: the broker, operators, and tenants (who publish their signed
		// policies and key rotations to it directly; the signature, not the NATS user, says
		// whose they are).
		pub = []string{EventsSubjectPrefix + ".>", InboxPrefix(RoleBroker, "") + ".>", InboxPrefix(RoleOperator, "") + ".>", InboxPrefix(RoleTenant, "*") + ".>"}
		sub = []string{KeyBrokerSubjectPrefix + ".>", "$SRV.>", inbox}
	case RoleAgent:
		if err := agentapi.ValidName(u.Name); err != nil {
			return nil, fmt.Errorf("agent user: host: %w", err)
		}
		own := agentapi.SubjectPrefix + "." + u.Name + ".>"
		// Answers only to the broker's requests made to this host.
		pub = []string{own, agentapi.ReplyPrefix(u.Name) + ">"}
		sub = []string{own, "$SRV.>", inbox}
	case RoleTenant:
		if err := agentapi.ValidName(u.Name); err != nil {
			return nil, fmt.Errorf("tenant user: tenant: %w", err)
		}
		pub = []string{
			SubjectPrefix + ".tenant." + u.Name + ".>",
			KeyBrokerSubjectPrefix + "." + kbwire.OpPolicyPublish,
			KeyBrokerSubjectPrefix + "." + kbwire.OpTenantRotateKey,
		}
		sub = []string{inbox}
	case RoleOperator:
		if u.Name != "" {
			if err := agentapi.ValidName(u.Name); err != nil {
				return nil, fmt.Errorf("operator user: %w", err)
			}
		}
		// Operators register tenants with the keybroker (an admin call, signed with the admin
		// key the keybroker pins, on top of this permission).
		pub = []string{SubjectPrefix + ".operator.>", "lethe.v1.keybroker.tenant.register"}
		sub = []string{inbox}
	default:
		return nil, fmt.Errorf("unknown role %q", u.Role)
	}
	return &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: pub},
		Subscribe: &server.SubjectPermission{Allow: sub},
	}, nil
}

// WriteServerConfig writes a nats-server configuration for cfg: JetStream, one account with
// cfg's users and their permissions. It returns ErrNoAuth for a configuration without users
// unless cfg.Dev.
func WriteServerConfig(w io.Writer, cfg ServerConfig) error {
	if len(cfg.Users) == 0 && !cfg.Dev {
		return ErrNoAuth
	}
	listen := cfg.Listen
	if listen == "" {
		listen = "127.0.0.1:4222"
	}
	account := cfg.Account
	if account == "" {
		account = "LETHE"
	}
	if err := agentapi.ValidName(account); err != nil {
		return fmt.Errorf("writing server config: account: %w", err)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# NATS server configuration for Lethe.\nlisten: %s\n", quote(listen))
	b.WriteString("jetstream {\n")
	if cfg.StoreDir != "" {
		fmt.Fprintf(&b, "  store_dir: %s\n", quote(cfg.StoreDir))
	}
	b.WriteString("}\n")
	if t := cfg.TLS; t != nil {
		if t.Cert == "" || t.Key == "" {
			return errors.New("writing server config: TLS needs a certificate and a key")
		}
		fmt.Fprintf(&b, "tls {\n  cert_file: %s\n  key_file: %s\n", quote(t.Cert), quote(t.Key))
		if t.CA != "" {
			fmt.Fprintf(&b, "  ca_file: %s\n", quote(t.CA))
		}
		if t.Verify {
			b.WriteString("  verify: true\n")
		}
		b.WriteString("}\n")
	}
	if len(cfg.Users) > 0 {
		fmt.Fprintf(&b, "accounts {\n  %s {\n    jetstream: enabled\n    users: [\n", account)
		logins := map[string]bool{}
		for _, u := range cfg.Users {
			p, err := Permissions(u)
			if err != nil {
				return fmt.Errorf("writing server config: %w", err)
			}
			b.WriteString("      {\n")
			switch {
			case (u.Password == "") == (u.NKey == ""):
				return fmt.Errorf("writing server config: user of role %s %q: exactly one of password and nkey", u.Role, u.Name)
			case u.NKey != "":
				if !strings.HasPrefix(u.NKey, "U") {
					return fmt.Errorf("writing server config: nkey of role %s %q is not a user nkey", u.Role, u.Name)
				}
				fmt.Fprintf(&b, "        nkey: %s\n", quote(u.NKey))
			default:
				login := u.Login
				if login == "" {
					login = string(u.Role)
					if u.Name != "" {
						login += "-" + u.Name
					}
				}
				if logins[login] {
					return fmt.Errorf("writing server config: duplicate user %q", login)
				}
				logins[login] = true
				if strings.ContainsAny(u.Password, "\"\\\n\r") {
					return fmt.Errorf("writing server config: password of %q contains a quote, backslash or newline", login)
				}
				fmt.Fprintf(&b, "        user: %s\n        password: %s\n", quote(login), quote(u.Password))
			}
			b.WriteString("        permissions: {\n")
			fmt.Fprintf(&b, "          publish: { allow: %s }\n", quoteList(p.Publish.Allow))
			fmt.Fprintf(&b, "          subscribe: { allow: %s }\n", quoteList(p.Subscribe.Allow))
			if p.Response != nil {
				fmt.Fprintf(&b, "          allow_responses: { max: %d }\n", p.Response.MaxMsgs)
			}
			b.WriteString("        }\n      }\n")
		}
		b.WriteString("    ]\n  }\n}\n")
	}
	_, err := w.Write(b.Bytes())
	return err
}

// ServerOptions returns nats-server options for cfg (for an embedded server), parsed from the
// same configuration WriteServerConfig writes. It returns ErrNoAuth as WriteServerConfig does.
func ServerOptions(cfg ServerConfig) (*server.Options, error) {
	var b bytes.Buffer
	if err := WriteServerConfig(&b, cfg); err != nil {
		return nil, err
	}
	o := &server.Options{}
	if err := o.ProcessConfigString(b.String()); err != nil {
		return nil, fmt.Errorf("parsing server config: %w", err)
	}
	return o, nil
}

func quote(s string) string { return strconv.Quote(s) }

func quoteList(l []string) string {
	q := make([]string, len(l))
	for i, s := range l {
		q[i] = quote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
