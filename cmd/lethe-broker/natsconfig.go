package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/strictyaml"
)

// natsUsers is the file nats-config reads: the server's settings and Lethe's NATS users.
type natsUsers struct {
	// Listen is the client address. Empty: 127.0.0.1:4222.
	Listen string `yaml:"listen"`
	// StoreDir is the JetStream store directory.
	StoreDir string `yaml:"store_dir"`
	// Account holds every user. Empty: LETHE.
	Account string `yaml:"account"`
	// TLS makes the server require TLS.
	TLS *struct {
		Cert   string `yaml:"cert"`
		Key    string `yaml:"key"`
		CA     string `yaml:"ca"`
		Verify bool   `yaml:"verify"`
	} `yaml:"tls"`
	// Users are the users, one per broker, keybroker, agent host, tenant and operator.
	Users []struct {
		Role     natsauth.Role `yaml:"role"`
		Name     string        `yaml:"name"`
		Login    string        `yaml:"login"`
		Password string        `yaml:"password"`
		NKey     string        `yaml:"nkey"`
	} `yaml:"users"`
}

// natsConfig is the subcommand "nats-config [--out FILE] USERS.yaml": it writes the
// nats-server configuration natsauth.WriteServerConfig makes for the users file, to stdout or
// --out.
func natsConfig(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("lethe-broker nats-config", flag.ContinueOnError)
	out := fs.String("out", "", "write the configuration to this file (mode 0600) instead of stdout")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: lethe-broker nats-config [--out FILE] USERS.yaml")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("want one users file")
	}
	data, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return fmt.Errorf("reading users file: %w", err)
	}
	conf, err := renderNATSConfig(fs.Arg(0), data)
	if err != nil {
		return err
	}
	if *out == "" {
		_, err := stdout.Write(conf)
		return err
	}
	if err := os.WriteFile(*out, conf, 0o600); err != nil {
		return fmt.Errorf("writing NATS server configuration: %w", err)
	}
	return nil
}

// renderNATSConfig turns a users file into a nats-server configuration.
func renderNATSConfig(file string, data []byte) ([]byte, error) {
	var u natsUsers
	doc, err := strictyaml.Parse(file, data)
	if err == nil {
		_, err = doc.Decode(&u, strictyaml.Options{})
	}
	if err != nil {
		return nil, fmt.Errorf("decoding users file: %w", err)
	}
	cfg := natsauth.ServerConfig{Listen: u.Listen, StoreDir: u.StoreDir, Account: u.Account}
	if u.TLS != nil {
		cfg.TLS = &natsauth.ServerTLS{Cert: u.TLS.Cert, Key: u.TLS.Key, CA: u.TLS.CA, Verify: u.TLS.Verify}
	}
	for _, x := range u.Users {
		cfg.Users = append(cfg.Users, natsauth.User{Role: x.Role, Name: x.Name, Login: x.Login, Password: x.Password, NKey: x.NKey})
	}
	var b bytes.Buffer
	if err := natsauth.WriteServerConfig(&b, cfg); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// serverOptions returns nats-server options for cfg (for the embedded development server),
// parsed from the configuration natsauth.WriteServerConfig writes. It returns
// natsauth.ErrNoAuth as WriteServerConfig does.
func serverOptions(cfg natsauth.ServerConfig) (*server.Options, error) {
	var b bytes.Buffer
	if err := natsauth.WriteServerConfig(&b, cfg); err != nil {
		return nil, err
	}
	o := &server.Options{}
	if err := o.ProcessConfigString(b.String()); err != nil {
		return nil, fmt.Errorf("parsing server config: %w", err)
	}
	return o, nil
}
