package natsauth

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
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
	// Account is the account that holds every user but auditors. Empty means LETHE.
	// Auditors are held in an account of their own, Account + "_AUDITORS" (AuditorAccount).
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

// WriteServerConfig writes a nats-server configuration for cfg: JetStream, one account with
// cfg's users and their permissions, and, if there are auditors, their own account
// (AuditorAccount) importing the audit stream's read operations under AuditorAPIPrefix. It
// returns ErrNoAuth for a configuration without users unless cfg.Dev.
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
	if err := ValidName(account); err != nil {
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
		var lethe, auditors []User
		for _, u := range cfg.Users {
			if u.Role == RoleAuditor {
				auditors = append(auditors, u)
			} else {
				lethe = append(lethe, u)
			}
		}
		logins := map[string]bool{}
		b.WriteString("accounts {\n")
		fmt.Fprintf(&b, "  %s {\n    jetstream: enabled\n", account)
		if err := writeUsers(&b, lethe, logins); err != nil {
			return err
		}
		if len(auditors) > 0 {
			// The auditors' account reaches the audit stream's read API alone, through
			// service imports: JetStream's answers and messages go back to that account, so
			// no reply subject an auditor names is ever published in this one.
			b.WriteString("    exports: [\n")
			for _, op := range auditorAPI {
				fmt.Fprintf(&b, "      { service: %s, accounts: [%s]", quote("$JS.API."+op), quote(AuditorAccount(account)))
				if strings.HasPrefix(op, "CONSUMER.MSG.NEXT.") {
					b.WriteString(", response_type: \"stream\"")
				}
				b.WriteString(" }\n")
			}
			b.WriteString("    ]\n")
		}
		b.WriteString("  }\n")
		if len(auditors) > 0 {
			fmt.Fprintf(&b, "  %s {\n", AuditorAccount(account))
			if err := writeUsers(&b, auditors, logins); err != nil {
				return err
			}
			b.WriteString("    imports: [\n")
			for _, op := range auditorAPI {
				fmt.Fprintf(&b, "      { service: { account: %s, subject: %s }, to: %s }\n", quote(account), quote("$JS.API."+op), quote(AuditorAPIPrefix+"."+op))
			}
			b.WriteString("    ]\n  }\n")
		}
		b.WriteString("}\n")
	}
	_, err := w.Write(b.Bytes())
	return err
}

// AuditorAccount returns the account that holds the auditors of a server whose other users
// are in account.
func AuditorAccount(account string) string { return account + "_AUDITORS" }

// writeUsers writes the users block of one account; logins are the user names taken so far.
func writeUsers(b *bytes.Buffer, users []User, logins map[string]bool) error {
	b.WriteString("    users: [\n")
	for _, u := range users {
		p, err := UserPermissions(u)
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
			fmt.Fprintf(b, "        nkey: %s\n", quote(u.NKey))
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
			fmt.Fprintf(b, "        user: %s\n        password: %s\n", quote(login), quote(u.Password))
		}
		b.WriteString("        permissions: {\n")
		fmt.Fprintf(b, "          publish: { allow: %s }\n", quoteList(p.Publish))
		fmt.Fprintf(b, "          subscribe: { allow: %s }\n", quoteList(p.Subscribe))
		b.WriteString("        }\n      }\n")
	}
	b.WriteString("    ]\n")
	return nil
}

func quote(s string) string { return strconv.Quote(s) }

func quoteList(l []string) string {
	q := make([]string, len(l))
	for i, s := range l {
		q[i] = quote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
