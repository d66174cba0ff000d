package migagent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// One migration's state on this host.
//
// A migration is in one phase at a time, and changes phase only through enter, which
// allows exactly the changes in the transitions table below. The keys a migration holds
// (its HPKE private key, TK, and the destination's MDK until the guest takes it) live in
// one place, its secrets, and every phase that holds no key wipes them on entry: that is
// the whole of "no key survives the commit or abort that ends a migration", checked by
// TestTransitions for every edge of the table.
//
//	source:       attested ──keys──▶ keyed ──transfer──▶ sending ──▶ committed
//	                  │                │                    ├──────▶ failed ──abort──▶ aborted
//	                  └──abort─────────┴──abort──▶ aborted  └──────▶ in-doubt ──receipt──▶ committed | aborted
//	destination:  prepared ──keys──▶ receiving ──▶ committed | failed ──abort──▶ aborted
//	                  └──abort──▶ aborted
//	adoption:     attested ──keys──▶ adopted
//
// Locking: a migration's mu guards its fields; Node.mu guards only the node's maps and the
// guests' fields, is taken after a migration's mu and never held across I/O. The phase can
// be read without mu (for the node's lookups); it is written under it.

// phase is where a migration is on this host.
type phase uint32

const (
	// phaseAttested: a source or an adoption; evidence bound to its HPKE key went out.
	phaseAttested phase = iota + 1
	// phasePrepared: a destination; its receive region is scrubbed, its listener open and
	// evidence bound to its HPKE key went out.
	phasePrepared
	// phaseKeyed: a source opened its keys; it holds TK, the grant and its HPKE key.
	phaseKeyed
	// phaseSending: a source's transfer runs; it owns TK and the HPKE key.
	phaseSending
	// phaseReceiving: a destination's reception runs; it owns TK, MDK and the HPKE key.
	phaseReceiving
	// phaseFailed: the transfer or reception ended without a commit. A source runs its guest
	// again; a destination scrubbed its region. No key is left.
	phaseFailed
	// phaseInDoubt: a source whose FIN went out without an acknowledgement. The guest stays
	// paused until the keybroker's signed receipt says how the migration ended.
	phaseInDoubt
	// phaseCommitted: a source holds the commit acknowledgement and the guest left; a
	// destination sent it and the guest runs here.
	phaseCommitted
	// phaseAdopted: an adoption's guest holds its memory data key.
	phaseAdopted
	// phaseAborted: an abort ended the migration.
	phaseAborted
)

var phaseNames = [...]string{
	phaseAttested: "attested", phasePrepared: "prepared", phaseKeyed: "keyed", phaseSending: "sending",
	phaseReceiving: "receiving", phaseFailed: "failed", phaseInDoubt: "in-doubt", phaseCommitted: "committed",
	phaseAdopted: "adopted", phaseAborted: "aborted",
}

func (p phase) String() string {
	if int(p) < len(phaseNames) && phaseNames[p] != "" {
		return phaseNames[p]
	}
	return fmt.Sprintf("phase(%d)", uint32(p))
}

// transitions lists, for each phase, the phases a migration may enter from it. A phase
// entering itself is a repeat (attest or prepare again), which replaces the HPKE key.
var transitions = map[phase][]phase{
	phaseAttested:  {phaseAttested, phaseKeyed, phaseAdopted, phaseAborted},
	phasePrepared:  {phasePrepared, phaseReceiving, phaseAborted},
	phaseKeyed:     {phaseSending, phaseAborted},
	phaseSending:   {phaseCommitted, phaseFailed, phaseInDoubt},
	phaseReceiving: {phaseCommitted, phaseFailed},
	phaseFailed:    {phaseAborted},
	phaseInDoubt:   {phaseCommitted, phaseAborted},
	phaseCommitted: {},
	phaseAdopted:   {phaseAborted},
	phaseAborted:   {},
}

// holdsKeys reports whether a migration in p may hold keys. Entering any other phase
// wipes the migration's secrets.
func (p phase) holdsKeys() bool {
	switch p {
	case phaseAttested, phasePrepared, phaseKeyed, phaseSending, phaseReceiving:
		return true
	}
	return false
}

// running reports whether a migration in p has a task (transfer or reception) running.
func (p phase) running() bool { return p == phaseSending || p == phaseReceiving }

// errPhase is returned by enter for a change the table does not allow: a bug in the
// agent, never a peer's doing (handlers check the phase before they act).
type errPhase struct{ from, to phase }

func (e errPhase) Error() string {
	return fmt.Sprintf("migration cannot go from %s to %s", e.from, e.to)
}

// secrets are the keys a migration holds, in one place.
type secrets struct {
	// hpke is the migration's ephemeral HPKE key, which its evidence binds: it opens the
	// sealed keys, and in the data-plane handshake it proves to the peer that this is the
	// attested agent.
	hpke *seal.PrivateKey
	// earlier are the migration's earlier attempts (attests or preparations answering
	// another nonce), until keys are opened: keys the keybroker sealed to one of them, stored
	// by a broker before a retry of its made the next, must still open (see Node.Attest).
	earlier []attempt
	// tk is a source's TK, from the opening of its keys until its transfer takes it.
	tk *dataplane.SecretKey
	// recv are a destination's TK and MDK_{e+1}, from the opening of its keys until its
	// reception takes them.
	recv dataplane.Keys
}

// attempt is one attestation of a migration: the keybroker's nonce it answered, the HPKE
// key its evidence binds, the evidence, and a destination's clean-memory statement in it.
type attempt struct {
	nonce    []byte
	key      *seal.PrivateKey
	evidence *attest.Evidence
	clean    []byte
}

// zeroize wipes every key still held. The keys a running task took are its own to wipe.
func (s *secrets) zeroize() {
	if s.hpke != nil {
		s.hpke.Zeroize()
		s.hpke = nil
	}
	s.dropEarlier()
	s.tk.Destroy()
	s.tk = nil
	s.recv.TK.Destroy()
	s.recv.MDK.Destroy()
	s.recv = dataplane.Keys{}
}

// dropEarlier zeroizes the keys of the earlier attempts.
func (s *secrets) dropEarlier() {
	for _, a := range s.earlier {
		a.key.Zeroize()
	}
	s.earlier = nil
}

// empty reports whether no key is held.
func (s *secrets) empty() bool {
	return s.hpke == nil && len(s.earlier) == 0 && s.tk == nil && s.recv.TK == nil && s.recv.MDK == nil
}

// newAttempt makes a its current attempt; the current one, if any, joins the earlier ones.
// Callers hold m.mu.
func (m *migration) newAttempt(a attempt) {
	if m.keys.hpke != nil {
		m.keys.earlier = append(m.keys.earlier, m.current())
	}
	m.keys.hpke, m.nonce, m.evidence, m.clean = a.key, bytes.Clone(a.nonce), a.evidence, a.clean
	m.hpkePubs = append(m.hpkePubs, a.key.PublicKey())
}

// current returns m's current attempt. Callers hold m.mu.
func (m *migration) current() attempt {
	return attempt{nonce: m.nonce, key: m.keys.hpke, evidence: m.evidence, clean: m.clean}
}

// answered returns the evidence of m's attempt that answered nonce, or nil if none did.
// Callers hold m.mu.
func (m *migration) answered(nonce []byte) *attest.Evidence {
	if m.keys.hpke != nil && bytes.Equal(m.nonce, nonce) {
		return m.evidence
	}
	for _, a := range m.keys.earlier {
		if bytes.Equal(a.nonce, nonce) {
			return a.evidence
		}
	}
	return nil
}

// useEarlier makes m's earlier attempt i its current one, and the current one an earlier one.
// Callers hold m.mu.
func (m *migration) useEarlier(i int) {
	a := m.keys.earlier[i]
	m.keys.earlier[i] = m.current()
	m.keys.hpke, m.nonce, m.evidence, m.clean = a.key, a.nonce, a.evidence, a.clean
}

// migration is the node's state of one migration, or of an adoption.
type migration struct {
	// Immutable.
	id         string
	role       attest.Role
	tenant, vm string
	size       int64
	g          *guest // the source's or adoption's guest; nil for a destination
	seq        uint64 // the order in which the node made its migrations

	// state is the phase, written by enter under mu and readable without it.
	state atomic.Uint32

	mu sync.Mutex
	// keys are the migration's secrets; see secrets.
	keys secrets
	// hpkePubs are the public halves of the HPKE keys the migration attested with, the last
	// one last: its erasure evidence binds the one the keybroker released to, so that the
	// keybroker can tell this end's evidence from any other agent's (platform claims can be
	// alike on two machines).
	hpkePubs [][]byte
	// nonce is the keybroker's nonce the current attempt's evidence answered (keys.hpke's),
	// and evidence that evidence.
	nonce    []byte
	evidence *attest.Evidence
	// sealed is the SHA-256 of the sealed keys opened, so that the same delivery can be
	// repeated; grant is the keybroker's signed grant they came with. Set on leaving
	// attested or prepared for keyed, receiving or adopted.
	sealed [sha256.Size]byte
	grant  *grant.Grant
	// cancel ends the migration's task; done is closed when it has ended. Set on entering
	// sending or receiving.
	cancel context.CancelFunc
	done   chan struct{}
	// progress is the source's last transfer report; nil before the transfer starts.
	progress *agentapi.Progress
	// commitAck is the commit acknowledgement (committed); digest the memory digest of a
	// destination's guest.
	commitAck []byte
	digest    []byte
	// erasure is a committed source's encoded erasure statement; erased says evidence of it
	// went out.
	erasure []byte
	erased  bool
	// failure is a failed destination's error; dstErasure its erasure by the data plane.
	failure    string
	dstErasure *attest.ErasureStatement
	// abortResp is the answer to every abort once the migration is aborted.
	abortResp *agentapi.AbortResponse

	// Destination.
	dst    *dataplane.Destination
	region *dataplane.Region // the receive region, until the guest takes it
	ln     net.Listener
	// endpoint is the data endpoint bound into the clean-memory statement clean.
	endpoint string
	clean    []byte
	epoch    uint64
	// lanes is how many lanes beyond the first stream the destination accepts
	// (PrepareResponse.Lanes).
	lanes int

	// lv is the libvirt side of a libvirt migration (libvirt.go); nil for other guests.
	lv *lvMigration
}

// migrationSeq numbers migrations in the order they are made.
var migrationSeq atomic.Uint64

// newMigration returns a migration of role in phase p.
func newMigration(id string, role attest.Role, tenant, vm string, size int64, p phase) *migration {
	m := &migration{id: id, role: role, tenant: tenant, vm: vm, size: size, seq: migrationSeq.Add(1)}
	m.state.Store(uint32(p))
	return m
}

// phase returns m's phase.
func (m *migration) phase() phase { return phase(m.state.Load()) }

// enter moves m to phase to, if the table allows it, and wipes m's secrets if to holds no
// key. Callers hold m.mu.
func (m *migration) enter(to phase) error {
	from := m.phase()
	if !slices.Contains(transitions[from], to) {
		return errPhase{from, to}
	}
	m.state.Store(uint32(to))
	if !to.holdsKeys() {
		m.keys.zeroize()
	}
	return nil
}
