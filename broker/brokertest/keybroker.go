// Package brokertest provides a hand-written fake keybroker implementing broker.KeyBroker, for
// tests of the broker. It talks to no Vault, verifies nothing and seals nothing: its "sealed
// keys" and receipts are marked fake, and its residency log (in memory) holds only the
// endings it signed receipts for. It must never be linked into a production binary.
package brokertest

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// KeyBroker is a fake keybroker. The zero value is ready to use.
type KeyBroker struct {
	// Deny makes Release and Adopt deny with this reason when not empty.
	Deny string
	// RefuseErasure makes a commit with erasure evidence fail with code unproven and this
	// reason, unless it asks for an unverified erasure.
	RefuseErasure string
	// MaxDowntime is the tenant's downtime limit a release reports, as a policy's
	// spec.transport.maxDowntime; zero for none.
	MaxDowntime time.Duration
	// RefuseForget makes Forget refuse with code unauthorized and this reason when not empty.
	RefuseForget string

	mu       sync.Mutex
	nonces   int
	releases []kbwire.ReleaseRequest
	adopts   []kbwire.AdoptRequest
	reissues []kbwire.ReissueRequest
	destroys []kbwire.DestroyRequest
	forgets  []kbwire.ForgetRequest
	epochs   map[string]uint64 // guest → current epoch, as the keybroker keeps it
	ended    map[string]bool   // migrations committed
	log      tlog.Tree         // the endings' entries
	heads    map[string]tlog.Link
	seqs     map[string]uint64
}

// Nonce implements broker.KeyBroker.
func (k *KeyBroker) Nonce(_ context.Context, req *kbwire.NonceRequest) (*kbwire.NonceResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.nonces++
	return &kbwire.NonceResponse{Nonce: fmt.Appendf(nil, "nonce-%d-%s-%s", k.nonces, req.MigrationID, req.Role)}, nil
}

// Release implements broker.KeyBroker.
func (k *KeyBroker) Release(_ context.Context, req *kbwire.ReleaseRequest) (*kbwire.ReleaseResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.releases = append(k.releases, *req)
	if k.Deny != "" {
		return nil, fmt.Errorf("keybroker %w: %w", broker.ErrDenied, wireerr.New(kbwire.CodeDenied, k.Deny))
	}
	e := k.epochs[req.Tenant+"."+req.VM]
	return &kbwire.ReleaseResponse{
		MigrationID:       req.MigrationID,
		FromEpoch:         e,
		ToEpoch:           e + 1,
		SealedSource:      []byte("fake-sealed-tk-for-" + req.MigrationID),
		SealedDestination: []byte("fake-sealed-tk-mdk-for-" + req.MigrationID),
		WrappedMDK:        fmt.Sprintf("vault:v1:fake-%s-%s-e%d", req.Tenant, req.VM, e+1),
		MaxDowntime:       k.MaxDowntime,
	}, nil
}

// Adopt implements broker.KeyBroker.
func (k *KeyBroker) Adopt(_ context.Context, req *kbwire.AdoptRequest) (*kbwire.AdoptResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.adopts = append(k.adopts, *req)
	if k.Deny != "" {
		return nil, fmt.Errorf("keybroker %w: %w", broker.ErrDenied, wireerr.New(kbwire.CodeDenied, k.Deny))
	}
	if k.epochs == nil {
		k.epochs = map[string]uint64{}
	}
	k.epochs[req.Tenant+"."+req.VM] = 1
	return &kbwire.AdoptResponse{Sealed: []byte("fake-sealed-mdk1"), Epoch: 1,
		WrappedMDK: fmt.Sprintf("vault:v1:fake-%s-%s-e1", req.Tenant, req.VM)}, nil
}

// Reissue implements broker.KeyBroker: it answers with the guest's current epoch.
func (k *KeyBroker) Reissue(_ context.Context, req *kbwire.ReissueRequest) (*kbwire.ReissueResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.reissues = append(k.reissues, *req)
	if k.Deny != "" {
		return nil, fmt.Errorf("keybroker %w: %w", broker.ErrDenied, wireerr.New(kbwire.CodeDenied, k.Deny))
	}
	e, ok := k.epochs[req.Tenant+"."+req.VM]
	if !ok {
		return nil, wireerr.New(kbwire.CodeNotAdopted, "guest not adopted")
	}
	return &kbwire.ReissueResponse{Sealed: []byte("fake-sealed-mdk-reissued"), Epoch: e}, nil
}

// Reissues returns the reissue requests received so far.
func (k *KeyBroker) Reissues() []kbwire.ReissueRequest {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]kbwire.ReissueRequest(nil), k.reissues...)
}

// Forget implements broker.KeyBroker: it verifies no statement, and forgets an adopted
// guest's epoch.
func (k *KeyBroker) Forget(_ context.Context, req *kbwire.ForgetRequest) (*kbwire.ForgetResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.forgets = append(k.forgets, *req)
	if k.RefuseForget != "" {
		return nil, wireerr.New(kbwire.CodeUnauthorized, k.RefuseForget)
	}
	key := req.Tenant + "." + req.VM
	e := k.epochs[key]
	if e == 0 {
		return nil, wireerr.New(kbwire.CodeNotAdopted, "guest not adopted")
	}
	delete(k.epochs, key)
	name := fmt.Sprintf("lethe-%s-%s-e%d", req.Tenant, req.VM, e)
	return &kbwire.ForgetResponse{Tenant: req.Tenant, VM: req.VM, ForgetID: "forget-fake", Epoch: e, DestroyedKeys: []string{name}, By: "tenant"}, nil
}

// Forgets returns the forget requests received so far.
func (k *KeyBroker) Forgets() []kbwire.ForgetRequest {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]kbwire.ForgetRequest(nil), k.forgets...)
}

// Destroy implements broker.KeyBroker.
func (k *KeyBroker) Destroy(_ context.Context, req *kbwire.DestroyRequest) (*broker.DestroyResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.destroys = append(k.destroys, *req)
	if k.RefuseErasure != "" && req.Erasure != nil && !req.UnverifiedErasure {
		return nil, wireerr.New(kbwire.CodeErasureRejected, k.RefuseErasure)
	}
	if req.Ending == kbwire.Commit && !k.ended[req.MigrationID] {
		if k.ended == nil {
			k.ended = map[string]bool{}
		}
		k.ended[req.MigrationID] = true
		k.epochs[req.Tenant+"."+req.VM]++
	}
	r := &receipt.Receipt{
		Kind: receipt.Kind, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM, Outcome: receipt.OutcomeAborted,
		DestroyedKeys: []receipt.DestroyedKey{{Name: "lethe-mig-" + req.MigrationID}},
		Caveats:       []string{"signed by brokertest's fake keybroker"},
	}
	switch {
	case req.Ending == kbwire.Abort:
	case req.UnverifiedErasure || req.Erasure == nil:
		r.Outcome = receipt.OutcomeCommittedUnverifiedErasure
	default:
		r.Outcome, r.Erasure = receipt.OutcomeErased, &receipt.ErasureEvidence{Accepted: true}
	}
	env, err := receipt.Sign(r, fakeKey.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) { return ed25519.Sign(fakeKey, msg), nil })
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(env)
	if err != nil {
		return nil, err
	}
	inc, err := k.logEnding(req, r, env.Payload)
	if err != nil {
		return nil, err
	}
	return &broker.DestroyResponse{Receipt: b, Log: inc}, nil
}

// LogOrigin names the fake keybroker's residency log in its checkpoints, which are signed
// with the key of PublicKey.
const LogOrigin = "brokertest.lethe.invalid/log"

// PublicKey returns the public key of the fake keybroker's receipts and checkpoints.
func PublicKey() ed25519.PublicKey { return fakeKey.Public().(ed25519.PublicKey) }

// logEnding appends the entry of a migration's ending, naming the receipt whose payload is
// given, and returns its inclusion proof against a fresh checkpoint (tlog.Inclusion, JSON).
// Called with k.mu held.
func (k *KeyBroker) logEnding(req *kbwire.DestroyRequest, r *receipt.Receipt, payload []byte) (json.RawMessage, error) {
	if k.heads == nil {
		k.heads, k.seqs = map[string]tlog.Link{}, map[string]uint64{}
	}
	guest := req.Tenant + "." + req.VM
	kind := tlog.KindCommit
	if req.Ending == kbwire.Abort {
		kind = tlog.KindAbort
	}
	e := &tlog.Entry{
		Type: tlog.EntryType, Kind: kind, Tenant: req.Tenant, VM: req.VM, Seq: k.seqs[guest] + 1,
		MigrationID: req.MigrationID, Statement: tlog.StatementDigest(payload), Outcome: string(r.Outcome),
	}
	if head, ok := k.heads[guest]; ok {
		e.Prev = &head
	}
	leaf, err := e.Marshal()
	if err != nil {
		return nil, err
	}
	index := k.log.Size()
	k.log.Append(tlog.LeafHash(leaf))
	k.seqs[guest], k.heads[guest] = e.Seq, tlog.Link{Index: index, Hash: tlog.LeafHash(leaf)}
	size := k.log.Size()
	root, err := k.log.Root(size)
	if err != nil {
		return nil, err
	}
	proof, err := k.log.InclusionProof(index, size)
	if err != nil {
		return nil, err
	}
	cp, err := tlog.Sign(tlog.Checkpoint{Origin: LogOrigin, Size: size, Root: root}, PublicKey(),
		func(msg []byte) ([]byte, error) { return ed25519.Sign(fakeKey, msg), nil })
	if err != nil {
		return nil, err
	}
	return json.Marshal(&tlog.Inclusion{Checkpoint: cp, Entry: tlog.ProvenEntry{Index: index, Leaf: leaf, Proof: proof}})
}

// fakeKey signs the fake keybroker's receipts and checkpoints.
var fakeKey = ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))

// Destroys returns the Destroy requests received so far.
func (k *KeyBroker) Destroys() []kbwire.DestroyRequest {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]kbwire.DestroyRequest(nil), k.destroys...)
}

// Releases returns the Release requests received so far.
func (k *KeyBroker) Releases() []kbwire.ReleaseRequest {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]kbwire.ReleaseRequest(nil), k.releases...)
}
