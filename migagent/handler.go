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
	"slices"
	"time"

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

func checkIDNonce(id string, nonce []byte) error {
	if err := agentapi.ValidName(id); err != nil {
		return fmt.Errorf("%w: migration id: %w", agentapi.ErrBadRequest, err)
	}
	if len(nonce) == 0 || len(nonce) > maxNonce {
		return fmt.Errorf("%w: nonce of %d bytes", agentapi.ErrBadRequest, len(nonce))
	}
	return nil
}

// Bounds on what a broker can make an agent hold. A migration holds little once it ended (its
// answers to a repeated abort or erase), but a broker attesting or preparing without end would
// otherwise grow the agent's memory without bound.
var (
	// defaultMaxLive is how many migrations may be in a phase that is not final at once when
	// Config.MaxMigrations is zero; a new one beyond the limit is refused.
	defaultMaxLive = 256
	// maxKept is how many migrations the node remembers; beyond it the oldest ended one
	// (committed or aborted) is forgotten to make room.
	maxKept = 4096
	// maxAttestations is how many times one migration may attest or prepare.
	maxAttestations = 16
)

// admit makes room for a new migration: it refuses one beyond the node's limit of migrations
// in flight (Config.MaxMigrations), counting the preparation under way that is not in the map
// yet, and forgets the oldest ended migration (committed, aborted or adopted) when the node
// remembers maxKept. Callers hold n.mu.
func (n *Node) admit() error {
	live := n.preparing
	var oldest *migration
	for _, m := range n.migs {
		switch m.phase() {
		case phaseCommitted, phaseAborted, phaseAdopted:
			// An adoption ends when its guest has its key: it holds nothing more, and a
			// host whose guests were all adopted still takes its full count of migrations.
			if oldest == nil || m.seq < oldest.seq {
				oldest = m
			}
		default:
			live++
		}
	}
	if live >= n.maxLive {
		return fmt.Errorf("%w: %d migrations in flight on host %s, the most it takes", agentapi.ErrConflict, live, n.cfg.Host)
	}
	if len(n.migs) >= maxKept && oldest != nil {
		delete(n.migs, oldest.id)
	}
	return nil
}

// lookup returns the migration id, or ErrNotFound.
func (n *Node) lookup(id string) (*migration, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if m := n.migs[id]; m != nil {
		return m, nil
	}
	return nil, fmt.Errorf("%w: migration %s", agentapi.ErrNotFound, id)
}

// Attest makes a fresh HPKE key pair for the migration (or adoption) and returns evidence
// bound to it, role source or adopt. It returns ErrBadRequest, ErrNotFound (the guest is not on
// this host) or ErrConflict (the guest is migrating in another migration, or this one's
// keys were opened or it ended).
//
// Attesting again for the same migration, until its keys are opened, is how a broker retries:
// after a timeout, a takeover, or a read of the migration's record from before its own write.
// The same nonce is the same attempt: it answers the evidence it answered, with the same key.
// Another nonce is a new attempt with a new key pair, and the earlier attempts' keys are kept
// (up to maxAttestations in all) until keys sealed to one of them are opened, when the
// others are zeroized: the keybroker may have sealed keys to an earlier attempt that a broker
// stored before it retried, and those must still open. Each key opens only keys whose grant
// names it and its nonce, so keeping one opens nothing the keybroker did not release to it.
func (n *Node) Attest(ctx context.Context, req *agentapi.AttestRequest) (*attest.Evidence, error) {
	if err := checkIDNonce(req.MigrationID, req.Nonce); err != nil {
		return nil, err
	}
	if req.Role != attest.RoleSource && req.Role != attest.RoleAdopt {
		return nil, fmt.Errorf("%w: attest role %q, want source or adopt", agentapi.ErrBadRequest, req.Role)
	}
	if ev := n.repeatedAttest(req); ev != nil {
		n.log.Info("Attested again with the same nonce", attrMigration, req.MigrationID, attrRole, string(req.Role))
		return ev, nil
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
	answer, err := n.register(req, attempt{nonce: req.Nonce, key: key, evidence: ev})
	if err != nil {
		key.Zeroize()
		return nil, err
	}
	if answer != ev {
		key.Zeroize() // a concurrent request with the same nonce registered first
	}
	n.log.Info("Attested", attrMigration, req.MigrationID, attrRole, string(req.Role), attrTenant, req.Tenant, attrVM, req.VM)
	return answer, nil
}

// repeatedAttest returns the evidence an attested migration answered req's nonce with, or nil
// if req is not the repeat of an attempt of it.
func (n *Node) repeatedAttest(req *agentapi.AttestRequest) *attest.Evidence {
	n.mu.Lock()
	m := n.migs[req.MigrationID]
	n.mu.Unlock()
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase() != phaseAttested || m.role != req.Role || m.tenant != req.Tenant || m.vm != req.VM {
		return nil
	}
	return m.answered(req.Nonce)
}

// register records attempt a of an attest request: a new migration enters attested, an
// attested one attests again. It returns the evidence to answer: a's, or that of an attempt
// with the same nonce registered first.
func (n *Node) register(req *agentapi.AttestRequest, a attempt) (*attest.Evidence, error) {
	n.mu.Lock()
	if n.stopping {
		n.mu.Unlock()
		return nil, errStopping
	}
	g := n.guests[guestKey(req.Tenant, req.VM)]
	if g == nil {
		n.mu.Unlock()
		return nil, fmt.Errorf("%w: guest %s/%s is not on host %s", agentapi.ErrNotFound, req.Tenant, req.VM, n.cfg.Host)
	}
	m := n.migs[req.MigrationID]
	if m == nil {
		if req.Role == attest.RoleSource && g.migration != "" {
			n.mu.Unlock()
			return nil, fmt.Errorf("%w: guest %s/%s is in migration %s", agentapi.ErrConflict, req.Tenant, req.VM, g.migration)
		}
		if err := n.admit(); err != nil {
			n.mu.Unlock()
			return nil, err
		}
		m = newMigration(req.MigrationID, req.Role, req.Tenant, req.VM, g.memoryBytes(), phaseAttested)
		m.g = g
		m.newAttempt(a)
		n.migs[m.id] = m
		if req.Role == attest.RoleSource {
			g.migration = m.id
		}
		n.mu.Unlock()
		return a.evidence, nil
	}
	n.mu.Unlock()

	m.mu.Lock()
	defer m.mu.Unlock()
	switch p := m.phase(); {
	case m.role != req.Role || m.g != g:
		return nil, fmt.Errorf("%w: migration %s is a %s migration of another guest or role", agentapi.ErrConflict, m.id, m.role)
	case p == phaseKeyed || p == phaseAdopted:
		// The keys and grant of this migration name the key attested before: a new one would
		// only break the handshake.
		return nil, fmt.Errorf("%w: migration %s already has its keys", agentapi.ErrConflict, m.id)
	case p != phaseAttested:
		return nil, fmt.Errorf("%w: migration %s already started or ended", agentapi.ErrConflict, m.id)
	}
	if ev := m.answered(a.nonce); ev != nil {
		return ev, nil
	}
	if len(m.hpkePubs) >= maxAttestations {
		return nil, fmt.Errorf("%w: migration %s attested %d times already", agentapi.ErrConflict, m.id, len(m.hpkePubs))
	}
	if err := m.enter(phaseAttested); err != nil {
		return nil, err
	}
	m.newAttempt(a)
	return a.evidence, nil
}

// Prepare scrubs a fresh receive region for the guest, makes an HPKE key pair, opens a
// data-plane listener and returns evidence (role destination) with the clean-memory statement
// and the data endpoint. Preparing again before the keys arrive follows Attest's rule: with
// the same nonce it answers the same evidence, with another it scrubs the same region again
// and makes a new key pair, keeping the earlier ones until keys are opened. It returns ErrBadRequest or ErrConflict (the guest is already on
// this host or arriving in another migration, or the migration's keys were delivered or it
// ended).
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
	// Preparations run one at a time so that two cannot make the same migration: a new one
	// is in the node's map only once it is prepared.
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
		if m != nil && m.phase() != phasePrepared {
			return fmt.Errorf("%w: migration %s already has its keys or ended", agentapi.ErrConflict, m.id)
		}
		if o := n.arriving(req.Tenant, req.VM); o != nil && o.id != req.MigrationID {
			return fmt.Errorf("%w: guest %s/%s is arriving in migration %s", agentapi.ErrConflict, req.Tenant, req.VM, o.id)
		}
		if m == nil {
			if err := cmp.Or(n.admit(), n.fits(req.MemoryBytes)); err != nil {
				return err
			}
			// The new migration enters the map only once it is prepared: until then it
			// holds its place in the limit here, so that an attestation meanwhile cannot
			// take the last one too.
			n.preparing++
		}
		return nil
	}()
	n.mu.Unlock()
	if err != nil {
		return nil, err
	}
	fresh := m == nil
	if fresh {
		defer func() {
			n.mu.Lock()
			n.preparing--
			n.mu.Unlock()
		}()
	}
	if fresh {
		if m, err = n.backend.newDestination(req); err != nil {
			return nil, err
		}
	}
	// The migration's lock is held from here to the end: an abort must not unmap the
	// region, nor a delivery of keys start receiving into it, while it is scrubbed again.
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase() != phasePrepared {
		return nil, fmt.Errorf("%w: migration %s already has its keys or ended", agentapi.ErrConflict, m.id)
	}
	if ev := m.answered(req.Nonce); ev != nil {
		n.log.Info("Prepared again with the same nonce", attrMigration, m.id)
		return &agentapi.PrepareResponse{Evidence: ev, DataEndpoint: m.endpoint, Lanes: m.lanes}, nil
	}
	if len(m.hpkePubs) >= maxAttestations {
		return nil, fmt.Errorf("%w: migration %s was prepared %d times already", agentapi.ErrConflict, m.id, len(m.hpkePubs))
	}
	cleanup := func() {
		if fresh {
			m.ln.Close()
			if m.region != nil { // a libvirt destination has none
				m.region.Close()
			}
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
	if n.stopping || m.enter(phasePrepared) != nil {
		key.Zeroize()
		cleanup()
		return nil, fmt.Errorf("%w: migration %s changed during prepare", agentapi.ErrConflict, m.id)
	}
	m.newAttempt(attempt{nonce: req.Nonce, key: key, evidence: ev, clean: stmt})
	n.migs[m.id] = m
	n.log.Info("Prepared to receive", attrMigration, m.id, attrTenant, m.tenant, attrVM, m.vm, attrBytes, m.size, attrEndpoint, m.endpoint)
	return &agentapi.PrepareResponse{Evidence: ev, DataEndpoint: m.endpoint, Lanes: m.lanes}, nil
}

// fits returns ErrConflict if a guest of size bytes does not fit in what the host offers
// (Config.AllocatableBytes) beside the guests it runs and the ones arriving. The broker's
// placement makes the same reckoning from the host record; this check keeps a broker that
// does not (or lies about the record) from overcommitting the host. Called with n.mu held.
func (n *Node) fits(size uint64) error {
	offer := cmp.Or(n.cfg.AllocatableBytes, n.memTotal)
	if offer == 0 {
		return nil
	}
	var used uint64
	for _, g := range n.guests {
		used += uint64(g.memoryBytes())
	}
	for _, m := range n.migs {
		if p := m.phase(); m.role == attest.RoleDestination && (p == phasePrepared || p == phaseReceiving) {
			used += uint64(m.size)
		}
	}
	if used+size > offer {
		return fmt.Errorf("%w: a guest of %d MiB does not fit on host %s: it offers %d MiB, %d MiB are committed or arriving",
			agentapi.ErrConflict, size>>20, n.cfg.Host, offer>>20, used>>20)
	}
	return nil
}

// arriving returns the migration that may still bring guest tenant/vm here (a destination
// prepared or receiving), or nil: a guest arrives in one migration at a time, so that no
// arrival replaces the guest another brought. Callers hold n.mu.
func (n *Node) arriving(tenant, vm string) *migration {
	for _, m := range n.migs {
		if p := m.phase(); m.role == attest.RoleDestination && m.tenant == tenant && m.vm == vm && (p == phasePrepared || p == phaseReceiving) {
			return m
		}
	}
	return nil
}

// Keys checks the keybroker's grant that comes with the sealed keys and opens them with the
// migration's HPKE key: the source keeps TK for its transfer, the destination starts
// receiving with TK and MDK_{e+1}, an adoption gives the guest MDK_1 (and zeroizes the HPKE
// key at once). The grant must be signed by the pinned keybroker key and name this
// migration, role, guest, host, HPKE key, nonce and these sealed keys (grant.Check);
// anything else is refused before the keys are opened, whoever sealed them. Delivering the
// same keys again succeeds. It returns ErrNotFound, ErrBadRequest (the grant is refused, the
// keys do not open, or lack a key the role needs) or ErrConflict (the keys were opened
// already and these are others, the migration ended, or an adoption's guest is in a
// source migration).
func (n *Node) Keys(ctx context.Context, req *agentapi.KeysRequest) error {
	m, err := n.lookup(req.MigrationID)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if req.Role != m.role {
		return fmt.Errorf("%w: keys for role %q, the migration's role is %q", agentapi.ErrBadRequest, req.Role, m.role)
	}
	digest := sha256.Sum256(req.SealedKeys)
	switch p := m.phase(); {
	case m.grant != nil && digest == m.sealed:
		return nil
	case p == phaseAborted:
		return fmt.Errorf("%w: migration %s ended", agentapi.ErrConflict, m.id)
	case m.grant != nil:
		return fmt.Errorf("%w: migration %s has opened other keys", agentapi.ErrConflict, m.id)
	case p != phaseAttested && p != phasePrepared:
		return fmt.Errorf("%w: migration %s has no key to open them", agentapi.ErrConflict, m.id)
	case n.isStopping():
		return errStopping
	}
	g, err := n.checkGrant(m, req)
	for i := range m.keys.earlier {
		if err == nil {
			break
		}
		// Keys sealed to an earlier attempt, which a broker stored before it retried.
		a := m.keys.earlier[i]
		if g2, err2 := n.checkGrantFor(m, req, a.key.PublicKey(), a.nonce); err2 == nil {
			m.useEarlier(i)
			g, err = g2, nil
		}
	}
	if err != nil {
		n.log.Warn("Keys refused", attrMigration, m.id, attrRole, string(m.role), attrError, err)
		return fmt.Errorf("%w: %w", agentapi.ErrBadRequest, err)
	}
	keys, err := m.keys.hpke.Open(m.id, m.role, req.SealedKeys)
	if err != nil {
		return fmt.Errorf("%w: %w", agentapi.ErrBadRequest, err)
	}
	defer keys.Zeroize()
	if m.role != attest.RoleSource && keys.Epoch != g.ToEpoch {
		return fmt.Errorf("%w: sealed keys of epoch %d, the grant says %d", agentapi.ErrBadRequest, keys.Epoch, g.ToEpoch)
	}
	// The grant is recorded first: the phase entered next may start the reception, which
	// reads it.
	m.sealed, m.grant = digest, g
	if err := n.takeKeys(m, keys, g); err != nil {
		m.sealed, m.grant = [sha256.Size]byte{}, nil
		return err
	}
	m.keys.dropEarlier()
	n.log.Info("Keys opened", attrMigration, m.id, attrRole, string(m.role), attrEpoch, keys.Epoch)
	return nil
}

func (n *Node) isStopping() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.stopping
}

// checkGrant checks the grant of a keys delivery against what m knows for itself, its
// current attempt's key and nonce. Callers hold m.mu.
func (n *Node) checkGrant(m *migration, req *agentapi.KeysRequest) (*grant.Grant, error) {
	return n.checkGrantFor(m, req, m.keys.hpke.PublicKey(), m.nonce)
}

// checkGrantFor is checkGrant for the attempt of HPKE public key pub and nonce. Callers hold
// m.mu.
func (n *Node) checkGrantFor(m *migration, req *agentapi.KeysRequest, pub, nonce []byte) (*grant.Grant, error) {
	want := grant.Expectation{
		Op: grant.OpRelease, MigrationID: m.id, Role: m.role, Tenant: m.tenant, VM: m.vm, Host: n.cfg.Host,
		HPKEPublicKey: pub, Nonce: nonce, Sealed: req.SealedKeys,
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
		n.mu.Lock()
		if m.g.mdk != nil {
			want.Epoch = m.g.epoch
		}
		n.mu.Unlock()
	}
	return grant.Check(req.Grant, n.cfg.KeybrokerKey, want)
}

// takeKeys puts opened keys where m's role needs them, with what the grant g says of the
// peer, and moves m on: a source to keyed, an adoption to adopted, a destination to
// receiving. Callers hold m.mu.
func (n *Node) takeKeys(m *migration, keys *seal.Keys, g *grant.Grant) error {
	switch m.role {
	case attest.RoleSource:
		if len(keys.TK) == 0 {
			return fmt.Errorf("%w: no transfer key in the sealed keys", agentapi.ErrBadRequest)
		}
		tk, err := dataplane.NewSecretKey(keys.TK)
		if err != nil {
			return err
		}
		if err := m.enter(phaseKeyed); err != nil {
			tk.Destroy()
			return err
		}
		m.keys.tk = tk
	case attest.RoleAdopt:
		if len(keys.MDK) == 0 {
			return fmt.Errorf("%w: no memory data key in the sealed keys", agentapi.ErrBadRequest)
		}
		mdk, err := dataplane.NewSecretKey(keys.MDK)
		if err != nil {
			return err
		}
		n.mu.Lock()
		defer n.mu.Unlock()
		if n.guests[m.g.key()] != m.g {
			mdk.Destroy()
			return fmt.Errorf("%w: guest %s/%s left the host", agentapi.ErrNotFound, m.tenant, m.vm)
		}
		if m.g.migration != "" {
			// The migration's transfer holds the guest's MDK and destroys it when it
			// commits: a new one now would outlive the residency it is for.
			mdk.Destroy()
			return fmt.Errorf("%w: guest %s/%s is in migration %s", agentapi.ErrConflict, m.tenant, m.vm, m.g.migration)
		}
		if err := m.enter(phaseAdopted); err != nil { // zeroizes the HPKE key
			mdk.Destroy()
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
		m.keys.recv, m.epoch = dataplane.Keys{TK: tk, MDK: mdk, Identity: m.keys.hpke, PeerKey: g.Source.HPKEPublicKey}, keys.Epoch
		if err := n.start(m, phaseReceiving, func(ctx context.Context) { n.backend.receive(ctx, m) }); err != nil {
			tk.Destroy()
			mdk.Destroy()
			m.keys.recv = dataplane.Keys{}
			return err
		}
	default:
		return fmt.Errorf("%w: role %q", agentapi.ErrBadRequest, m.role)
	}
	return nil
}

// start runs task as m's task, under the node's lifetime (not the request's), and moves m
// to phase to (sending or receiving). Callers hold m.mu; the task waits for it to be
// released before it touches m.
func (n *Node) start(m *migration, to phase, task func(ctx context.Context)) error {
	// Checked before the task starts: once it runs, it waits for m.mu, which is held here.
	if from := m.phase(); !slices.Contains(transitions[from], to) {
		return errPhase{from, to}
	}
	ctx, cancel := context.WithCancel(n.life)
	done := make(chan struct{})
	n.mu.Lock()
	ok := n.spawn(func() { defer close(done); task(ctx) })
	n.mu.Unlock()
	if !ok {
		cancel()
		return errStopping
	}
	m.cancel, m.done = cancel, done
	return m.enter(to) // allowed: checked above under the same lock
}

// takeReceiveKeys hands the destination's keys to its reception.
func (m *migration) takeReceiveKeys() dataplane.Keys {
	m.mu.Lock()
	defer m.mu.Unlock()
	keys := m.keys.recv
	m.keys.recv = dataplane.Keys{}
	return keys
}

// received ends a reception. With err, m failed, and res (if any) says what the data plane
// erased; without, g runs here now with the memory data key the reception gave it, and res
// is the data plane's result (nil for a libvirt guest).
func (n *Node) received(m *migration, g *guest, res *dataplane.DestinationResult, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		m.failure = err.Error()
		if res != nil {
			m.dstErasure = res.Erasure
		}
		if m.region != nil {
			m.region.Close()
			m.region = nil
		}
		if err := m.enter(phaseFailed); err != nil {
			n.log.Error("Recording the failed reception failed", attrMigration, m.id, attrError, err)
		}
		n.log.Warn("Receiving failed; destination erased", attrMigration, m.id, attrError, m.failure)
		n.cfg.Metrics.MigrationEnded(attest.RoleDestination, OutcomeFailed)
		return
	}
	if res != nil {
		m.digest = res.MemoryDigest
		if ack, err := json.Marshal(res.Commit); err == nil {
			m.commitAck = ack
		}
	}
	g.epoch, g.launch = m.epoch, m.clean
	m.region = nil // the guest's memory now
	if err := m.enter(phaseCommitted); err != nil {
		n.log.Error("Recording the committed reception failed", attrMigration, m.id, attrError, err)
	}
	n.mu.Lock()
	n.guests[g.key()] = g
	n.startWorkload(n.life, g)
	n.mu.Unlock()
	n.hostChanged()
	n.cfg.Metrics.MigrationEnded(attest.RoleDestination, OutcomeCommitted)
	n.log.Info("Guest received and resumed", attrMigration, m.id, attrTenant, m.tenant, attrVM, m.vm,
		attrEpoch, m.epoch, attrDigest, hex.EncodeToString(m.digest))
}

// Transfer starts moving the guest to req.DataEndpoint in the background and returns the
// transfer's state; called again, it returns the current state and starts nothing. It
// returns ErrNotFound, ErrBadRequest (no keys yet, no endpoint, a bad stream count) or
// ErrConflict (the migration was aborted).
func (n *Node) Transfer(ctx context.Context, req *agentapi.TransferRequest, report agentapi.ProgressFunc) (*agentapi.Progress, error) {
	m, err := n.lookup(req.MigrationID)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch p := m.phase(); {
	case m.role != attest.RoleSource:
		return nil, fmt.Errorf("%w: migration %s is not a source migration here", agentapi.ErrBadRequest, m.id)
	case m.progress != nil:
		p := *m.progress
		return &p, nil
	case p == phaseAborted:
		return nil, fmt.Errorf("%w: migration %s was aborted", agentapi.ErrConflict, m.id)
	case p != phaseKeyed:
		return nil, fmt.Errorf("%w: migration %s has no keys yet", agentapi.ErrBadRequest, m.id)
	case req.DataEndpoint != "" && req.DataEndpoint != m.grant.DataEndpoint:
		n.log.Warn("Transfer refused: endpoint not granted", attrMigration, m.id, attrEndpoint, req.DataEndpoint)
		return nil, fmt.Errorf("%w: refusing to send to %s: the keybroker's grant names %s", agentapi.ErrBadRequest, req.DataEndpoint, m.grant.DataEndpoint)
	}
	n.mu.Lock()
	g, mdk := n.guests[m.g.key()], m.g.mdk
	n.mu.Unlock()
	if g != m.g {
		return nil, fmt.Errorf("%w: guest %s/%s left the host", agentapi.ErrNotFound, m.tenant, m.vm)
	}
	keys := dataplane.Keys{TK: m.keys.tk, MDK: mdk, Identity: m.keys.hpke, PeerKey: m.grant.Destination.HPKEPublicKey}
	task, err := n.backend.sender(m, req, keys, report)
	if err != nil {
		return nil, err
	}
	if err := n.start(m, phaseSending, task); err != nil {
		return nil, err
	}
	m.keys.tk = nil // the transfer owns TK now
	m.progress = &agentapi.Progress{MigrationID: m.id, Phase: agentapi.TransferStarted, TotalBytes: uint64(m.size), Time: n.cfg.Now()}
	n.log.Info("Transfer started", attrMigration, m.id, attrEndpoint, m.grant.DataEndpoint, attrDomain, g.domain)
	p := *m.progress
	return &p, nil
}

// onProgress records and publishes a pre-copy round, and notes it in tl.
func (n *Node) onProgress(m *migration, tl *transferLog, p dataplane.Progress, report agentapi.ProgressFunc) {
	ap := agentapi.Progress{
		MigrationID: m.id, Phase: agentapi.TransferPrecopy,
		Bytes: uint64(p.TotalBytes), Pages: uint64(p.TotalPages), TotalBytes: uint64(m.size),
		Round: p.Round + 1, DirtyRate: p.DirtyRate * dataplane.PageSize, ETA: max(p.ETA, 0), Time: n.cfg.Now(),
		Throughput: p.Rate, Throttle: p.Throttle,
		// The data plane's ETA is negative when the guest dirties pages faster than they go.
		NotConverging: p.ETA < 0 && !p.Final,
	}
	if p.Final {
		ap.Phase = agentapi.TransferCutover
	}
	if !p.InRound {
		tl.round(p)
	}
	m.setProgress(ap)
	n.log.Debug("Pre-copy round", attrMigration, m.id, attrRound, ap.Round, attrPhase, string(ap.Phase), attrBytes, ap.Bytes)
	n.publish(report, ap)
}

// transferLog is what the agent notes of one transfer's rounds as the data plane reports them
// (the data plane measures the pause itself: SourceResult.Downtime). The data plane's
// goroutine writes it (Progress); the backend reads it after Source.Run returns, so it needs
// no lock.
type transferLog struct {
	rounds []agentapi.RoundStats
}

// round notes a round the data plane reported.
func (tl *transferLog) round(p dataplane.Progress) {
	var d time.Duration
	if p.Rate > 0 {
		d = time.Duration(float64(p.Bytes) / p.Rate * float64(time.Second))
	}
	if len(tl.rounds) == agentapi.MaxRounds {
		tl.rounds = tl.rounds[1:]
	}
	tl.rounds = append(tl.rounds, agentapi.RoundStats{
		Round: p.Round + 1, Final: p.Final, Pages: uint64(p.Pages), Bytes: uint64(p.Bytes),
		DirtyRate: p.DirtyRate * dataplane.PageSize, Throughput: p.Rate, Duration: d, Throttle: p.Throttle,
	})
}

// downtimeLimit is a transfer's downtime limit: the broker's (req), held to the tenant's as
// the keybroker signed it in the grant, so that a broker cannot loosen what the tenant's
// policy asks. Zero means none.
func downtimeLimit(req time.Duration, g *grant.Grant) time.Duration {
	if g == nil {
		return agentapi.DowntimeLimit(req, 0)
	}
	return agentapi.DowntimeLimit(req, g.MaxDowntime)
}

// setProgress records the transfer's latest report.
func (m *migration) setProgress(p agentapi.Progress) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.progress = &p
}

func (n *Node) publish(report agentapi.ProgressFunc, p agentapi.Progress) {
	if report == nil {
		return
	}
	if err := report(p); err != nil {
		n.log.Warn("Publishing progress failed", attrMigration, p.MigrationID, attrError, err)
	}
}

// sendOutcome is how a transfer ended, as its backend saw it.
type sendOutcome struct {
	// progress holds the transfer's final counters; sent sets its phase and error.
	progress agentapi.Progress
	// commit is the destination's acknowledgement; nil if none came.
	commit *dataplane.Commit
	// erasure is what the data plane erased at commit.
	erasure attest.ErasureStatement
	err     error
}

// sent ends a transfer. Committed: the guest left the host, its workload is stopped, and
// release (if not nil) frees what the backend held of it. Not
// committed: the transfer failed and the guest runs here again, unless the FIN went out
// without an acknowledgement (dataplane.ErrCommitUnknown without ErrPeerAborted): then the
// guest stays paused, in doubt, until a receipt says how the migration ended.
func (n *Node) sent(m *migration, out sendOutcome, report agentapi.ProgressFunc, release func()) {
	p := out.progress
	if out.commit == nil {
		inDoubt := errors.Is(out.err, dataplane.ErrCommitUnknown) && !errors.Is(out.err, dataplane.ErrPeerAborted)
		p.Phase, p.Error, p.MemoryDigest = agentapi.TransferFailed, out.err.Error(), nil
		m.mu.Lock()
		to := phaseFailed
		if inDoubt {
			to = phaseInDoubt
		}
		if err := m.enter(to); err != nil {
			n.log.Error("Recording the failed transfer failed", attrMigration, m.id, attrError, err)
		}
		m.progress = &p
		m.mu.Unlock()
		n.log.Warn("Transfer failed", attrMigration, m.id, attrError, out.err, attrPaused, inDoubt)
		n.cfg.Metrics.MigrationEnded(attest.RoleSource, OutcomeFailed)
		n.publish(report, p)
		return
	}
	if out.err != nil {
		n.log.Error("Committed, but erasing the source failed", attrMigration, m.id, attrError, out.err)
	}
	ack, aerr := json.Marshal(out.commit)
	st := out.erasure
	st.KeysZeroized = append(st.KeysZeroized, attest.KeyHPKE)
	stmt, serr := st.Encode()
	if e := errors.Join(aerr, serr); e != nil {
		n.log.Error("Encoding the commit failed", attrMigration, m.id, attrError, e)
	}
	p.Phase, p.CommitAck = agentapi.TransferCommitted, ack
	g := m.g
	m.mu.Lock()
	if err := m.enter(phaseCommitted); err != nil {
		n.log.Error("Recording the commit failed", attrMigration, m.id, attrError, err)
	}
	m.commitAck, m.erasure, m.progress = ack, stmt, &p
	n.mu.Lock()
	delete(n.guests, g.key())
	g.mdk = nil // destroyed by the data plane
	stop := g.stop
	g.stop = nil
	n.mu.Unlock()
	m.mu.Unlock()
	if stop != nil {
		stop()
	}
	if release != nil {
		release()
	}
	n.hostChanged()
	n.cfg.Metrics.MigrationEnded(attest.RoleSource, OutcomeCommitted)
	n.log.Info("Transfer committed; guest left the host", attrMigration, m.id, attrTenant, m.tenant, attrVM, m.vm,
		attrDomain, g.domain, attrDigest, hex.EncodeToString(p.MemoryDigest))
	n.publish(report, p)
}

// Status returns the node's view of a migration; an unknown one is reported with Known false.
func (n *Node) Status(ctx context.Context, req *agentapi.StatusRequest) (*agentapi.Status, error) {
	m, err := n.lookup(req.MigrationID)
	if err != nil {
		return &agentapi.Status{MigrationID: req.MigrationID}, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.phase()
	st := &agentapi.Status{MigrationID: m.id, Role: m.role, Known: true, Aborted: p == phaseAborted}
	st.KeysHeld = !m.keys.empty() || p.running()
	switch m.role {
	case attest.RoleSource:
		if m.progress != nil {
			pr := *m.progress
			st.Transfer = &pr
		}
		st.Erased = m.erased
	case attest.RoleDestination:
		switch {
		case p == phaseCommitted:
			st.Transfer = &agentapi.Progress{MigrationID: m.id, Phase: agentapi.TransferCommitted, TotalBytes: uint64(m.size), MemoryDigest: m.digest}
		case m.failure != "":
			st.Transfer = &agentapi.Progress{MigrationID: m.id, Phase: agentapi.TransferFailed, TotalBytes: uint64(m.size), Error: m.failure}
		}
		st.Erased = m.dstErasure != nil || p == phaseAborted
	}
	return st, nil
}

// Erase returns evidence (role erased, bound to req.Nonce) with the erasure statement of a
// committed source or an aborted destination. The erasure itself happened then: at commit
// the data plane zeroized TK and MDK and scrubbed the guest's pages, and every phase after
// it holds no key. A repeated call attests the same erasure again. It returns ErrNotFound,
// ErrBadRequest (not a source or destination migration, or an HPKE key this agent never
// attested with) or ErrConflict (neither committed nor aborted).
func (n *Node) Erase(ctx context.Context, req *agentapi.EraseRequest) (*attest.Evidence, error) {
	if err := checkIDNonce(req.MigrationID, req.Nonce); err != nil {
		return nil, err
	}
	m, err := n.lookup(req.MigrationID)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	stmt, pub, err := m.erasureToAttest(req.HPKEPublicKey)
	m.mu.Unlock()
	if err != nil {
		return nil, err
	}
	ev, err := attest.Produce(ctx, n.cfg.Attester, attest.Binding{
		MigrationID: m.id, Role: attest.RoleErased, Nonce: req.Nonce, HPKEPublicKey: pub, Statement: stmt,
	})
	if err != nil {
		return nil, fmt.Errorf("attesting the erasure: %w", err)
	}
	m.mu.Lock()
	m.erased = true
	m.mu.Unlock()
	n.log.Info("Erasure attested", attrMigration, m.id)
	return ev, nil
}

// erasureToAttest returns the erasure statement m can attest, and the HPKE public key the
// evidence binds: want, if this agent attested with it; else the grant's, if keys came;
// else the last. Callers hold m.mu.
func (m *migration) erasureToAttest(want []byte) (stmt, pub []byte, err error) {
	switch p := m.phase(); {
	case m.role == attest.RoleSource && p == phaseCommitted:
		stmt = m.erasure
	case m.role == attest.RoleDestination && p == phaseAborted:
		// A destination enters aborted only when the guest never resumed here (see ended),
		// so this statement also says the guest never ran here.
		stmt = m.abortResp.Statement
	case m.role == attest.RoleSource || m.role == attest.RoleDestination:
		return nil, nil, fmt.Errorf("%w: migration %s is neither a committed source nor an aborted destination here", agentapi.ErrConflict, m.id)
	default:
		return nil, nil, fmt.Errorf("%w: migration %s is not a source or destination migration here", agentapi.ErrBadRequest, m.id)
	}
	switch {
	case len(want) > 0:
		if !slices.ContainsFunc(m.hpkePubs, func(k []byte) bool { return bytes.Equal(k, want) }) {
			return nil, nil, fmt.Errorf("%w: migration %s never attested with that HPKE key here", agentapi.ErrBadRequest, m.id)
		}
		pub = want
	case m.grant != nil:
		end := m.grant.Source
		if m.role == attest.RoleDestination {
			end = m.grant.Destination
		}
		pub = end.HPKEPublicKey
	case len(m.hpkePubs) > 0:
		pub = m.hpkePubs[len(m.hpkePubs)-1]
	}
	return stmt, pub, nil
}

// Abort ends a migration before commit and returns the erasure statement: the destination
// stops receiving, scrubs its region and zeroizes its keys; the source stops its transfer,
// zeroizes TK and resumes the guest. A migration that committed answers Committed with the
// commit acknowledgement. A source in doubt (its FIN went out without an acknowledgement)
// acts only on req.Receipt, the keybroker's signed receipt: aborted resumes the guest,
// committed drops its copy, anything else answers Unresolved and leaves the guest paused. A
// repeated abort returns the same answer. It returns ErrNotFound, or ctx's error if ctx ends
// while the migration's task stops.
func (n *Node) Abort(ctx context.Context, req *agentapi.AbortRequest) (*agentapi.AbortResponse, error) {
	m, err := n.lookup(req.MigrationID)
	if err != nil {
		return nil, err
	}
	return n.abort(ctx, m, req.Reason, req.Receipt)
}

// endReceipt verifies proof, the keybroker's receipt of how m ended, with the pinned
// keybroker key, and returns its outcome.
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

// dropCommitted ends a source in doubt that the keybroker's receipt shows committed: the
// guest runs at the destination, so its copy here is scrubbed and dropped and its memory key
// zeroized. It returns the erasure statement. Callers hold m.mu.
func (n *Node) dropCommitted(ctx context.Context, m *migration) attest.ErasureStatement {
	g := m.g
	st := attest.ErasureStatement{MigrationID: m.id, KeysZeroized: []string{attest.KeyTransfer, attest.KeyHPKE}}
	n.mu.Lock()
	if n.guests[g.key()] != g {
		n.mu.Unlock()
		return st
	}
	delete(n.guests, g.key())
	stop, mdk := g.stop, g.mdk
	g.stop, g.mdk = nil, nil
	n.mu.Unlock()
	if stop != nil {
		stop()
	}
	if mdk != nil {
		mdk.Destroy()
		st.KeysZeroized = append(st.KeysZeroized, attest.KeyMemoryData)
	}
	n.backend.discard(ctx, g, &st)
	n.hostChanged()
	n.log.Info("Transfer committed after all; the guest's copy here scrubbed", attrMigration, m.id)
	return st
}

// ended answers an abort of m that is decided already, or returns nil. Callers hold m.mu.
func (m *migration) ended() *agentapi.AbortResponse {
	switch m.phase() {
	case phaseAborted:
		r := *m.abortResp
		return &r
	case phaseCommitted:
		// A destination that resumed the guest answers with the acknowledgement it sent, so
		// that the broker completes the commit (the source may never have received it).
		r := &agentapi.AbortResponse{Committed: true, CommitAck: m.commitAck, MemoryDigest: m.digest}
		if m.role == attest.RoleSource && m.progress != nil {
			r.MemoryDigest = m.progress.MemoryDigest
		}
		return r
	}
	return nil
}

func (n *Node) abort(ctx context.Context, m *migration, reason string, proof json.RawMessage) (*agentapi.AbortResponse, error) {
	// The abort acts only on a phase it checked under the lock it still holds: while it
	// waits for a task to stop, another request may start one (Keys a reception, Transfer a
	// transfer), which it must then stop too.
	m.mu.Lock()
	for m.phase().running() {
		cancel, done := m.cancel, m.done
		m.mu.Unlock()
		cancel()
		select {
		case <-done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		m.mu.Lock()
	}
	defer m.mu.Unlock()
	if r := m.ended(); r != nil {
		return r, nil
	}
	var st attest.ErasureStatement
	resp := &agentapi.AbortResponse{}
	switch m.role {
	case attest.RoleSource:
		st = attest.ErasureStatement{KeysZeroized: []string{}}
		if m.grant != nil {
			// TK: zeroized on entering aborted below, or by the transfer that took it.
			st.KeysZeroized = append(st.KeysZeroized, attest.KeyTransfer)
		}
		if m.phase() == phaseInDoubt {
			// Whether the destination resumed the guest is known only to the keybroker.
			switch outcome, err := n.endReceipt(m, proof); {
			case err != nil:
				n.log.Warn("Keeping the guest paused: whether the destination resumed it is unknown", attrMigration, m.id, attrReason, reason, attrError, err)
				return &agentapi.AbortResponse{Unresolved: true}, nil
			case outcome == receipt.OutcomeAborted:
				if err := n.backend.resume(context.WithoutCancel(ctx), m); err != nil {
					n.log.Error("Resuming the guest failed", attrMigration, m.id, attrError, err)
				}
			case outcome == receipt.OutcomeErased || outcome == receipt.OutcomeCommittedUnverifiedErasure:
				dropped := n.dropCommitted(context.WithoutCancel(ctx), m)
				if b, err := dropped.Encode(); err == nil {
					m.erasure = b
				}
				if err := m.enter(phaseCommitted); err != nil {
					return nil, err
				}
				return &agentapi.AbortResponse{Committed: true}, nil
			default:
				n.log.Warn("Keeping the guest paused: the abort is not verified", attrMigration, m.id, attrOutcome, string(outcome))
				return &agentapi.AbortResponse{Unresolved: true}, nil
			}
		}
		g := m.g
		n.mu.Lock()
		if g.migration == m.id {
			g.migration = ""
		}
		resp.Resumed = n.guests[g.key()] == g
		n.mu.Unlock()
	case attest.RoleDestination:
		if m.dstErasure != nil {
			st = *m.dstErasure
		} else {
			var err error
			if st, err = m.dst.Abort(ctx, m.keys.recv); err != nil {
				n.log.Error("Scrubbing the receive region failed", attrMigration, m.id, attrError, err)
			}
			m.keys.recv = dataplane.Keys{}
		}
		m.ln.Close()
		if m.region != nil {
			m.region.Close()
			m.region = nil
		}
	}
	if m.keys.hpke != nil || m.grant != nil {
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
	if err := m.enter(phaseAborted); err != nil {
		return nil, err
	}
	m.abortResp = resp
	if m.role != attest.RoleAdopt {
		n.cfg.Metrics.MigrationEnded(m.role, OutcomeAborted)
	}
	n.log.Info("Migration aborted", attrMigration, m.id, attrRole, string(m.role), attrReason, reason, attrResumed, resp.Resumed)
	r := *resp
	return &r, nil
}
