package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/mod/sumdb/note"

	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// logSource is what lethectl asks of the keybroker's residency log (kbclient.Client): what it
// fetches is verified here, never trusted.
type logSource interface {
	LogCheckpoint(ctx context.Context, witnessed bool) ([]byte, error)
	LogConsistency(ctx context.Context, from, to uint64) ([][]byte, error)
	LogHistory(ctx context.Context, tenant, vm string, witnessed bool) (*tlog.History, error)
	LogCosign(ctx context.Context, cosigned []byte) ([]byte, error)
}

// keybroker connects to NATS as o says (as a tenant with --tenant, else as an operator) and
// returns a keybroker client and a function that closes it.
func (o *brokerOpts) keybroker() (*kbclient.Client, func(), error) {
	nc, err := o.dial()
	if err != nil {
		return nil, nil, err
	}
	return kbclient.New(nc, o.Timeout), nc.Close, nil
}

// lazyKeybroker is a logSource that connects on its first call: a command that may need no
// proof (two checkpoints of one size) then needs no NATS.
type lazyKeybroker struct {
	o       *brokerOpts
	c       *kbclient.Client
	closeFn func()
}

func (l *lazyKeybroker) client() (*kbclient.Client, error) {
	if l.c == nil {
		c, closeFn, err := l.o.keybroker()
		if err != nil {
			return nil, err
		}
		l.c, l.closeFn = c, closeFn
	}
	return l.c, nil
}

func (l *lazyKeybroker) close() {
	if l.closeFn != nil {
		l.closeFn()
	}
}

func (l *lazyKeybroker) LogCheckpoint(ctx context.Context, witnessed bool) ([]byte, error) {
	c, err := l.client()
	if err != nil {
		return nil, err
	}
	return c.LogCheckpoint(ctx, witnessed)
}

func (l *lazyKeybroker) LogConsistency(ctx context.Context, from, to uint64) ([][]byte, error) {
	c, err := l.client()
	if err != nil {
		return nil, err
	}
	return c.LogConsistency(ctx, from, to)
}

func (l *lazyKeybroker) LogHistory(ctx context.Context, tenant, vm string, witnessed bool) (*tlog.History, error) {
	c, err := l.client()
	if err != nil {
		return nil, err
	}
	return c.LogHistory(ctx, tenant, vm, witnessed)
}

func (l *lazyKeybroker) LogEntries(ctx context.Context, from, to uint64) ([][]byte, error) {
	c, err := l.client()
	if err != nil {
		return nil, err
	}
	return c.LogEntries(ctx, from, to)
}

func (l *lazyKeybroker) LogCosign(ctx context.Context, cosigned []byte) ([]byte, error) {
	c, err := l.client()
	if err != nil {
		return nil, err
	}
	return c.LogCosign(ctx, cosigned)
}

// logTrust is what a checkpoint is verified against: the keybroker's receipt-signing key, the
// log's origin, and the witnesses of which at least minWitnesses must have cosigned.
type logTrust struct {
	pubFile, origin string
	witnesses       []string
	minWitnesses    int
}

// addLogKeyFlags adds the flags of the log's key and origin; pubRequired marks --pub required.
func addLogKeyFlags(cmd *cobra.Command, t *logTrust, pubRequired bool) {
	f := cmd.Flags()
	f.StringVar(&t.pubFile, "pub", "", "the keybroker's receipt-signing public key, PEM (lethe-keybroker --export-pub), which signs the log's checkpoints")
	f.StringVar(&t.origin, "origin", "", "the log's origin (the keybroker's log-origin); empty: the one the checkpoint names")
	if pubRequired {
		_ = cmd.MarkFlagRequired("pub")
	}
}

// addLogTrustFlags adds the flags of logTrust: the log's key and the witnesses required.
func addLogTrustFlags(cmd *cobra.Command, t *logTrust, pubRequired bool) {
	addLogKeyFlags(cmd, t, pubRequired)
	f := cmd.Flags()
	f.StringArrayVar(&t.witnesses, "witness", nil, "verifier key of a witness you trust (lethectl log witness keygen prints it); repeatable")
	f.IntVar(&t.minWitnesses, "min-witnesses", 0, "require cosignatures by at least this many of the --witness keys (default: all of them)")
}

// verifier holds what logTrust's flags name, read and decoded.
type verifier struct {
	pub          ed25519.PublicKey
	origin       string
	witnesses    []*tlog.WitnessVerifier
	minWitnesses int
}

// load reads the public key and decodes the witness keys. Without --min-witnesses every
// witness given must have cosigned.
func (t *logTrust) load() (*verifier, error) {
	b, err := os.ReadFile(t.pubFile)
	if err != nil {
		return nil, fmt.Errorf("reading public key: %w", err)
	}
	pub, err := receipt.ParsePublicKeyPEM(b)
	if err != nil {
		return nil, err
	}
	v := &verifier{pub: pub, origin: t.origin, minWitnesses: t.minWitnesses}
	for _, k := range t.witnesses {
		w, err := tlog.ParseWitnessKey(k)
		if err != nil {
			return nil, fmt.Errorf("--witness: %w", err)
		}
		v.witnesses = append(v.witnesses, w)
	}
	switch {
	case t.minWitnesses < 0 || t.minWitnesses > len(v.witnesses):
		return nil, fmt.Errorf("--min-witnesses %d: give at least that many --witness keys", t.minWitnesses)
	case t.minWitnesses == 0:
		v.minWitnesses = len(v.witnesses)
	}
	return v, nil
}

// open verifies a signed checkpoint: the keybroker's signature under the log's origin (given,
// or the one the checkpoint names: the key, not the name, is what is trusted), and the
// witnesses required.
func (v *verifier) open(signed []byte) (*tlog.Signed, error) {
	return v.openWith(signed, v.witnesses, v.minWitnesses)
}

// openLogOnly verifies the keybroker's signature of a checkpoint, no witness required: a
// checkpoint pinned earlier was checked as it was pinned.
func (v *verifier) openLogOnly(signed []byte) (*tlog.Signed, error) {
	return v.openWith(signed, nil, 0)
}

func (v *verifier) openWith(signed []byte, witnesses []*tlog.WitnessVerifier, min int) (*tlog.Signed, error) {
	origin := v.origin
	if origin == "" {
		origin, _, _ = strings.Cut(string(signed), "\n")
	}
	lv, err := tlog.LogVerifier(origin, v.pub)
	if err != nil {
		return nil, err
	}
	return tlog.Open(signed, lv, witnesses, min)
}

// checkpointView is a verified checkpoint as lethectl prints it.
type checkpointView struct {
	Origin    string   `json:"origin"`
	Size      uint64   `json:"size"`
	Root      string   `json:"root"`
	Witnesses []string `json:"witnesses"`
}

func viewCheckpoint(cp *tlog.Signed) checkpointView {
	return checkpointView{Origin: cp.Origin, Size: cp.Size, Root: base64.StdEncoding.EncodeToString(cp.Root), Witnesses: append([]string{}, cp.Witnesses...)}
}

func (c checkpointView) print(w io.Writer) {
	ws := "none"
	if len(c.Witnesses) > 0 {
		ws = strings.Join(c.Witnesses, ", ")
	}
	fmt.Fprintf(w, "origin      %s\nsize        %d\nroot        %s\nwitnesses   %s\n", c.Origin, c.Size, c.Root, ws)
}

// extends checks that next extends prev (both verified), fetching the consistency proof
// from src when one is needed. It returns the proof it used, and an error wrapping
// tlog.ErrInconsistent when next does not extend prev.
func extends(ctx context.Context, src logSource, prev, next *tlog.Signed) ([][]byte, error) {
	var proof [][]byte
	if prev.Size > 0 && prev.Size < next.Size {
		var err error
		if proof, err = src.LogConsistency(ctx, prev.Size, next.Size); err != nil {
			return nil, fmt.Errorf("fetching the consistency proof from size %d to %d: %w", prev.Size, next.Size, err)
		}
	}
	return proof, tlog.CheckExtends(prev.Checkpoint, next.Checkpoint, proof)
}

// inconsistency says what a checkpoint that does not extend an earlier one means; it wraps
// err (tlog.ErrInconsistent).
func inconsistency(err error, prev, next *tlog.Signed) error {
	return fmt.Errorf("INCONSISTENT: %w\nThe keybroker signed a log of size %d (root %s) that does not extend the log of size %d (root %s) it signed before:\n"+
		"it shows different parties different logs (a split view) or it rewrote its log; keep both signed checkpoints: together they prove it",
		err, next.Size, base64.StdEncoding.EncodeToString(next.Root), prev.Size, base64.StdEncoding.EncodeToString(prev.Root))
}

// readCheckpointFile reads a signed checkpoint ("-": standard input).
func readCheckpointFile(path string, stdin io.Reader) ([]byte, error) {
	var b []byte
	var err error
	if path == "-" {
		b, err = io.ReadAll(stdin)
	} else {
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint: %w", err)
	}
	return b, nil
}

// writeFileAtomic replaces path with data: a reader sees the old file or the new one, whole.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(f.Name())
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

func newLogCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "log",
		Short: "Fetch and verify the keybroker's residency log; run a witness of it",
		Long: `The residency log is the keybroker's append-only log of every key decision: each adoption,
release, reissue, denial, commit, abort and cleanup. Its checkpoints are signed with the
keybroker's receipt-signing key (lethe-keybroker --export-pub writes it) and may be cosigned by
witnesses, who cosign a checkpoint only if it extends the one they saw before.

Pin a checkpoint (log checkpoint --out) and check later ones against it (log prove-consistency,
guests history --pinned): a log that does not extend it was rewritten, or is not the log others
are shown. guests history verifies a guest's complete history.`,
	}
	cmd.AddCommand(newLogCheckpointCmd(), newLogProveConsistencyCmd(), newLogWitnessCmd(), newLogAuditCmd())
	return cmd
}

func newLogCheckpointCmd() *cobra.Command {
	var (
		o         brokerOpts
		trust     logTrust
		witnessed bool
		out       string
	)
	cmd := &cobra.Command{
		Use:   "checkpoint [--pub keybroker.pub] [--out FILE]",
		Short: "Fetch the log's signed checkpoint, verify it and save it to pin",
		Long: `checkpoint fetches the residency log's newest signed checkpoint (with --witnessed, the newest a
witness cosigned). With --pub it verifies the keybroker's signature, and the cosignatures of the
--witness keys (all of them, or --min-witnesses), and prints the log's origin, size and root
hash. --out writes the signed checkpoint as it came: that file is what you pin.`,
		Example: `  lethectl log checkpoint --pub keybroker.pub --out pinned.checkpoint
  lethectl log checkpoint --witnessed --pub keybroker.pub --witness "$W1" --witness "$W2" --min-witnesses 1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, closeFn, err := o.keybroker()
			if err != nil {
				return err
			}
			defer closeFn()
			ctx, cancel := o.callCtx(cmd.Context())
			defer cancel()
			signed, err := c.LogCheckpoint(ctx, witnessed)
			if err != nil {
				return fmt.Errorf("fetching the log's checkpoint: %w", err)
			}
			return showCheckpoint(cmd, &o, &trust, signed, out)
		},
	}
	addBrokerFlags(cmd, &o, true)
	addLogTrustFlags(cmd, &trust, false)
	cmd.Flags().BoolVar(&witnessed, "witnessed", false, "the newest checkpoint a witness cosigned, rather than the newest")
	cmd.Flags().StringVar(&out, "out", "", "write the signed checkpoint to this file, as it came")
	return cmd
}

// showCheckpoint verifies signed if trust names a key, writes it to out if given, and prints it.
func showCheckpoint(cmd *cobra.Command, o *brokerOpts, trust *logTrust, signed []byte, out string) error {
	var view any
	if trust.pubFile != "" {
		v, err := trust.load()
		if err != nil {
			return err
		}
		cp, err := v.open(signed)
		if err != nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "INVALID: %v\n", err)
			return &exitError{code: 1}
		}
		view = viewCheckpoint(cp)
	} else if len(trust.witnesses) > 0 {
		return errors.New("--witness needs --pub")
	}
	if out != "" {
		if err := os.WriteFile(out, signed, 0o644); err != nil {
			return fmt.Errorf("writing checkpoint: %w", err)
		}
	}
	if view == nil {
		fmt.Fprintln(cmd.ErrOrStderr(), "(signature not verified: give --pub)")
		return o.show(cmd.OutOrStdout(), map[string]string{"checkpoint": string(signed)}, func(w io.Writer) { w.Write(signed) })
	}
	return o.show(cmd.OutOrStdout(), view, func(w io.Writer) {
		fmt.Fprintln(w, "VALID: signed by the keybroker")
		view.(checkpointView).print(w)
		if out != "" {
			fmt.Fprintf(w, "written to  %s\n", out)
		}
	})
}

func newLogProveConsistencyCmd() *cobra.Command {
	var (
		o         brokerOpts
		trust     logTrust
		witnessed bool
	)
	cmd := &cobra.Command{
		Use:   "prove-consistency OLD [NEW] --pub keybroker.pub",
		Short: "Check that a newer checkpoint extends one you pinned",
		Long: `prove-consistency verifies the signed checkpoints OLD and NEW (files; NEW "-" or omitted: fetch the
newest from the keybroker), fetches the consistency proof between them, and checks that the log
of NEW has the log of OLD as its prefix. A checkpoint that does not extend one the same keybroker
signed earlier proves that it rewrote its log or shows different parties different logs: it
then exits 1 saying so. Witness requirements (--witness, --min-witnesses) apply to NEW.`,
		Example: `  lethectl log prove-consistency pinned.checkpoint --pub keybroker.pub
  lethectl log prove-consistency old.checkpoint new.checkpoint --pub keybroker.pub`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := trust.load()
			if err != nil {
				return err
			}
			oldSigned, err := readCheckpointFile(args[0], cmd.InOrStdin())
			if err != nil {
				return err
			}
			old, err := v.openLogOnly(oldSigned)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			c := &lazyKeybroker{o: &o}
			defer c.close()
			ctx, cancel := o.callCtx(cmd.Context())
			defer cancel()
			var newSigned []byte
			if len(args) == 2 && args[1] != "-" {
				newSigned, err = readCheckpointFile(args[1], cmd.InOrStdin())
			} else if newSigned, err = c.LogCheckpoint(ctx, witnessed); err != nil {
				err = fmt.Errorf("fetching the log's checkpoint: %w", err)
			}
			if err != nil {
				return err
			}
			next, err := v.open(newSigned)
			if err != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "INVALID: the newer checkpoint: %v\n", err)
				return &exitError{code: 1}
			}
			if _, err := extends(ctx, c, old, next); err != nil {
				if errors.Is(err, tlog.ErrInconsistent) {
					fmt.Fprintln(cmd.ErrOrStderr(), inconsistency(err, old, next))
					return &exitError{code: 1}
				}
				return err
			}
			result := struct {
				Old checkpointView `json:"old"`
				New checkpointView `json:"new"`
			}{viewCheckpoint(old), viewCheckpoint(next)}
			return o.show(cmd.OutOrStdout(), result, func(w io.Writer) {
				fmt.Fprintf(w, "CONSISTENT: the log of size %d extends the log of size %d\n", next.Size, old.Size)
				result.New.print(w)
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	addLogTrustFlags(cmd, &trust, true)
	cmd.Flags().BoolVar(&witnessed, "witnessed", false, "when fetching NEW: the newest checkpoint a witness cosigned")
	return cmd
}

func newLogWitnessCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "witness",
		Short: "Run a witness that cosigns the log's checkpoints only while each extends the last",
		Long: `A witness keeps the last checkpoint it cosigned. It cosigns a newer one only after checking the
consistency proof that it extends that one, so that no two witnessed checkpoints can disagree: a
keybroker that forks its log for some tenants cannot have both forks witnessed. Give the verifier
key that keygen prints to the keybroker (its log-witness setting) and to the tenants that require
this witness (--witness).`,
	}
	cmd.AddCommand(newLogWitnessKeygenCmd(), newLogWitnessRunCmd())
	return cmd
}

// witnessKeyHeader begins a witness's private key file: one line,
// "lethe-witness-key NAME SEED", SEED the base64 of the 32-byte Ed25519 seed.
const witnessKeyHeader = "lethe-witness-key"

// writeWitnessKey creates the private key file of a new witness (mode 0600; an existing file
// is never overwritten) and returns its signer.
func writeWitnessKey(path, name string) (*tlog.WitnessSigner, error) {
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		return nil, err
	}
	w, err := tlog.NewWitnessSigner(name, priv, nil)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("writing witness key: %w", err)
	}
	_, err = fmt.Fprintf(f, "%s %s %s\n", witnessKeyHeader, name, base64.StdEncoding.EncodeToString(priv.Seed()))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("writing witness key: %w", err)
	}
	return w, nil
}

// readWitnessKey reads a witness's private key file (writeWitnessKey).
func readWitnessKey(path string) (*tlog.WitnessSigner, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading witness key: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) != 3 || f[0] != witnessKeyHeader {
		return nil, fmt.Errorf("witness key %s: want one line %q", path, witnessKeyHeader+" NAME SEED")
	}
	seed, err := base64.StdEncoding.DecodeString(f[2])
	if err != nil || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("witness key %s: the seed is not %d bytes in base64", path, ed25519.SeedSize)
	}
	return tlog.NewWitnessSigner(f[1], ed25519.NewKeyFromSeed(seed), nil)
}

func newLogWitnessKeygenCmd() *cobra.Command {
	var name, out, output string
	cmd := &cobra.Command{
		Use:   "keygen --name NAME --out FILE",
		Short: "Make a witness's key; print its verifier key",
		Long: `keygen writes a new witness's private key to --out (mode 0600, never over an existing file) and
prints its verifier key, "NAME+HASH+KEY": give it to the keybroker (log-witness) and to tenants
(--witness). The key file is one line, "lethe-witness-key NAME SEED", SEED the base64 of the
32-byte Ed25519 seed: keep it secret.`,
		Example: `  lethectl log witness keygen --name witness.example.org --out witness.key`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			w, err := writeWitnessKey(out, name)
			if err != nil {
				return err
			}
			res := struct {
				Name        string `json:"name"`
				VerifierKey string `json:"verifierKey"`
				KeyFile     string `json:"keyFile"`
			}{w.Name(), w.VerifierKey(), out}
			o := brokerOpts{output: output}
			return o.show(cmd.OutOrStdout(), res, func(wr io.Writer) {
				fmt.Fprintf(wr, "wrote %s (secret)\nverifier key (for log-witness and --witness):\n%s\n", out, res.VerifierKey)
			})
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the witness's name, without spaces or '+', such as witness.example.org (required)")
	cmd.Flags().StringVar(&out, "out", "", "the private key file to create (required)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	_ = cmd.MarkFlagRequired("name")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

// witness cosigns the log's checkpoints, each only if it extends the last one it stored.
type witness struct {
	src    logSource
	log    *verifier
	signer *tlog.WitnessSigner
	self   *tlog.WitnessVerifier
	state  string
	out    io.Writer
}

// round fetches the newest checkpoint, checks it against the stored one and cosigns it. It
// returns an error wrapping tlog.ErrInconsistent, without cosigning and leaving the state as
// it was, when the checkpoint does not extend the stored one.
func (w *witness) round(ctx context.Context) error {
	signed, err := w.src.LogCheckpoint(ctx, false)
	if err != nil {
		return fmt.Errorf("fetching the log's checkpoint: %w", err)
	}
	next, err := w.log.openLogOnly(signed)
	if err != nil {
		return fmt.Errorf("verifying the log's checkpoint: %w", err)
	}
	prevSize := uint64(0)
	if stored, err := os.ReadFile(w.state); err == nil {
		prev, err := w.log.openLogOnly(stored)
		if err != nil {
			return fmt.Errorf("the witness's state %s: %w", w.state, err)
		}
		if _, err := extends(ctx, w.src, prev, next); err != nil {
			if errors.Is(err, tlog.ErrInconsistent) {
				return fmt.Errorf("refusing to cosign: %w", inconsistency(err, prev, next))
			}
			return err
		}
		prevSize = prev.Size
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("reading the witness's state: %w", err)
	}
	result := signed
	if _, err := w.log.openWith(signed, []*tlog.WitnessVerifier{w.self}, 1); errors.Is(err, tlog.ErrTooFewWitnesses) {
		cosigned, err := note.Sign(&note.Note{Text: next.Text()}, w.signer)
		if err != nil {
			return fmt.Errorf("cosigning: %w", err)
		}
		if result, err = w.src.LogCosign(ctx, cosigned); err != nil {
			return fmt.Errorf("submitting the cosignature of size %d: %w", next.Size, err)
		}
		back, err := w.log.openWith(result, []*tlog.WitnessVerifier{w.self}, 1)
		if err != nil || back.Size != next.Size || !bytes.Equal(back.Root, next.Root) {
			return fmt.Errorf("the keybroker answered the cosignature of size %d with another checkpoint or without it: %w", next.Size, err)
		}
	}
	if err := writeFileAtomic(w.state, result, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(w.out, "%s cosigned size %d root %s (previous size %d)\n", time.Now().UTC().Format(time.RFC3339), next.Size, base64.StdEncoding.EncodeToString(next.Root), prevSize)
	return nil
}

// run cosigns every interval until ctx ends, each round bounded by timeout. Errors of fetching
// are reported and retried; an inconsistent log ends it.
func (w *witness) run(ctx context.Context, interval, timeout time.Duration, errOut io.Writer) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		rctx, cancel := context.WithTimeout(ctx, timeout)
		err := w.round(rctx)
		cancel()
		if errors.Is(err, tlog.ErrInconsistent) {
			return err
		}
		if err != nil {
			fmt.Fprintf(errOut, "lethectl: %v\n", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func newLogWitnessRunCmd() *cobra.Command {
	var (
		o              brokerOpts
		trust          logTrust
		keyFile, state string
		once           bool
		interval       time.Duration
	)
	cmd := &cobra.Command{
		Use:   "run --key FILE --state FILE --pub keybroker.pub",
		Short: "Cosign the log's newest checkpoint when it extends the last one cosigned",
		Long: `run fetches the log's newest checkpoint, verifies the keybroker's signature, and, if --state holds
the checkpoint it cosigned last, fetches the consistency proof and checks that the new one extends
it. Only then it cosigns (C2SP tlog-cosignature), sends the cosignature to the keybroker and
stores the new checkpoint in --state (replaced atomically). A checkpoint that does not extend the
stored one is never cosigned: run exits 1 saying so, and the state is kept as evidence.

It repeats every --interval until interrupted; with --once it does one round and exits, non-zero
if the round failed.`,
		Example: `  lethectl log witness run --key witness.key --state witness.state --pub keybroker.pub --interval 1m`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if interval <= 0 {
				return errors.New("--interval must be positive")
			}
			v, err := trust.load()
			if err != nil {
				return err
			}
			signer, err := readWitnessKey(keyFile)
			if err != nil {
				return err
			}
			self, err := tlog.ParseWitnessKey(signer.VerifierKey())
			if err != nil {
				return err
			}
			c, closeFn, err := o.keybroker()
			if err != nil {
				return err
			}
			defer closeFn()
			w := &witness{src: c, log: v, signer: signer, self: self, state: state, out: cmd.OutOrStdout()}
			if once {
				ctx, cancel := o.callCtx(cmd.Context())
				defer cancel()
				return w.round(ctx)
			}
			return w.run(cmd.Context(), interval, o.Timeout, cmd.ErrOrStderr())
		},
	}
	addNATSFlags(cmd.Flags(), &o)
	cmd.Flags().StringVar(&o.Tenant, "tenant", "", "connect as this tenant; empty: as an operator (env LETHE_TENANT)")
	cmd.Flags().DurationVar(&o.Timeout, "timeout", 30*time.Second, "timeout of one round")
	addLogKeyFlags(cmd, &trust, true)
	cmd.Flags().StringVar(&keyFile, "key", "", "the witness's private key file (log witness keygen) (required)")
	cmd.Flags().StringVar(&state, "state", "", "the file holding the last checkpoint cosigned (required)")
	cmd.Flags().BoolVar(&once, "once", false, "one round, then exit")
	cmd.Flags().DurationVar(&interval, "interval", time.Minute, "time between rounds")
	_ = cmd.MarkFlagRequired("key")
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

// historyBundle is what guests history fetched, saved (--bundle) so that it verifies offline
// (--from-bundle) with nothing but the keybroker's public key and the pinned checkpoint.
type historyBundle struct {
	History *tlog.History `json:"history"`
	// Consistency proves that the history's checkpoint and the pinned one are of one log.
	Consistency *consistencyProof `json:"consistency,omitempty"`
}

// consistencyProof is the proof that the log of From entries is a prefix of the log of To.
type consistencyProof struct {
	From  uint64   `json:"from"`
	To    uint64   `json:"to"`
	Proof [][]byte `json:"proof"`
}

// bundleSource answers from a bundle, offline.
type bundleSource struct{ b *historyBundle }

func (s bundleSource) LogHistory(context.Context, string, string, bool) (*tlog.History, error) {
	if s.b.History == nil {
		return nil, errors.New("the bundle holds no history")
	}
	return s.b.History, nil
}

func (s bundleSource) LogConsistency(_ context.Context, from, to uint64) ([][]byte, error) {
	if c := s.b.Consistency; c != nil && c.From == from && c.To == to {
		return c.Proof, nil
	}
	return nil, fmt.Errorf("the bundle holds no consistency proof from size %d to %d (it was saved without that --pinned checkpoint)", from, to)
}

func (bundleSource) LogCheckpoint(context.Context, bool) ([]byte, error) {
	return nil, errors.New("offline: the bundle holds no newer checkpoint")
}

func (bundleSource) LogCosign(context.Context, []byte) ([]byte, error) {
	return nil, errors.New("offline: cannot cosign")
}

// recordingSource records the consistency proof it fetched, for a bundle.
type recordingSource struct {
	logSource
	proof *consistencyProof
}

func (s *recordingSource) LogConsistency(ctx context.Context, from, to uint64) ([][]byte, error) {
	p, err := s.logSource.LogConsistency(ctx, from, to)
	if err == nil {
		s.proof = &consistencyProof{From: from, To: to, Proof: p}
	}
	return p, err
}

// historyCheck is what guests history checks.
type historyCheck struct {
	tenant, vm string
	witnessed  bool
	// trust, when set, verifies the history; nil only fetches it.
	trust *verifier
	// pinned is a file holding a checkpoint the history's must be consistent with; with
	// updatePinned it is replaced by the history's checkpoint once everything verified (and
	// created if it does not exist).
	pinned       string
	updatePinned bool
}

// historyOutcome is what guests history found.
type historyOutcome struct {
	History *tlog.History
	Entries []*tlog.Entry
	// Checkpoint is the verified checkpoint; nil when not verified.
	Checkpoint *tlog.Signed
	Report     *tlog.HistoryReport
	// Failure says why the history did not verify; nil when it did (or was not verified).
	Failure error
	// PinMoved says that the pinned file now holds the history's checkpoint.
	PinMoved bool
}

// checkHistory fetches a guest's history from src and, with c.trust, verifies it: the
// checkpoint's signatures, its consistency with the pinned one, and the guest's chain
// (tlog.VerifyHistory). A history that does not verify is an outcome with Failure; the error
// is for what kept it from being checked.
func checkHistory(ctx context.Context, src logSource, c historyCheck) (*historyOutcome, error) {
	h, err := src.LogHistory(ctx, c.tenant, c.vm, c.witnessed)
	if err != nil {
		return nil, fmt.Errorf("fetching the history of %s/%s: %w", c.tenant, c.vm, err)
	}
	out := &historyOutcome{History: h}
	for _, pe := range h.Entries {
		e, err := tlog.ParseEntry(pe.Leaf)
		if err != nil {
			e = nil
		}
		out.Entries = append(out.Entries, e)
	}
	if h.Tenant != c.tenant || h.VM != c.vm {
		out.Failure = fmt.Errorf("the history is of %s/%s, not %s/%s", h.Tenant, h.VM, c.tenant, c.vm)
		return out, nil
	}
	if c.trust == nil {
		return out, nil
	}
	cp, err := c.trust.open(h.Checkpoint)
	if err != nil {
		out.Failure = fmt.Errorf("the history's checkpoint: %w", err)
		return out, nil
	}
	out.Checkpoint = cp
	var pin *tlog.Signed
	if c.pinned != "" {
		b, err := os.ReadFile(c.pinned)
		switch {
		case errors.Is(err, os.ErrNotExist) && c.updatePinned:
		case err != nil:
			return nil, fmt.Errorf("reading the pinned checkpoint: %w", err)
		default:
			if pin, err = c.trust.openLogOnly(b); err != nil {
				return nil, fmt.Errorf("the pinned checkpoint %s: %w", c.pinned, err)
			}
			// A witnessed checkpoint may be older than the pin: then the pin must extend it.
			older, newer := pin, cp
			if cp.Size < pin.Size {
				older, newer = cp, pin
			}
			if _, err := extends(ctx, src, older, newer); err != nil {
				if !errors.Is(err, tlog.ErrInconsistent) {
					return nil, err
				}
				out.Failure = inconsistency(err, older, newer)
				return out, nil
			}
		}
	}
	out.Report, err = tlog.VerifyHistory(cp, h)
	if err != nil {
		out.Failure = err
		return out, nil
	}
	if c.updatePinned && (pin == nil || cp.Size > pin.Size) {
		if err := writeFileAtomic(c.pinned, h.Checkpoint, 0o644); err != nil {
			return nil, err
		}
		out.PinMoved = true
	}
	return out, nil
}

// historyView is guests history's JSON output.
type historyView struct {
	Tenant     string           `json:"tenant"`
	VM         string           `json:"vm"`
	Checkpoint *checkpointView  `json:"checkpoint,omitempty"`
	Entries    []entryView      `json:"entries"`
	Verified   bool             `json:"verified"`
	Live       uint64           `json:"liveEpoch,omitempty"`
	Residences []tlog.Residency `json:"residencies,omitempty"`
	InProgress []string         `json:"inProgress,omitempty"`
	Denials    int              `json:"denials,omitempty"`
	Problems   []string         `json:"problems,omitempty"`
	PinMoved   bool             `json:"pinMoved,omitempty"`
}

// entryView is an entry with its index; Entry is nil for a leaf that does not decode.
type entryView struct {
	Index uint64 `json:"index"`
	*tlog.Entry
}

func (h *historyOutcome) view(verify bool) historyView {
	v := historyView{Tenant: h.History.Tenant, VM: h.History.VM, Entries: []entryView{}, PinMoved: h.PinMoved}
	for i, pe := range h.History.Entries {
		v.Entries = append(v.Entries, entryView{Index: pe.Index, Entry: h.Entries[i]})
	}
	if h.Checkpoint != nil {
		cv := viewCheckpoint(h.Checkpoint)
		v.Checkpoint = &cv
	}
	if h.Failure != nil {
		v.Problems = strings.Split(h.Failure.Error(), "\n")
	}
	if h.Report != nil {
		v.Live, v.Residences, v.InProgress, v.Denials = h.Report.Live, h.Report.Residencies, h.Report.InProgress, h.Report.Denials
	}
	v.Verified = verify && h.Failure == nil
	return v
}

// printHistory prints the entries as a table, then the verdict.
func (h *historyOutcome) print(w io.Writer, verify bool) {
	table(w, "SEQ\tINDEX\tKIND\tMIGRATION\tEPOCHS\tHOST\tOUTCOME\tTIME", func(tw io.Writer) {
		for i, pe := range h.History.Entries {
			e := h.Entries[i]
			if e == nil {
				fmt.Fprintf(tw, "?\t%d\t(undecodable)\t\t\t\t\t\n", pe.Index)
				continue
			}
			outcome, epochs := e.Outcome, fmt.Sprintf("%d->%d", e.FromEpoch, e.ToEpoch)
			if e.Kind == tlog.KindDeny {
				outcome, epochs = "denied "+e.Op+": "+strings.Join(e.Reasons, "; "), "-"
			}
			fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Seq, pe.Index, e.Kind, e.MigrationID, epochs, e.Host, outcome, e.Time.Format(time.RFC3339))
		}
	})
	if h.Failure != nil {
		for _, line := range strings.Split(h.Failure.Error(), "\n") {
			fmt.Fprintf(w, "INVALID: %s\n", line)
		}
		return
	}
	if !verify {
		fmt.Fprintln(w, "(not verified: give --verify and --pub)")
		return
	}
	cp, rep := h.Checkpoint, h.Report
	ws := ""
	if len(cp.Witnesses) > 0 {
		ws = ", witnessed by " + strings.Join(cp.Witnesses, ", ")
	}
	fmt.Fprintf(w, "VERIFIED: %d entries of %s/%s, complete from its first, in log %s of size %d (root %s%s)\n",
		len(h.Entries), h.History.Tenant, h.History.VM, cp.Origin, cp.Size, base64.StdEncoding.EncodeToString(cp.Root), ws)
	if rep.Live == 0 {
		fmt.Fprintln(w, "live epoch  none (not adopted)")
	} else {
		fmt.Fprintf(w, "live epoch  %d\n", rep.Live)
	}
	for _, r := range rep.Residencies {
		ended := "live"
		if r.Ended != "" {
			ended = "ended by " + r.Ended + ", its keys destroyed"
		}
		fmt.Fprintf(w, "epoch %-5d on %s (began with %s), %s\n", r.Epoch, strings.Join(r.Hosts, ", "), r.Began, ended)
	}
	for _, m := range rep.InProgress {
		fmt.Fprintf(w, "in progress %s (released, not ended)\n", m)
	}
	fmt.Fprintf(w, "denials     %d\n", rep.Denials)
	if h.PinMoved {
		fmt.Fprintln(w, "pinned checkpoint updated")
	}
}

// guestAuditView is one guest of an audit, as printed.
type guestAuditView struct {
	Tenant      string   `json:"tenant"`
	VM          string   `json:"vm"`
	Entries     int      `json:"entries"`
	NewestSeq   uint64   `json:"newestSeq"`
	NewestIndex uint64   `json:"newestIndex"`
	LiveEpoch   uint64   `json:"liveEpoch"`
	InProgress  []string `json:"inProgress,omitempty"`
	Problems    []string `json:"problems,omitempty"`
}

func newLogAuditCmd() *cobra.Command {
	var (
		o            brokerOpts
		trust        logTrust
		pinned       string
		updatePinned bool
		guest        string
	)
	cmd := &cobra.Command{
		Use:   "audit --pub keybroker.pub [--pinned FILE] [--guest TENANT/VM]",
		Short: "Monitor the whole residency log: every guest's history, complete",
		Long: `audit is the log's monitor: it fetches the newest checkpoint and every leaf of the log (operators
only: the leaves name every tenant's guests), checks that the leaves hash to the checkpoint's root
and, with --pinned, that the log extends the checkpoint pinned before; then it verifies every
guest's history from the log itself, so that nothing can be withheld from it. It prints each
guest's number of entries and newest seq: a tenant whose own history (guests history) ends
earlier under the same checkpoint was shown less than the log holds. It exits 1 if any guest's
history is not complete, naming each problem. --update-pinned moves the pin after a clean audit.`,
		Example: `  lethectl log audit --pub keybroker.pub --pinned monitor.checkpoint --update-pinned
  lethectl log audit --pub keybroker.pub --guest acme/web -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if updatePinned && pinned == "" {
				return errors.New("--update-pinned needs --pinned")
			}
			if err := o.resolve(); err != nil {
				return err
			}
			if o.Tenant != "" {
				return fmt.Errorf("log audit reads every tenant's entries: operators only (you act as tenant %s: unset --tenant and LETHE_TENANT)", o.Tenant)
			}
			v, err := trust.load()
			if err != nil {
				return err
			}
			c := &lazyKeybroker{o: &o}
			defer c.close()
			ctx, cancel := o.callCtx(cmd.Context())
			defer cancel()
			signed, err := c.LogCheckpoint(ctx, false)
			if err != nil {
				return fmt.Errorf("fetching the log's checkpoint: %w", err)
			}
			cp, err := v.open(signed)
			if err != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "INVALID: the log's checkpoint: %v\n", err)
				return &exitError{code: 1}
			}
			if pinned != "" {
				pinSigned, err := readCheckpointFile(pinned, cmd.InOrStdin())
				if err != nil {
					return err
				}
				pin, err := v.openLogOnly(pinSigned)
				if err != nil {
					return fmt.Errorf("%s: %w", pinned, err)
				}
				if _, err := extends(ctx, c, pin, cp); err != nil {
					if errors.Is(err, tlog.ErrInconsistent) {
						fmt.Fprintln(cmd.ErrOrStderr(), inconsistency(err, pin, cp))
						return &exitError{code: 1}
					}
					return err
				}
			}
			leaves, err := c.LogEntries(ctx, 0, cp.Size)
			if err != nil {
				return fmt.Errorf("fetching the log's leaves: %w", err)
			}
			rep, auditErr := tlog.Audit(cp, leaves)
			if rep == nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "INVALID: %v\n", auditErr)
				return &exitError{code: 1}
			}
			var views []guestAuditView
			for _, g := range rep.Guests {
				if guest != "" && g.Tenant+"/"+g.VM != guest {
					continue
				}
				gv := guestAuditView{Tenant: g.Tenant, VM: g.VM, Entries: g.Entries, NewestSeq: g.NewestSeq, NewestIndex: g.NewestIndex}
				if g.Report != nil {
					gv.LiveEpoch, gv.InProgress = g.Report.Live, g.Report.InProgress
				}
				if g.Err != nil {
					gv.Problems = problems(g.Err)
				}
				views = append(views, gv)
			}
			if guest != "" && len(views) == 0 {
				return fmt.Errorf("the log of size %d has no entry of %s", cp.Size, guest)
			}
			result := struct {
				Checkpoint checkpointView   `json:"checkpoint"`
				Guests     []guestAuditView `json:"guests"`
			}{viewCheckpoint(cp), views}
			if err := o.show(cmd.OutOrStdout(), result, func(w io.Writer) {
				tw := tabwriter.NewWriter(w, 0, 2, 2, ' ', 0)
				fmt.Fprintln(tw, "GUEST\tENTRIES\tNEWEST SEQ\tNEWEST INDEX\tLIVE EPOCH\tSTATUS")
				for _, g := range views {
					status := "complete"
					if len(g.InProgress) > 0 {
						status = "complete, in progress: " + strings.Join(g.InProgress, ",")
					}
					if len(g.Problems) > 0 {
						status = fmt.Sprintf("INVALID (%d problems)", len(g.Problems))
					}
					fmt.Fprintf(tw, "%s/%s\t%d\t%d\t%d\t%d\t%s\n", g.Tenant, g.VM, g.Entries, g.NewestSeq, g.NewestIndex, g.LiveEpoch, status)
				}
				tw.Flush()
				for _, g := range views {
					for _, p := range g.Problems {
						fmt.Fprintf(w, "INVALID: %s/%s: %s\n", g.Tenant, g.VM, p)
					}
				}
				if others := failedElsewhere(rep, guest); others > 0 {
					fmt.Fprintf(w, "INVALID: %d other guests' histories are not complete (run without --guest)\n", others)
				}
				fmt.Fprintf(w, "audited %d entries of %d guests in log %s of size %d\n", cp.Size, len(rep.Guests), cp.Origin, cp.Size)
			}); err != nil {
				return err
			}
			if auditErr != nil {
				return &exitError{code: 1}
			}
			if updatePinned {
				if err := writeFileAtomic(pinned, cp.Note, 0o644); err != nil {
					return err
				}
			}
			return nil
		},
	}
	addBrokerFlags(cmd, &o, true)
	addLogTrustFlags(cmd, &trust, true)
	cmd.Flags().StringVar(&pinned, "pinned", "", "a checkpoint pinned before (log checkpoint --out): the log must extend it")
	cmd.Flags().BoolVar(&updatePinned, "update-pinned", false, "write the audited checkpoint to --pinned once every history verified")
	cmd.Flags().StringVar(&guest, "guest", "", "show only this guest (TENANT/VM); every guest is still verified")
	return cmd
}

// failedElsewhere counts the guests whose history failed, other than the one shown.
func failedElsewhere(rep *tlog.AuditReport, shown string) int {
	if shown == "" {
		return 0
	}
	n := 0
	for _, g := range rep.Guests {
		if g.Err != nil && g.Tenant+"/"+g.VM != shown {
			n++
		}
	}
	return n
}

// problems splits a joined error into its lines.
func problems(err error) []string {
	var out []string
	for _, l := range strings.Split(err.Error(), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}
