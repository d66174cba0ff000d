package keybroker

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/trace"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// Errors of the keybroker's API. Each method documents which it returns; all are wrapped, so
// match them with errors.Is.
var (
	// ErrUnauthorized: an admin call not signed by the admin key, expired or replayed, or one
	// the admin may not make (re-keying a registered tenant); a key rotation not signed by
	// the tenant's current key or its recovery key.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrInvalidRequest: a malformed request (names, missing evidence, bad keys).
	ErrInvalidRequest = errors.New("invalid request")
	// ErrEvidenceRejected: evidence did not verify or is not bound to the expected context
	// (migration, role, nonce, HPKE key, statement). attest.ReasonOf names what failed.
	ErrEvidenceRejected = errors.New("evidence rejected")
	// ErrPolicyRejected: the signed policy is not acceptable: bad signature, another tenant,
	// a selector (spec.guests) that does not cover the guest, or a policySvn below the floor
	// the tenant published for the policy's name (rollback).
	ErrPolicyRejected = errors.New("policy rejected")
	// ErrDenied: the tenant's policy denies the migration or adoption; the error lists the
	// failing rules.
	ErrDenied = errors.New("denied by policy")
	// ErrUnknownTenant: the tenant is not registered.
	ErrUnknownTenant = errors.New("unknown tenant")
	// ErrNotAdopted: the guest has no residency yet (see Adopt).
	ErrNotAdopted = errors.New("guest not adopted")
	// ErrAlreadyAdopted: Adopt for a guest that already has a residency.
	ErrAlreadyAdopted = errors.New("guest already adopted")
	// ErrGuestBusy: another migration of the guest is in progress, or its record changed
	// concurrently.
	ErrGuestBusy = errors.New("guest busy")
	// ErrUnknownMigration: no released migration of that ID for the guest.
	ErrUnknownMigration = errors.New("unknown migration")
	// ErrBothEpochs: the request would destroy both epochs of a guest (abort after commit,
	// commit after abort, or a plan naming the live epoch), so it is refused.
	ErrBothEpochs = errors.New("refusing to destroy both epochs of a guest")
	// ErrUnproven: a commit without the proof that lets the source's keys go: no commit
	// acknowledgement, or one whose MAC does not verify under the migration's transfer key;
	// or no erasure evidence from the source, or evidence the tenant's policy does not
	// accept, and the request did not ask for an unverified erasure (see DestroyRequest).
	ErrUnproven = errors.New("not proven")
	// ErrErasureRejected: a commit whose source's erasure evidence is genuine and from the
	// released source but does not satisfy the tenant's policy (its erasure rules); asked again
	// with UnverifiedErasure, the commit goes on and the receipt says
	// committed-unverified-erasure with the policy's reasons. It wraps ErrUnproven.
	ErrErasureRejected = fmt.Errorf("erasure evidence not accepted by the policy: %w", ErrUnproven)
	// ErrDestructionPending: Vault could not be reached to destroy keys; the destruction is
	// journaled and retried by Run until it completes, and the receipt waits for it
	// (AwaitReceipt). It wraps ErrVaultUnavailable.
	ErrDestructionPending = errors.New("destruction pending")
)

// ReceiptSigningKey is the Transit key (type ed25519) that signs receipts.
const ReceiptSigningKey = "lethe-receipt-signing"

// EvidenceVerifier verifies evidence against an expectation; *attest.Verifier satisfies it.
type EvidenceVerifier interface {
	Verify(ctx context.Context, ev *attest.Evidence, want attest.Expectation) (*attest.Claims, error)
}

// AppRole is an AppRole login.
type AppRole struct {
	// Mount is the AppRole auth mount. Empty: "approle".
	Mount    string
	RoleID   string
	SecretID string
}

// Config configures a Keybroker.
type Config struct {
	// Vault is the Vault client (address, TLS, timeouts). Required. With AppRole nil, its
	// token is used (token auth) and renewed by Run while renewable.
	Vault *api.Client
	// AppRole, if set, logs in with AppRole (before the first call and whenever the token
	// cannot be renewed any more). Nil: token auth.
	AppRole *AppRole
	// TransitMount is the Transit secrets engine's mount. Empty: "transit".
	TransitMount string
	// KVMount is the KV v2 mount holding tenants, guests and receipts. Empty: "lethe".
	KVMount string

	// Verifier verifies evidence. Required; *attest.Verifier in production.
	Verifier EvidenceVerifier
	// Policy verifies and evaluates signed policies. Nil: package policy. Whatever the gate,
	// the keybroker refuses a decision whose Guests do not cover the guest or whose SVN is below
	// the floor of (tenant, Name).
	Policy PolicyGate
	// Audit receives one event per release, adoption, denial and destruction. Nil: SlogAudit
	// on Logger.
	Audit AuditSink
	// Logger is for operational logs. Nil: slog.Default().
	Logger *slog.Logger

	// AdminKey is the operator's admin public key (Ed25519): admin calls (RegisterTenant) are
	// statements signed with its private key, each valid for at most
	// kbwire.MaxAdminValidity and accepted once. Nil: admin calls are refused.
	AdminKey ed25519.PublicKey
	// StateDir holds the destruction journal (one file per pending destruction). Empty: the
	// journal is kept in memory only, and a destruction pending when the process ends is lost
	// (tests only; cmd/lethe-keybroker requires a directory).
	StateDir string

	// NonceTTL is how long a nonce stays valid. Zero: 60 s. Keybrokers sharing a Vault
	// should share it: one accepts another's nonce only if it expires within its own TTL
	// plus a minute of clock skew.
	NonceTTL time.Duration
	// MaxNonces bounds the live nonces this keybroker has issued (and so the marks of used
	// nonces it can cause in Vault). Zero: 65536.
	MaxNonces int
	// RetryInterval is how often Run retries pending destructions. Zero: 5 s.
	RetryInterval time.Duration
	// Now is the clock. Nil: time.Now.
	Now func() time.Time
	// Metrics receives the keybroker's measurements. Nil: none are taken.
	Metrics Metrics
	// Tracer records a span for each release and destruction (commit or abort) in the
	// migration's trace (internal/trace). Nil: no tracing.
	Tracer *trace.Tracer

	// LogOrigin names the residency log in its checkpoints (C2SP origin: a unique name
	// without spaces or '+', such as "kb.example.com/lethe"); tenants verify checkpoints
	// against it and the receipt-signing key. Keybrokers on one Vault must share it. Empty:
	// DefaultLogOrigin.
	LogOrigin string
	// LogCheckpointInterval is how often Run signs a checkpoint of the residency log when it
	// has grown: entries not yet under a signed checkpoint could be rewritten by whoever can
	// write to the KV mount, so this bounds that window. Zero: 1 s.
	LogCheckpointInterval time.Duration
	// LogWitnesses are the verifier keys (tlog.WitnessSigner.VerifierKey) of the witnesses
	// whose cosignatures the keybroker stores with its checkpoints. Nil: none.
	LogWitnesses []string
}

// Keybroker releases and destroys guests' keys. It is safe for concurrent use.
type Keybroker struct {
	cfg    Config
	log    *slog.Logger
	audit  AuditSink
	policy PolicyGate
	keys   keyStore
	recs   recordStore
	vault  *api.Client
	nonces *nonceStore
	jnl    *journal
	rlog   *residencyLog
	now    func() time.Time

	// floors are the policySvn floors loadTenant read last, per tenant (see floorCache).
	floors floorCache

	authMu sync.Mutex

	signMu  sync.Mutex
	signPub ed25519.PublicKey
}

// New returns a Keybroker for cfg. It does no I/O beyond loading the journal from StateDir.
func New(cfg Config) (*Keybroker, error) {
	if cfg.Vault == nil {
		return nil, errors.New("configuring keybroker: no Vault client")
	}
	if cfg.Verifier == nil {
		return nil, errors.New("configuring keybroker: no evidence verifier")
	}
	if cfg.AppRole != nil && (cfg.AppRole.RoleID == "" || cfg.AppRole.SecretID == "") {
		return nil, errors.New("configuring keybroker: AppRole needs a role ID and a secret ID")
	}
	if cfg.TransitMount == "" {
		cfg.TransitMount = "transit"
	}
	if cfg.KVMount == "" {
		cfg.KVMount = "lethe"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.NonceTTL == 0 {
		cfg.NonceTTL = 60 * time.Second
	}
	if cfg.MaxNonces == 0 {
		cfg.MaxNonces = 1 << 16
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = 5 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.LogCheckpointInterval < 0 {
		return nil, fmt.Errorf("configuring keybroker: log checkpoint interval %v is negative", cfg.LogCheckpointInterval)
	}
	if cfg.LogCheckpointInterval == 0 {
		cfg.LogCheckpointInterval = time.Second
	}
	if cfg.Metrics == nil {
		cfg.Metrics = noMetrics{}
	}
	k := &Keybroker{
		cfg:   cfg,
		log:   cfg.Logger.With(attrComponent, "keybroker"),
		vault: cfg.Vault,
		now:   cfg.Now,
	}
	k.audit = cfg.Audit
	if k.audit == nil {
		k.audit = SlogAudit{Logger: k.log}
	}
	gate := cfg.Policy
	if gate == nil {
		gate = &policyPackage{}
	}
	k.policy = &tenantGate{inner: gate, floors: &k.floors}
	if cfg.AdminKey != nil && len(cfg.AdminKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("configuring keybroker: admin key is %d bytes, want %d", len(cfg.AdminKey), ed25519.PublicKeySize)
	}
	vc := &vaultClient{c: cfg.Vault, transit: cfg.TransitMount, kv: cfg.KVMount, metrics: cfg.Metrics}
	k.keys, k.recs = vc, vc
	if cfg.LogOrigin == "" {
		cfg.LogOrigin = DefaultLogOrigin
	}
	if _, err := tlog.ParseCheckpoint(tlog.Checkpoint{Origin: cfg.LogOrigin, Root: make([]byte, 32)}.Text()); err != nil {
		return nil, fmt.Errorf("configuring keybroker: log origin %q: no spaces or '+'", cfg.LogOrigin)
	}
	k.rlog = &residencyLog{
		recs: vc, origin: cfg.LogOrigin,
		sign: func(ctx context.Context, msg []byte) ([]byte, error) { return vc.sign(ctx, ReceiptSigningKey, msg) },
		pub:  k.signingKey,
	}
	for _, w := range cfg.LogWitnesses {
		v, err := tlog.ParseWitnessKey(w)
		if err != nil {
			return nil, fmt.Errorf("configuring keybroker: %w", err)
		}
		k.rlog.witnesses = append(k.rlog.witnesses, v)
	}
	k.nonces = newNonceStore(cfg.Now, cfg.NonceTTL, cfg.MaxNonces, &vaultNonces{keys: vc, recs: vc})
	var err error
	if k.jnl, err = openJournal(cfg.StateDir); err != nil {
		return nil, fmt.Errorf("configuring keybroker: %w", err)
	}
	return k, nil
}

// Run loads the nonce key, renews the Vault token (or logs in again with AppRole), retries
// pending destructions every RetryInterval, every NonceTTL deletes the marks of used nonces
// that have expired, and every LogCheckpointInterval signs a checkpoint of the residency log
// if it grew, until ctx ends. It returns nil when ctx ends, once the residency log's appends it
// was writing are written (each batch bounded by 30 s).
func (k *Keybroker) Run(ctx context.Context) error {
	if err := k.loadNonceKey(ctx); err != nil {
		k.log.WarnContext(ctx, "Loading the nonce key failed; nonces are refused until it loads", attrError, err.Error())
	}
	var wg sync.WaitGroup
	wg.Go(func() { k.renewLoop(ctx) })
	wg.Go(func() { k.retryLoop(ctx) })
	wg.Go(func() { k.sweepLoop(ctx) })
	wg.Go(func() { k.checkpointLoop(ctx) })
	wg.Wait()
	k.rlog.waitIdle()
	return nil
}

func (k *Keybroker) retryLoop(ctx context.Context) {
	t := time.NewTicker(k.cfg.RetryInterval)
	defer t.Stop()
	for {
		k.retryPending(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// checkpointLoop signs a checkpoint of the residency log every LogCheckpointInterval if the
// log has grown.
func (k *Keybroker) checkpointLoop(ctx context.Context) {
	t := time.NewTicker(k.cfg.LogCheckpointInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := k.rlog.checkpoint(ctx, 0, false); err != nil && ctx.Err() == nil {
			k.log.WarnContext(ctx, "Signing a checkpoint of the residency log failed; retried later", attrError, err.Error())
		}
	}
}

// sweepLoop deletes the marks of expired nonces every NonceTTL; every keybroker sweeps, and
// sweeps of the same marks are harmless.
func (k *Keybroker) sweepLoop(ctx context.Context) {
	t := time.NewTicker(k.cfg.NonceTTL)
	defer t.Stop()
	for {
		err := k.ensureAuth(ctx)
		if err == nil {
			err = k.nonces.sweep(ctx)
		}
		if err != nil && ctx.Err() == nil {
			k.log.WarnContext(ctx, "Sweeping used nonces failed; retried later", attrError, err.Error())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// loadNonceKey loads the nonce key shared by the keybrokers, creating it if none exists.
func (k *Keybroker) loadNonceKey(ctx context.Context) error {
	if err := k.ensureAuth(ctx); err != nil {
		return err
	}
	_, err := k.nonces.macKey(ctx)
	return err
}

// IssueNonce returns a fresh nonce for one role of a migration. Any keybroker sharing this
// one's Vault accepts it, once, until it expires; nonces issued earlier for the same role stay
// valid until theirs. Once the nonce key is loaded (Run loads it), issuing asks Vault nothing.
// It returns ErrInvalidRequest, ErrNonceStoreFull, or an error wrapping ErrVaultUnavailable
// when the nonce key cannot be loaded.
func (k *Keybroker) IssueNonce(ctx context.Context, req kbwire.NonceRequest) (*kbwire.NonceResponse, error) {
	if err := checkID(req.MigrationID); err != nil {
		return nil, fmt.Errorf("issuing nonce: %w", err)
	}
	if !req.Role.Valid() {
		return nil, fmt.Errorf("issuing nonce: role %q: %w", req.Role, ErrInvalidRequest)
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, fmt.Errorf("issuing nonce: %w", err)
	}
	n, exp, err := k.nonces.issue(ctx, req.MigrationID, req.Role)
	if err != nil {
		return nil, err
	}
	return &kbwire.NonceResponse{Nonce: n, Expires: exp}, nil
}

// consumeNonce consumes the nonce of (id, role). It returns the nonce errors or an error
// wrapping ErrVaultUnavailable (then nothing may be released).
func (k *Keybroker) consumeNonce(ctx context.Context, id string, role attest.Role, nonce []byte) error {
	if err := k.ensureAuth(ctx); err != nil {
		return err
	}
	return k.nonces.consume(ctx, id, role, nonce)
}

// Names. Tenants follow policy's alphabet (lowercase letters, digits, dashes); no registered
// tenant may be another's dash-prefix (see RegisterTenant), and epoch keys end in -e<digits>,
// so every epoch key name belongs to one guest.
var (
	tenantRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	vmRE     = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	idRE     = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
)

// reservedTenants would make key names collide with the keybroker's own keys.
var reservedTenants = []string{"mig", "receipt", "nonce"}

func checkTenant(t string) error {
	if !tenantRE.MatchString(t) {
		return fmt.Errorf("tenant %q is not lowercase letters, digits and dashes: %w", t, ErrInvalidRequest)
	}
	for _, r := range reservedTenants {
		if t == r || len(t) > len(r) && t[:len(r)+1] == r+"-" {
			return fmt.Errorf("tenant %q is reserved: %w", t, ErrInvalidRequest)
		}
	}
	return nil
}

func checkGuest(tenant, vm string) error {
	if err := checkTenant(tenant); err != nil {
		return err
	}
	if !vmRE.MatchString(vm) {
		return fmt.Errorf("vm %q is not lowercase letters, digits, '.', '_' and '-': %w", vm, ErrInvalidRequest)
	}
	return nil
}

func checkID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("migration id %q is not letters, digits, '.', '_' and '-' (at most 64): %w", id, ErrInvalidRequest)
	}
	return nil
}

func epochKeyName(tenant, vm string, epoch uint64) string {
	return tlog.EpochKey(tenant, vm, epoch)
}

func migrationKeyName(id string) string { return tlog.MigrationKey(id) }

func tenantPath(tenant string) string       { return "tenants/" + tenant }
func guestPath(tenant, vm string) string    { return "guests/" + tenant + "/" + vm }
func receiptPath(migrationID string) string { return "receipts/" + migrationID }
