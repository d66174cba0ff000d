// Command lethe-keybroker runs Lethe's keybroker: it releases guests' keys from Vault only to
// attested agents, destroys them when a residency or migration ends, and signs receipts.
//
// It holds Vault credentials and must never print or log them, nor any key. The NATS edge
// that offers its API to the broker comes later; for now the process keeps its Vault token
// alive and retries pending destructions from its journal (--state-dir).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "lethe-keybroker:", err)
		os.Exit(1)
	}
}

// readSecret returns the trimmed contents of path, or "" for an empty path.
func readSecret(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading secret file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func run() error {
	var (
		vaultAddr      = flag.String("vault-addr", "", "Vault address (default: $VAULT_ADDR)")
		tokenFile      = flag.String("vault-token-file", "", "file holding a Vault token (default: $VAULT_TOKEN); token auth")
		roleID         = flag.String("approle-role-id", "", "AppRole role ID; with --approle-secret-id-file, AppRole auth instead of a token")
		secretIDFile   = flag.String("approle-secret-id-file", "", "file holding the AppRole secret ID")
		approleMount   = flag.String("approle-mount", "", "AppRole auth mount (default: approle)")
		transitMount   = flag.String("transit-mount", "", "Transit mount (default: transit)")
		kvMount        = flag.String("kv-mount", "", "KV v2 mount for tenants, guests and receipts (default: lethe)")
		stateDir       = flag.String("state-dir", "", "directory for the destruction journal (required)")
		adminTokenFile = flag.String("admin-token-file", "", "file holding the admin token of tenant registration (default: admin calls disabled)")
		trustRoots     = flag.String("trust-roots", "", "directory of extra roots of trust, such as emulated platforms' (development only)")
		collateral     = flag.String("collateral", "", "offline collateral cache directory")
		nonceTTL       = flag.Duration("nonce-ttl", 60*time.Second, "how long a nonce stays valid")
		exportPub      = flag.String("export-pub", "", "write the receipt-signing public key (PEM) to this file, creating the key if needed, and exit")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	if *stateDir == "" && *exportPub == "" {
		return errors.New("--state-dir is required: pending key destructions are journaled there")
	}
	vcfg := api.DefaultConfig()
	if *vaultAddr != "" {
		vcfg.Address = *vaultAddr
	}
	vcfg.MaxRetries = 1
	vcfg.Timeout = 10 * time.Second
	vc, err := api.NewClient(vcfg)
	if err != nil {
		return fmt.Errorf("creating Vault client: %w", err)
	}
	tok, err := readSecret(*tokenFile)
	if err != nil {
		return err
	}
	if tok != "" {
		vc.SetToken(tok)
	}
	var approle *keybroker.AppRole
	if *roleID != "" {
		sid, err := readSecret(*secretIDFile)
		if err != nil {
			return err
		}
		approle = &keybroker.AppRole{Mount: *approleMount, RoleID: *roleID, SecretID: sid}
		vc.ClearToken()
	}
	admin, err := readSecret(*adminTokenFile)
	if err != nil {
		return err
	}
	var roots []attest.Roots
	if *trustRoots != "" {
		if roots, err = attest.LoadRoots(*trustRoots); err != nil {
			return err
		}
	}
	verifier, err := attest.NewVerifier(attest.Config{Roots: roots, CollateralDir: *collateral})
	if err != nil {
		return err
	}
	kb, err := keybroker.New(keybroker.Config{
		Vault: vc, AppRole: approle, TransitMount: *transitMount, KVMount: *kvMount,
		Verifier: verifier, Logger: log, AdminToken: admin, StateDir: *stateDir, NonceTTL: *nonceTTL,
	})
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *exportPub != "" {
		pem, err := kb.PublicKeyPEM(ctx)
		if err != nil {
			return err
		}
		if err := os.WriteFile(*exportPub, pem, 0o644); err != nil {
			return fmt.Errorf("writing public key: %w", err)
		}
		log.Info("Wrote the receipt-signing public key", "file", *exportPub)
		return nil
	}
	log.Info("Keybroker running", "vault", vc.Address(), "state_dir", *stateDir)
	return kb.Run(ctx)
}
