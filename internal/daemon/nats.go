package daemon

import (
	"errors"

	"github.com/nats-io/nats.go"
)

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
