package migagent

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// The Node is the agent API's handler.
var _ agentapi.Handler = (*Node)(nil)

// maxNonce bounds a nonce in a request; the keybroker's are attest.NonceSize bytes.
const maxNonce = 64

// maxGuestBytes bounds the memory of a guest a destination agrees to receive.
const maxGuestBytes = 1 << 40

// migration is the node's state of one migration, or of an adoption. Its fields are guarded
// by Node.mu, except the immutable ones (id, role, tenant, vm, g, dst, size).
type migration struct {
	id         string
	role       attest.Role
	tenant, vm string
	size       int64

	// hpke is the migration's ephemeral HPKE key, which its evidence binds: it opens the
	// sealed keys, and in the data-plane handshake it proves to the peer that this is the
	// attested agent. It is zeroized when the transfer (or reception) ends, at once after an
	// adoption's keys are opened, and by an abort. nonce is the keybroker's nonce the
	// evidence was bound to. sealed is the SHA-256 of the sealed keys opened, so that the
	// same delivery can be repeated; grant is the keybroker's signed grant they came with.
	hpke *seal.PrivateKey
	// hpkePubs are the public halves of the HPKE keys the migration attested with, the last
	// one last: its erasure evidence binds the one the keybroker released to, so that the
	// keybroker can tell this end's evidence from any other agent's (platform claims can be
	// alike on two machines).
	hpkePubs [][]byte
	nonce    []byte
	sealed   [sha256.Size]byte
	opened   bool
	grant    *grant.Grant
	// cancel ends the migration's task (transfer or reception); done is closed when it has
	// ended. Nil before the task starts.
	cancel context.CancelFunc
	done   chan struct{}
	// committed: the source holds the commit acknowledgement; the destination sent it and
	// resumed the guest.
	committed bool
	abortResp *agentapi.AbortResponse

	// Source (and adoption: g only).
	g         *guest
	tk        *dataplane.SecretKey // TK until the transfer takes it
	started   bool
	progress  agentapi.Progress
	commitAck []byte
	erasure   []byte // the encoded erasure statement, after commit
	erased    bool
	// unknown: the FIN went out but no acknowledgement came; the guest is left paused.
	unknown bool

	// Destination.
	dst        *dataplane.Destination
	region     *dataplane.Region // the receive region, until the guest takes it
	ln         net.Listener
	endpoint   string
	keys       dataplane.Keys // TK and MDK_{e+1}, until the reception takes them
	epoch      uint64
	digest     []byte
	clean      []byte // the encoded clean-memory statement of the receive region
	failure    string
	dstErasure *attest.ErasureStatement

	// lv is the libvirt side of a libvirt migration (libvirt.go); nil for other guests.
	lv *lvMigration
}

// zeroizeHPKE wipes m's HPKE key, if it still holds one. Callers hold Node.mu.
func (m *migration) zeroizeHPKE() {
	if m.hpke != nil {
		m.hpke.Zeroize()
		m.hpke = nil
	}
}

// running reports whether m's task is running. Callers hold Node.mu.
func (m *migration) running() bool {
	if m.done == nil {
		return false
	}
	select {
	case <-m.done:
		return false
	default:
		return true
	}
}

func checkIDNonce(id string, nonce []byte) error {
	if err := agentapi.ValidName(id); err != nil {
		return fmt.Errorf("%w: migration id: %w", agentapi.ErrBadRequest, err)
	}
	if len(nonce) == 0 || len(nonce) > maxNonce {
		return fmt.Errorf("%w: nonce of %d bytes", agentapi.ErrBadRequest, len(nonce))
	}
	return nil
}

// Attest makes a fresh HPKE key pair for the migration (or adoption) and returns evidence
// bound to it, role source or adopt. Attesting again for the same migration replaces the key
// pair, until the transfer starts. It returns ErrBadRequest, ErrNotFound (the guest is not on
// this host) or ErrConflict (the guest is migrating in another migration, or this one's
// transfer started or was aborted).
func (n *Node) Attest(ctx context.Context, req *agentapi.AttestRequest) (*attest.Evidence, error) {
	if err := checkIDNonce(req.MigrationID, req.Nonce); err != nil {
		return nil, err
	}
	if req.Role != attest.RoleSource && req.Role != attest.RoleAdopt {
		return nil, fmt.Errorf("%w: attest role %q, want source or adopt", agentapi.ErrBadRequest, req.Role)
	}
	var stmt []byte
	if req.Role == attest.RoleAdopt {
		n.mu.Lock()
		if g := n.guests[guestKey(req.Tenant, req.VM)]; g != nil {
			stmt = g.launch
		}
		n.mu.Unlock()
	}
	key, err := seal.GenerateKey()
	if err != nil {
		return nil, err
	}
	ev, err := attest.Produce(ctx, n.cfg.Attester, attest.Binding{
		MigrationID: req.MigrationID, Role: req.Role, Nonce: req.Nonce, HPKEPublicKey: key.PublicKey(), Statement: stmt,
	})
	if err != nil {
		key.Zeroize()
		return nil, fmt.Errorf("attesting: %w", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := n.register(req, key); err != nil {
		key.Zeroize()
		return nil, err
	}
	n.log.Info("Attested", attrMigration, req.MigrationID, attrRole, string(req.Role), attrTenant, req.Tenant, attrVM, req.VM)
	return ev, nil
}

// register records the key pair of an attest request. Callers hold n.mu.
func (n *Node) register(req *agentapi.AttestRequest, key *seal.PrivateKey) error {
	if n.stopping {
		return errStopping
	}
	g := n.guests[guestKey(req.Tenant, req.VM)]
	if g == nil {
		return fmt.Errorf("%w: guest %s/%s is not on host %s", agentapi.ErrNotFound, req.Tenant, req.VM, n.cfg.Host)
	}
	m := n.migs[req.MigrationID]
	switch {
	case m == nil:
		if req.Role == attest.RoleSource && g.migration != "" {
			return fmt.Errorf("%w: guest %s/%s is in migration %s", agentapi.ErrConflict, req.Tenant, req.VM, g.migration)
		}
		m = &migration{id: req.MigrationID, role: req.Role, tenant: req.Tenant, vm: req.VM, g: g, size: g.memoryBytes()}
		n.migs[m.id] = m
	case m.role != req.Role || m.g != g:
		return fmt.Errorf("%w: migration %s is a %s migration of another guest or role", agentapi.ErrConflict, m.id, m.role)
	case m.started || m.abortResp != nil:
		return fmt.Errorf("%w: migration %s already started or ended", agentapi.ErrConflict, m.id)
	case m.opened:
		// The keys and grant of this migration name the key attested before: a new one would
		// only break the handshake.
		return fmt.Errorf("%w: migration %s already has its keys", agentapi.ErrConflict, m.id)
	}
	if req.Role == attest.RoleSource {
		g.migration = m.id
	}
	if m.hpke != nil {
		m.hpke.Zeroize()
	}
	m.hpke, m.nonce, m.opened = key, bytes.Clone(req.Nonce), false
	m.hpkePubs = append(m.hpkePubs, key.PublicKey())
	return nil
}

// Prepare scrubs a fresh receive region for the guest, makes an HPKE key pair, opens a
// data-plane listener and returns evidence (role destination) with the clean-memory statement
// and the data endpoint. Preparing again before the keys arrive scrubs the same region again
// and replaces the key pair. It returns ErrBadRequest or ErrConflict (the guest is already on
// this host, or the migration's keys were delivered or it ended).
func (n *Node) Prepare(ctx context.Context, req *agentapi.PrepareRequest) (*agentapi.PrepareResponse, error) {
	if err := checkIDNonce(req.MigrationID, req.Nonce); err != nil {
		return nil, err
	}
	if err := errors.Join(agentapi.ValidName(req.Tenant), agentapi.ValidName(req.VM)); err != nil {
		return nil, fmt.Errorf("%w: guest: %w", agentapi.ErrBadRequest, err)
	}
	if req.MemoryBytes == 0 || req.MemoryBytes%dataplane.PageSize != 0 || req.MemoryBytes > maxGuestBytes {
		return nil, fmt.Errorf("%w: memory of %d bytes is not a positive multiple of the page size up to 1 TiB", agentapi.ErrBadRequest, req.MemoryBytes)
	}
	n.prepMu.Lock()
	defer n.prepMu.Unlock()
	n.mu.Lock()
	m := n.migs[req.MigrationID]
	err := func() error {
		if n.stopping {
			return errStopping
		}
		if n.guests[guestKey(req.Tenant, req.VM)] != nil {
			return fmt.Errorf("%w: guest %s/%s already runs on host %s", agentapi.ErrConflict, req.Tenant, req.VM, n.cfg.Host)
		}
		if m != nil && (m.role != attest.RoleDestination || m.tenant != req.Tenant || m.vm != req.VM || m.size != int64(req.MemoryBytes)) {
			return fmt.Errorf("%w: migration %s was prepared for another guest or role", agentapi.ErrConflict, m.id)
		}
		if m != nil && (m.opened || m.abortResp != nil) {
			return fmt.Errorf("%w: migration %s already has its keys or ended", agentapi.ErrConflict, m.id)
		}
		return nil
	}()
	n.mu.Unlock()
	if err != nil {
		return nil, err
	}
	fresh := m == nil
	if fresh {
		if m, err = n.newDestination(req); err != nil {
			return nil, err
		}
	}
	cleanup := func() {
		if fresh {
			m.ln.Close()
			m.region.Close()
		}
	}
	clean, err := m.dst.Prepare(ctx)
	if err != nil {
		cleanup()
		return nil, fmt.Errorf("preparing the receive region: %w", err)
	}
	// The endpoint is bound into the evidence: the keybroker's grant names it, and the
	// source sends nowhere else.
	clean.DataEndpoint = m.endpoint
	stmt, err := clean.Encode()
	if err != nil {
		cleanup()
		return nil, err
	}
	key, err := seal.GenerateKey()
	if err != nil {
		cleanup()
		return nil, err
	}
	ev, err := attest.Produce(ctx, n.cfg.Attester, attest.Binding{
		MigrationID: req.MigrationID, Role: attest.RoleDestination, Nonce: req.Nonce,
		HPKEPublicKey: key.PublicKey(), Statement: stmt,
	})
	if err != nil {
		key.Zeroize()
		cleanup()
		return nil, fmt.Errorf("attesting: %w", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopping || (!fresh && (m.opened || m.abortResp != nil)) {
		key.Zeroize()
		cleanup()
		return nil, fmt.Errorf("%w: migration %s changed during prepare", agentapi.ErrConflict, m.id)
	}
	if m.hpke != nil {
		m.hpke.Zeroize()
	}
	m.hpke, m.nonce, m.clean = key, bytes.Clone(req.Nonce), stmt
	m.hpkePubs = append(m.hpkePubs, key.PublicKey())
	n.migs[m.id] = m
	n.log.Info("Prepared to receive", attrMigration, m.id, attrTenant, m.tenant, attrVM, m.vm, attrBytes, m.size, attrEndpoint, m.endpoint)
	return &agentapi.PrepareResponse{Evidence: ev, DataEndpoint: m.endpoint}, nil
}

// newDestination makes the receive region, the data-plane destination and its listener.
func (n *Node) newDestination(req *agentapi.PrepareRequest) (*migration, error) {
	if n.lv != nil {
		return n.newLibvirtDestination(req)
	}
	region, err := dataplane.NewRegion(int64(req.MemoryBytes))
	if err != nil {
		return nil, fmt.Errorf("making the receive region: %w", err)
	}
	dst, err := dataplane.NewDestination(dataplane.DestinationConfig{
		MigrationID: req.MigrationID, Region: region,
		// The source proposes zero-page elision only where the tenant's policy allows it.
		ZeroPageElision: true,
		Logger:          n.log,
	})
	if err != nil {
		region.Close()
		return nil, err
	}
	ln, endpoint, err := n.listen()
	if err != nil {
		region.Close()
		return nil, err
	}
	return &migration{
		id: req.MigrationID, role: attest.RoleDestination, tenant: req.Tenant, vm: req.VM, size: int64(req.MemoryBytes),
		dst: dst, region: region, ln: ln, endpoint: endpoint,
	}, nil
}

// Keys checks the keybroker's grant that comes with the sealed keys and opens them with the
// migration's HPKE key: the source keeps TK for its transfer, the destination starts
// receiving with TK and MDK_{e+1}, an adoption gives the guest MDK_1 (and zeroizes the HPKE
// key at once). The grant must be signed by the pinned keybroker key and name this
// migration, role, guest, host, HPKE key, nonce and these sealed keys (grant.Check);
// anything else is refused before the keys are opened, whoever sealed them. Delivering the
// same keys again succeeds. It returns ErrNotFound, ErrBadRequest (the grant is refused, the
// keys do not open, or lack a key the role needs) or ErrConflict (the keys were opened
// already and these are others, or the migration ended).
func (n *Node) Keys(ctx context.Context, req *agentapi.KeysRequest) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.migs[req.MigrationID]
	if m == nil {
		return fmt.Errorf("%w: migration %s", agentapi.ErrNotFound, req.MigrationID)
	}
	if req.Role != m.role {
		return fmt.Errorf("%w: keys for role %q, the migration's role is %q", agentapi.ErrBadRequest, req.Role, m.role)
	}
	digest := sha256.Sum256(req.SealedKeys)
	switch {
	case m.opened && digest == m.sealed:
		return nil
	case m.abortResp != nil:
		return fmt.Errorf("%w: migration %s ended", agentapi.ErrConflict, m.id)
	case m.opened:
		return fmt.Errorf("%w: migration %s has opened other keys", agentapi.ErrConflict, m.id)
	case m.hpke == nil:
		return fmt.Errorf("%w: migration %s has no key to open them", agentapi.ErrConflict, m.id)
	case n.stopping:
		return errStopping
	}
	g, err := n.checkGrant(m, req)
	if err != nil {
		n.log.Warn("Keys refused", attrMigration, m.id, attrRole, string(m.role), attrError, err)
		return fmt.Errorf("%w: %w", agentapi.ErrBadRequest, err)
	}
	keys, err := m.hpke.Open(m.id, m.role, req.SealedKeys)
	if err != nil {
		return fmt.Errorf("%w: %w", agentapi.ErrBadRequest, err)
	}
	defer keys.Zeroize()
	if m.role != attest.RoleSource && keys.Epoch != g.ToEpoch {
		return fmt.Errorf("%w: sealed keys of epoch %d, the grant says %d", agentapi.ErrBadRequest, keys.Epoch, g.ToEpoch)
	}
	if err := n.takeKeys(ctx, m, keys, g); err != nil {
		return err
	}
	if m.role == attest.RoleAdopt {
		m.hpke.Zeroize()
		m.hpke = nil
	}
	m.opened, m.sealed, m.grant = true, digest, g
	n.log.Info("Keys opened", attrMigration, m.id, attrRole, string(m.role), attrEpoch, keys.Epoch)
	return nil
}

// checkGrant checks the grant of a keys delivery against what m knows for itself. Callers
// hold n.mu.
func (n *Node) checkGrant(m *migration, req *agentapi.KeysRequest) (*grant.Grant, error) {
	want := grant.Expectation{
		Op: grant.OpRelease, MigrationID: m.id, Role: m.role, Tenant: m.tenant, VM: m.vm, Host: n.cfg.Host,
		HPKEPublicKey: m.hpke.PublicKey(), Nonce: m.nonce, Sealed: req.SealedKeys,
	}
	switch m.role {
	case attest.RoleAdopt:
		// An adoption and a reissue look alike to the agent: either op, never a release.
		g, err := grant.Verify(req.Grant, n.cfg.KeybrokerKey)
		if err != nil {
			return nil, err
		}
		want.Op = g.Op
	case attest.RoleSource:
		if m.g.mdk != nil {
			want.Epoch = m.g.epoch
		}
	}
	return grant.Check(req.Grant, n.cfg.KeybrokerKey, want)
}

// takeKeys puts opened keys where m's role needs them, with what the grant g says of the
// peer. Callers hold n.mu.
func (n *Node) takeKeys(ctx context.Context, m *migration, keys *seal.Keys, g *grant.Grant) error {
	switch m.role {
	case attest.RoleSource:
		if len(keys.TK) == 0 {
			return fmt.Errorf("%w: no transfer key in the sealed keys", agentapi.ErrBadRequest)
		}
		tk, err := dataplane.NewSecretKey(keys.TK)
		if err != nil {
			return err
		}
		m.tk.Destroy()
		m.tk = tk
	case attest.RoleAdopt:
		if len(keys.MDK) == 0 {
			return fmt.Errorf("%w: no memory data key in the sealed keys", agentapi.ErrBadRequest)
		}
		if n.guests[m.g.key()] != m.g {
			return fmt.Errorf("%w: guest %s/%s left the host", agentapi.ErrNotFound, m.tenant, m.vm)
		}
		mdk, err := dataplane.NewSecretKey(keys.MDK)
		if err != nil {
			return err
		}
		m.g.mdk.Destroy()
		m.g.mdk, m.g.epoch = mdk, keys.Epoch
	case attest.RoleDestination:
		if len(keys.TK) == 0 || len(keys.MDK) == 0 {
			return fmt.Errorf("%w: the destination needs a transfer key and a memory data key", agentapi.ErrBadRequest)
		}
		tk, err := dataplane.NewSecretKey(keys.TK)
		if err != nil {
			return err
		}
		mdk, err := dataplane.NewSecretKey(keys.MDK)
		if err != nil {
			tk.Destroy()
			return err
		}
		m.keys, m.epoch = dataplane.Keys{TK: tk, MDK: mdk, Identity: m.hpke, PeerKey: g.Source.HPKEPublicKey}, keys.Epoch
		rctx, cancel := context.WithCancel(ctx)
		m.cancel, m.done = cancel, make(chan struct{})
		if !n.spawn(func() { n.receive(rctx, ctx, m) }) {
			cancel()
			tk.Destroy()
			mdk.Destroy()
			m.keys, m.cancel, m.done = dataplane.Keys{}, nil, nil
			return errStopping
		}
	default:
		return fmt.Errorf("%w: role %q", agentapi.ErrBadRequest, m.role)
	}
	return nil
}

// receive runs the destination's data plane under ctx; after a commit the guest runs here,
// its workload under base.
func (n *Node) receive(ctx, base context.Context, m *migration) {
	if m.lv != nil {
		n.receiveLibvirt(ctx, m)
		return
	}
	defer close(m.done)
	n.mu.Lock()
	keys := m.keys
	m.keys = dataplane.Keys{}
	n.mu.Unlock()
	res, err := m.dst.Receive(ctx, m.ln, keys)
	n.mu.Lock()
	defer n.mu.Unlock()
	m.zeroizeHPKE()
	if err != nil {
		// Receive erased the destination: keys zeroized, region scrubbed.
		m.failure, m.dstErasure = err.Error(), res.Erasure
		m.region.Close()
		m.region = nil
		n.log.Warn("Receiving failed; destination erased", attrMigration, m.id, attrError, err)
		n.cfg.Metrics.MigrationEnded(attest.RoleDestination, OutcomeFailed)
		return
	}
	g, gerr := newGuest(m.tenant, m.vm, m.region, n.cfg.WorkloadRate)
	if gerr != nil { // cannot happen for a valid region; keep nothing
		keys.MDK.Destroy()
		m.failure = gerr.Error()
		n.log.Error("Taking in the received guest failed", attrMigration, m.id, attrError, gerr)
		return
	}
	g.mdk, g.epoch, g.launch = keys.MDK, m.epoch, m.clean
	m.region, m.committed, m.digest = nil, true, res.MemoryDigest
	if ack, err := json.Marshal(res.Commit); err == nil {
		m.commitAck = ack
	}
	n.guests[g.key()] = g
	n.startWorkload(base, g)
	n.hostChanged()
	n.cfg.Metrics.MigrationEnded(attest.RoleDestination, OutcomeCommitted)
	n.log.Info("Guest received and resumed", attrMigration, m.id, attrTenant, m.tenant, attrVM, m.vm,
		attrEpoch, m.epoch, attrDigest, hex.EncodeToString(res.MemoryDigest))
}

// Transfer starts moving the guest to req.DataEndpoint in the background and returns the
// transfer's state; called again, it returns the current state and starts nothing. It
// returns ErrNotFound, ErrBadRequest (no keys yet, no endpoint, a bad stream count) or
// ErrConflict (the migration was aborted).
func (n *Node) Transfer(ctx context.Context, req *agentapi.TransferRequest, report agentapi.ProgressFunc) (*agentapi.Progress, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.migs[req.MigrationID]
	switch {
	case m == nil:
		return nil, fmt.Errorf("%w: migration %s", agentapi.ErrNotFound, req.MigrationID)
	case m.role != attest.RoleSource:
		return nil, fmt.Errorf("%w: migration %s is not a source migration here", agentapi.ErrBadRequest, m.id)
	case m.started:
		p := m.progress
		return &p, nil
	case m.abortResp != nil:
		return nil, fmt.Errorf("%w: migration %s was aborted", agentapi.ErrConflict, m.id)
	case m.tk == nil || m.grant == nil || m.hpke == nil:
		return nil, fmt.Errorf("%w: migration %s has no keys yet", agentapi.ErrBadRequest, m.id)
	case req.DataEndpoint != "" && req.DataEndpoint != m.grant.DataEndpoint:
		n.log.Warn("Transfer refused: endpoint not granted", attrMigration, m.id, attrEndpoint, req.DataEndpoint)
		return nil, fmt.Errorf("%w: refusing to send to %s: the keybroker's grant names %s", agentapi.ErrBadRequest, req.DataEndpoint, m.grant.DataEndpoint)
	case n.guests[m.g.key()] != m.g:
		return nil, fmt.Errorf("%w: guest %s/%s left the host", agentapi.ErrNotFound, m.tenant, m.vm)
	}
	if m.g.domain != "" {
		return n.transferLibvirt(ctx, m, req, report)
	}
	g := m.g
	src, err := dataplane.NewSource(dataplane.SourceConfig{
		MigrationID: m.id, Peer: m.grant.DataEndpoint, Dial: n.dial, Streams: cmp.Or(req.Streams, n.cfg.Streams),
		Region: g.region, Guest: g.workload, ZeroPageElision: req.ZeroPageElision && m.grant.ZeroPageElision,
		MaxRounds: n.cfg.MaxRounds, ConvergedPages: n.cfg.ConvergedPages,
		Progress: func(p dataplane.Progress) { n.onProgress(m, p, report) },
		Logger:   n.log,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", agentapi.ErrBadRequest, err)
	}
	keys := dataplane.Keys{TK: m.tk, MDK: g.mdk, Identity: m.hpke, PeerKey: m.grant.Destination.HPKEPublicKey}
	tctx, cancel := context.WithCancel(ctx)
	m.cancel, m.done = cancel, make(chan struct{})
	if !n.spawn(func() { n.runSource(tctx, m, src, keys, report) }) {
		cancel()
		m.cancel, m.done = nil, nil
		return nil, errStopping
	}
	m.tk, m.started = nil, true // the transfer owns TK now
	m.progress = agentapi.Progress{MigrationID: m.id, Phase: agentapi.TransferStarted, TotalBytes: uint64(m.size), Time: n.cfg.Now()}
	n.log.Info("Transfer started", attrMigration, m.id, attrEndpoint, m.grant.DataEndpoint)
	p := m.progress
	return &p, nil
}

// onProgress records and publishes a pre-copy round.
func (n *Node) onProgress(m *migration, p dataplane.Progress, report agentapi.ProgressFunc) {
	ap := agentapi.Progress{
		MigrationID: m.id, Phase: agentapi.TransferPrecopy,
		Bytes: uint64(p.TotalBytes), Pages: uint64(p.TotalPages), TotalBytes: uint64(m.size),
		Round: p.Round + 1, DirtyRate: p.DirtyRate * dataplane.PageSize, ETA: max(p.ETA, 0), Time: n.cfg.Now(),
	}
	if p.Final {
		ap.Phase = agentapi.TransferCutover
	}
	n.mu.Lock()
	m.progress = ap
	n.mu.Unlock()
	n.log.Debug("Pre-copy round", attrMigration, m.id, attrRound, ap.Round, attrPhase, string(ap.Phase), attrBytes, ap.Bytes)
	n.publish(report, ap)
}

func (n *Node) publish(report agentapi.ProgressFunc, p agentapi.Progress) {
	if report == nil {
		return
	}
	if err := report(p); err != nil {
		n.log.Warn("Publishing progress failed", attrMigration, p.MigrationID, attrError, err)
	}
}

// runSource runs the source's data plane and records its outcome. On commit the guest leaves
// the host: the data plane has zeroized TK and MDK and scrubbed its pages.
func (n *Node) runSource(ctx context.Context, m *migration, src *dataplane.Source, keys dataplane.Keys, report agentapi.ProgressFunc) {
	defer close(m.done)
	res, err := src.Run(ctx, keys)
	n.cfg.Metrics.BytesSent(res.BytesSent)
	g := m.g
	p := agentapi.Progress{
		MigrationID: m.id, Bytes: uint64(res.BytesSent), Pages: uint64(res.PagesSent), TotalBytes: uint64(m.size),
		Round: res.Rounds, Time: n.cfg.Now(),
	}
	if len(res.Commit.MAC) == 0 { // not committed
		n.mu.Lock()
		m.zeroizeHPKE()
		m.unknown = errors.Is(err, dataplane.ErrCommitUnknown)
		if m.unknown && errors.Is(err, dataplane.ErrPeerAborted) {
			// The destination said it aborted: resuming cannot make two running copies.
			m.unknown = false
			if rerr := g.workload.Resume(context.WithoutCancel(ctx)); rerr != nil {
				n.log.Error("Resuming the guest failed", attrMigration, m.id, attrError, rerr)
			}
		}
		p.Phase, p.Error = agentapi.TransferFailed, err.Error()
		m.progress = p
		paused := m.unknown
		n.mu.Unlock()
		n.log.Warn("Transfer failed", attrMigration, m.id, attrError, err, attrPaused, paused)
		n.cfg.Metrics.MigrationEnded(attest.RoleSource, OutcomeFailed)
		n.publish(report, p)
		return
	}
	if err != nil {
		n.log.Error("Committed, but erasing the source failed", attrMigration, m.id, attrError, err)
	}
	ack, aerr := json.Marshal(res.Commit)
	st := res.Erasure
	st.KeysZeroized = append(st.KeysZeroized, attest.KeyHPKE)
	stmt, serr := st.Encode()
	if e := errors.Join(aerr, serr); e != nil {
		n.log.Error("Encoding the commit failed", attrMigration, m.id, attrError, e)
	}
	p.Phase, p.CommitAck, p.MemoryDigest = agentapi.TransferCommitted, ack, res.MemoryDigest
	n.mu.Lock()
	m.zeroizeHPKE()
	m.committed, m.commitAck, m.erasure, m.progress = true, ack, stmt, p
	delete(n.guests, g.key())
	g.mdk = nil // destroyed by the data plane
	stop := g.stop
	g.stop = nil
	n.mu.Unlock()
	if stop != nil {
		stop()
	}
	if err := g.region.Close(); err != nil {
		n.log.Warn("Releasing guest memory failed", attrMigration, m.id, attrError, err)
	}
	n.hostChanged()
	n.cfg.Metrics.MigrationEnded(attest.RoleSource, OutcomeCommitted)
	n.log.Info("Transfer committed; guest left the host", attrMigration, m.id, attrTenant, m.tenant, attrVM, m.vm,
		attrDigest, hex.EncodeToString(res.MemoryDigest))
	n.publish(report, p)
}

// Status returns the node's view of a migration; an unknown one is reported with Known false.
func (n *Node) Status(ctx context.Context, req *agentapi.StatusRequest) (*agentapi.Status, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.migs[req.MigrationID]
	if m == nil {
		return &agentapi.Status{MigrationID: req.MigrationID}, nil
	}
	st := &agentapi.Status{MigrationID: m.id, Role: m.role, Known: true, Aborted: m.abortResp != nil}
	st.KeysHeld = m.hpke != nil || m.tk != nil || m.running()
	switch m.role {
	case attest.RoleSource:
		if m.started {
			p := m.progress
			st.Transfer = &p
		}
		st.Erased = m.erased
	case attest.RoleDestination:
		switch {
		case m.committed:
			st.Transfer = &agentapi.Progress{MigrationID: m.id, Phase: agentapi.TransferCommitted, TotalBytes: uint64(m.size), MemoryDigest: m.digest}
		case m.failure != "":
			st.Transfer = &agentapi.Progress{MigrationID: m.id, Phase: agentapi.TransferFailed, TotalBytes: uint64(m.size), Error: m.failure}
		}
		st.Erased = m.dstErasure != nil || m.abortResp != nil
	}
	return st, nil
}

// Erase returns evidence (role erased, bound to req.Nonce) with the source's erasure
// statement. The erasure itself happened at commit: the data plane zeroized TK and MDK and
// scrubbed the guest's pages, and the HPKE key was zeroized when the keys were opened. A
// repeated call attests the same erasure again. It returns ErrNotFound, ErrBadRequest (not a
// source migration) or ErrConflict (not committed).
func (n *Node) Erase(ctx context.Context, req *agentapi.EraseRequest) (*attest.Evidence, error) {
	if err := checkIDNonce(req.MigrationID, req.Nonce); err != nil {
		return nil, err
	}
	n.mu.Lock()
	m := n.migs[req.MigrationID]
	var stmt, pub []byte
	err := func() error {
		switch {
		case m == nil:
			return fmt.Errorf("%w: migration %s", agentapi.ErrNotFound, req.MigrationID)
		case m.role == attest.RoleSource && m.committed:
			stmt = m.erasure
		case m.role == attest.RoleDestination && m.abortResp != nil:
			// Only an abort that found the guest not resumed here sets abortResp (see
			// ended), so this statement also says the guest never ran here.
			stmt = m.abortResp.Statement
		case m.role == attest.RoleSource || m.role == attest.RoleDestination:
			return fmt.Errorf("%w: migration %s is neither a committed source nor an aborted destination here", agentapi.ErrConflict, m.id)
		default:
			return fmt.Errorf("%w: migration %s is not a source or destination migration here", agentapi.ErrBadRequest, m.id)
		}
		// The key of the release this agent took part in: the one asked for, if this agent
		// attested with it; else the grant's, if keys came; else the last.
		switch {
		case len(req.HPKEPublicKey) > 0:
			if !slices.ContainsFunc(m.hpkePubs, func(k []byte) bool { return bytes.Equal(k, req.HPKEPublicKey) }) {
				return fmt.Errorf("%w: migration %s never attested with that HPKE key here", agentapi.ErrBadRequest, m.id)
			}
			pub = req.HPKEPublicKey
		case m.grant != nil:
			end := m.grant.Source
			if m.role == attest.RoleDestination {
				end = m.grant.Destination
			}
			pub = end.HPKEPublicKey
		case len(m.hpkePubs) > 0:
			pub = m.hpkePubs[len(m.hpkePubs)-1]
		}
		return nil
	}()
	n.mu.Unlock()
	if err != nil {
		return nil, err
	}
	ev, err := attest.Produce(ctx, n.cfg.Attester, attest.Binding{
		MigrationID: m.id, Role: attest.RoleErased, Nonce: req.Nonce, HPKEPublicKey: pub, Statement: stmt,
	})
	if err != nil {
		return nil, fmt.Errorf("attesting the erasure: %w", err)
	}
	n.mu.Lock()
	m.erased = true
	n.mu.Unlock()
	n.log.Info("Erasure attested", attrMigration, m.id)
	return ev, nil
}

// Abort ends a migration before commit and returns the erasure statement: the destination
// stops receiving, scrubs its region and zeroizes its keys; the source stops its transfer,
// zeroizes TK and resumes the guest. A source holding the commit acknowledgement answers
// Committed with it. A repeated abort returns the same answer. It returns ErrNotFound, or
// ErrConflict when the destination has resumed the guest.
func (n *Node) Abort(ctx context.Context, req *agentapi.AbortRequest) (*agentapi.AbortResponse, error) {
	n.mu.Lock()
	m := n.migs[req.MigrationID]
	n.mu.Unlock()
	if m == nil {
		return nil, fmt.Errorf("%w: migration %s", agentapi.ErrNotFound, req.MigrationID)
	}
	return n.abort(ctx, m, req.Reason, req.Receipt)
}

// endReceipt verifies proof, the keybroker's receipt of how m ended, with the pinned
// keybroker key, and returns its outcome. Callers hold n.mu.
func (n *Node) endReceipt(m *migration, proof json.RawMessage) (receipt.Outcome, error) {
	if len(proof) == 0 {
		return "", errors.New("no receipt")
	}
	env, err := receipt.Parse(proof)
	if err != nil {
		return "", err
	}
	r, err := receipt.Verify(env, n.cfg.KeybrokerKey)
	if err != nil {
		return "", err
	}
	if r.MigrationID != m.id || r.Tenant != m.tenant || r.VM != m.vm {
		return "", fmt.Errorf("the receipt is of migration %s of %s/%s", r.MigrationID, r.Tenant, r.VM)
	}
	return r.Outcome, nil
}

// dropCommitted ends a source whose transfer's outcome was unknown and that the keybroker's
// receipt shows committed: the guest runs at the destination, so its copy here is scrubbed
// and dropped and its memory key zeroized. Callers hold n.mu.
func (n *Node) dropCommitted(m *migration) {
	g := m.g
	if n.guests[g.key()] != g {
		return
	}
	delete(n.guests, g.key())
	if g.stop != nil {
		g.stop()
		g.stop = nil
	}
	st := attest.ErasureStatement{MigrationID: m.id, KeysZeroized: []string{attest.KeyTransfer, attest.KeyHPKE}}
	if g.mdk != nil {
		g.mdk.Destroy()
		g.mdk = nil
		st.KeysZeroized = append(st.KeysZeroized, attest.KeyMemoryData)
	}
	if g.region != nil {
		if b, err := g.region.Scrub(); err == nil {
			st.PagesScrubbed, st.PageBytesScrubbed = uint64(b)/dataplane.PageSize, uint64(b)
		}
		g.region.Close()
	}
	if g.domain != "" && n.lv != nil {
		if err := n.lv.Remove(context.Background(), g.domain); err != nil {
			n.log.Error("Destroying the source domain failed", attrMigration, m.id, attrError, err)
		}
	}
	if b, err := st.Encode(); err == nil {
		m.erasure = b
	}
	n.hostChanged()
	n.log.Info("Transfer committed after all; the guest's copy here scrubbed", attrMigration, m.id)
}

// ended answers an abort of m that is decided already, or returns nil. Callers hold n.mu.
func (m *migration) ended() (*agentapi.AbortResponse, error) {
	switch {
	case m.abortResp != nil:
		r := *m.abortResp
		return &r, nil
	case m.committed && m.role == attest.RoleSource:
		return &agentapi.AbortResponse{Committed: true, CommitAck: m.commitAck, MemoryDigest: m.progress.MemoryDigest}, nil
	case m.committed:
		// The destination resumed the guest: it answers with the acknowledgement it sent, so
		// that the broker completes the commit (the source may never have received it).
		return &agentapi.AbortResponse{Committed: true, CommitAck: m.commitAck, MemoryDigest: m.digest}, nil
	}
	return nil, nil
}

func (n *Node) abort(ctx context.Context, m *migration, reason string, proof json.RawMessage) (*agentapi.AbortResponse, error) {
	n.mu.Lock()
	if r, err := m.ended(); r != nil || err != nil {
		n.mu.Unlock()
		return r, err
	}
	cancel, done := m.cancel, m.done
	n.mu.Unlock()
	if cancel != nil {
		cancel()
		select {
		case <-done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if r, err := m.ended(); r != nil || err != nil {
		return r, err
	}
	var st attest.ErasureStatement
	resp := &agentapi.AbortResponse{}
	switch m.role {
	case attest.RoleSource:
		st = attest.ErasureStatement{MigrationID: m.id, KeysZeroized: []string{}}
		if m.opened {
			m.tk.Destroy() // nil once the transfer took it; the transfer destroyed it
			m.tk = nil
			st.KeysZeroized = append(st.KeysZeroized, attest.KeyTransfer)
		}
		g := m.g
		if m.unknown {
			// Whether the destination resumed the guest is known only to the keybroker.
			switch outcome, err := n.endReceipt(m, proof); {
			case err != nil:
				n.log.Warn("Keeping the guest paused: whether the destination resumed it is unknown", attrMigration, m.id, attrReason, reason, attrError, err)
				return &agentapi.AbortResponse{Unresolved: true}, nil
			case outcome == receipt.OutcomeAborted:
				if err := n.resumeSource(context.WithoutCancel(ctx), m); err != nil {
					n.log.Error("Resuming the guest failed", attrMigration, m.id, attrError, err)
				}
			case outcome == receipt.OutcomeErased || outcome == receipt.OutcomeCommittedUnverifiedErasure:
				n.dropCommitted(m)
				resp := &agentapi.AbortResponse{Committed: true}
				m.unknown, m.committed, m.abortResp = false, true, resp
				r := *resp
				return &r, nil
			default:
				n.log.Warn("Keeping the guest paused: the abort is not verified", attrMigration, m.id, attrOutcome, string(outcome))
				return &agentapi.AbortResponse{Unresolved: true}, nil
			}
			m.unknown = false
		}
		if g.migration == m.id {
			g.migration = ""
		}
		resp.Resumed = n.guests[g.key()] == g
	case attest.RoleDestination:
		switch {
		case m.dstErasure != nil:
			st = *m.dstErasure
		default:
			var err error
			st, err = m.dst.Abort(ctx, m.keys)
			if err != nil {
				n.log.Error("Scrubbing the receive region failed", attrMigration, m.id, attrError, err)
			}
		}
		m.keys = dataplane.Keys{}
		m.ln.Close()
		if m.region != nil {
			m.region.Close()
			m.region = nil
		}
	}
	if m.hpke != nil || m.opened {
		if m.hpke != nil {
			m.hpke.Zeroize()
		}
		m.hpke = nil
		st.KeysZeroized = append(st.KeysZeroized, attest.KeyHPKE)
	}
	if m.role != attest.RoleAdopt {
		st.MigrationID = m.id
		stmt, err := st.Encode()
		if err != nil {
			return nil, err
		}
		resp.Statement = stmt
	}
	m.abortResp = resp
	if m.role != attest.RoleAdopt {
		n.cfg.Metrics.MigrationEnded(m.role, OutcomeAborted)
	}
	n.log.Info("Migration aborted", attrMigration, m.id, attrRole, string(m.role), attrReason, reason, attrResumed, resp.Resumed)
	r := *resp
	return &r, nil
}
