package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// NATSClient are a daemon's settings for its NATS connection: the server, how it
// authenticates and TLS. The zero value connects to no URL without authentication.
type NATSClient struct {
	// URL is the server URL, or a comma-separated list of them.
	URL string
	// Creds is a credentials file (JWT and nkey seed). It wins over NKeySeed and User.
	Creds string
	// NKeySeed is a file holding an nkey seed. It wins over User.
	NKeySeed string
	// User and Password authenticate with a user name and password.
	User, Password string
	// TLS are the TLS files; see NATSTLS.
	TLS NATSTLS
}

// DeclareAuth declares on fs the settings of c's authentication and TLS, the same in every
// daemon: --creds, --nkey, --user, --password, read from the environment variables
// authEnv+"CREDS", "NKEY", "USER", "PASSWORD" (or the file "PASSWORD_FILE" names), and --nats-tls-ca, --nats-tls-cert,
// --nats-tls-key from tlsEnv+"CA", "CERT", "KEY".
func (c *NATSClient) DeclareAuth(fs *Flags, authEnv, tlsEnv string) {
	fs.String(&c.Creds, "creds", authEnv+"CREDS", "", "NATS credentials file")
	fs.String(&c.NKeySeed, "nkey", authEnv+"NKEY", "", "NATS nkey seed file")
	fs.String(&c.User, "user", authEnv+"USER", "", "NATS user")
	fs.Secret(&c.Password, "password", authEnv+"PASSWORD", "NATS password")
	fs.String(&c.TLS.CA, "nats-tls-ca", tlsEnv+"CA", "", "CA certificate (PEM) that verifies the NATS server; empty: the system roots")
	fs.String(&c.TLS.Cert, "nats-tls-cert", tlsEnv+"CERT", "", "client certificate (PEM) for NATS servers that verify clients")
	fs.String(&c.TLS.Key, "nats-tls-key", tlsEnv+"KEY", "", "private key (PEM) of --nats-tls-cert")
}

// ErrNoNATSAuth is CheckAuth's error: a daemon refuses to connect without authentication
// outside development mode.
var ErrNoNATSAuth = errors.New("refusing to start without NATS authentication: give --creds, --nkey or --user (or --dev for development)")

// CheckAuth returns ErrNoNATSAuth when c names no credentials, no nkey seed and no user,
// unless dev (development mode) allows that.
func (c NATSClient) CheckAuth(dev bool) error {
	if !dev && c.Creds == "" && c.NKeySeed == "" && c.User == "" {
		return ErrNoNATSAuth
	}
	return nil
}

// connectRetry is the pause between two attempts of Connect to reach NATS at start.
const connectRetry = 2 * time.Second

// Connect connects to c.URL as the client name, with replies on inboxPrefix (the daemon
// role's, which its NATS permissions allow), reconnecting forever, with c's TLS and
// authentication and the extra options (a daemon's metrics hooks).
//
// A daemon may start before NATS does, or while a NATS node is down: Connect tries every URL
// of c.URL, logs each failed attempt on log with the URLs it tried and the cause, and tries
// again every 2 s until it connects or ctx ends. It returns an error when c's TLS files are
// half given, when the nkey seed cannot be read, or with ctx's error when ctx ends first, the
// last attempt's error joined to it.
func (c NATSClient) Connect(ctx context.Context, log *slog.Logger, name, inboxPrefix string, extra ...nats.Option) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.CustomInboxPrefix(inboxPrefix),
	}
	opts = append(opts, extra...)
	tlsOpts, err := c.TLS.Options()
	if err != nil {
		return nil, err
	}
	opts = append(opts, tlsOpts...)
	switch {
	case c.Creds != "":
		opts = append(opts, nats.UserCredentials(c.Creds))
	case c.NKeySeed != "":
		o, err := nats.NkeyOptionFromSeed(c.NKeySeed)
		if err != nil {
			return nil, fmt.Errorf("reading nkey seed: %w", err)
		}
		opts = append(opts, o)
	case c.User != "":
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	}
	urls := RedactURLs(c.URL)
	for attempt := 1; ; attempt++ {
		nc, err := nats.Connect(c.URL, opts...)
		if err == nil {
			return nc, nil
		}
		err = fmt.Errorf("connecting to NATS at %s: %w", urls, err)
		log.Warn("Connecting to NATS failed; trying again", "nats", urls, "attempt", attempt, "retry_in", connectRetry, "error", err)
		t := time.NewTimer(connectRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, errors.Join(ctx.Err(), err)
		case <-t.C:
		}
	}
}

// RedactURLs returns urls, a comma-separated list of NATS server URLs, with any password in
// them replaced, fit for a log or an error message.
func RedactURLs(urls string) string {
	parts := strings.Split(urls, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if u, err := url.Parse(p); err == nil && u.User != nil {
			p = u.Redacted()
		}
		parts[i] = p
	}
	return strings.Join(parts, ",")
}

// NATSTLS are the TLS files of a NATS client connection.
type NATSTLS struct {
	// CA verifies the server's certificate (PEM). Empty: the system roots.
	CA string
	// Cert and Key authenticate the client (PEM), for servers that verify clients. Both or
	// neither.
	Cert, Key string
}

// Options returns the connection options for t: none when t names no file (a tls:// URL
// still connects with TLS, verified against the system roots). It returns an error when only
// one of Cert and Key is given. The files are read when the connection is made.
func (t NATSTLS) Options() ([]nats.Option, error) {
	if (t.Cert == "") != (t.Key == "") {
		return nil, errors.New("configuring NATS TLS: give both a client certificate and its key, or neither")
	}
	var opts []nats.Option
	if t.CA != "" {
		opts = append(opts, nats.RootCAs(t.CA))
	}
	if t.Cert != "" {
		opts = append(opts, nats.ClientCert(t.Cert, t.Key))
	}
	return opts, nil
}
