package e2e

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// The malicious broker: these scenarios act as a broker that deviates on purpose. They hold
// the broker's real NATS credentials (s.agents and s.kbc speak as the broker does), see
// everything the broker sees (evidence, sealed keys, grants, commit acknowledgements), and
// talk to the real agents, keybroker and Vault. Each attack must be refused, and the suite's
// invariants hold after it: the guest runs in exactly one place, no live epoch key is gone,
// no page left the source except to the attested destination.
var maliciousScenarios = []scenario{
	{"malicious-broker/forged-keys-to-source", maliciousBroker(forgedToSource)},
	{"malicious-broker/forged-keys-to-destination", maliciousBroker(forgedToDestination)},
	{"malicious-broker/forged-adoption", forgedAdoption},
	{"malicious-broker/transfer-redirected", maliciousBroker(redirectTransfer)},
	{"malicious-broker/commit-straight-after-release", maliciousBroker(commitUnproven)},
	{"malicious-broker/commit-with-wrong-mac", maliciousBroker(commitWrongMAC)},
	{"malicious-broker/erasure-evidence-from-another-chip", maliciousBroker(erasureOtherChip)},
	{"malicious-broker/abort-after-commit", maliciousBroker(abortAfterCommit)},
	{"malicious-broker/another-guests-migration-id", otherGuestsID},
	{"malicious-broker/replayed-old-grant", maliciousBroker(replayGrant)},
}

// attackerKey signs the grants the malicious broker forges.
var attackerKey = func() ed25519.PrivateKey {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}()

// attackRun is one migration the malicious broker drives itself: fresh nonces, real evidence,
// and (when released) the keybroker's genuine answer.
type attackRun struct {
	id       string
	vm       string
	src, dst *agent
	req      *kbwire.ReleaseRequest
	prep     *agentapi.PrepareResponse
	rel      *kbwire.ReleaseResponse
}

// maliciousBroker runs attack on a guest adopted on a fresh SNP host, with a second SNP host as
// the destination.
func maliciousBroker(attack func(*scn, *attackRun)) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
		s.adopt(vm, a)
		attack(s, s.attest(vm, a, b))
	}
}

// attest runs the attestation round of a migration of vm from src to dst as the broker would,
// without asking for keys.
func (s *scn) attest(vm string, src, dst *agent) *attackRun {
	s.t.Helper()
	id := "adv-" + randomHex(8)
	r := &attackRun{id: id, vm: vm, src: src, dst: dst}
	r.req = s.releaseRequest(id, vm, src, dst)
	return r
}

// release asks the keybroker for r's keys, genuinely.
func (s *scn) release(r *attackRun) {
	s.t.Helper()
	rel, err := s.kbc.Release(s.t.Context(), r.req)
	if err != nil {
		s.t.Fatalf("releasing %s: %v", r.id, err)
	}
	r.rel = rel
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventRelease, keybroker.DecisionAllow})
}

// deliver hands both agents their genuine keys and grant.
func (s *scn) deliver(r *attackRun) {
	s.t.Helper()
	ctx := s.t.Context()
	for _, k := range []struct {
		a      *agent
		role   attest.Role
		sealed []byte
	}{{r.src, attest.RoleSource, r.rel.SealedSource}, {r.dst, attest.RoleDestination, r.rel.SealedDestination}} {
		if err := s.agents.Keys(ctx, k.a.host, &agentapi.KeysRequest{MigrationID: r.id, Role: k.role, SealedKeys: k.sealed, Grant: r.rel.Grant}); err != nil {
			s.t.Fatalf("delivering genuine keys to the %s: %v", k.role, err)
		}
	}
}

// abortRun ends r as an honest broker's abort would: both agents, then the keybroker with the
// destination's erasure evidence (it aborted without resuming the guest), whose receipt must
// say aborted.
func (s *scn) abortRun(r *attackRun) {
	s.t.Helper()
	ctx := s.t.Context()
	s.abortAgents(r.id, r.src, r.dst)
	nonce, err := s.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: r.id, Role: attest.RoleErased})
	if err != nil {
		s.t.Fatal(err)
	}
	// Bound to the key the keybroker released to, as the broker asks for it from the grant.
	req := &agentapi.EraseRequest{MigrationID: r.id, Nonce: nonce.Nonce}
	if r.rel != nil {
		g, err := grant.Parse(r.rel.Grant)
		if err != nil {
			s.t.Fatal(err)
		}
		req.HPKEPublicKey = g.Destination.HPKEPublicKey
	}
	ev, err := s.agents.Erase(ctx, r.dst.host, req)
	if err != nil {
		s.t.Fatalf("getting the destination's erasure evidence for %s: %v", r.id, err)
	}
	resp, err := s.kbc.Destroy(ctx, &kbwire.DestroyRequest{
		MigrationID: r.id, Tenant: demoTenant, VM: r.vm, Ending: kbwire.Abort,
		Erasure: &kbwire.Attestation{Nonce: nonce.Nonce, Evidence: ev},
	})
	if err != nil {
		s.t.Fatalf("aborting %s at the keybroker: %v", r.id, err)
	}
	if len(resp.Receipt) == 0 {
		s.t.Fatalf("no abort receipt for %s", r.id)
	}
}

// forge is what the malicious broker can make on its own: keys of its choosing sealed to an
// agent's HPKE key (which it read from the agent's evidence), and a grant that names them
// exactly as the keybroker's would, signed by a key that is not the keybroker's.
func (s *scn) forge(r *attackRun, role attest.Role, keys *seal.Keys) (sealed, signed []byte) {
	s.t.Helper()
	a := r.req.Source
	if role == attest.RoleDestination {
		a = r.req.Destination
	}
	sealed, err := seal.Seal(a.Evidence.HPKEPublicKey, r.id, role, keys)
	if err != nil {
		s.t.Fatal(err)
	}
	g := &grant.Grant{
		Kind: grant.Kind, Op: grant.OpRelease, MigrationID: r.id, Tenant: demoTenant, VM: r.vm,
		FromEpoch: 1, ToEpoch: 2, DataEndpoint: r.prep0().DataEndpoint, IssuedAt: time.Now().UTC(),
		Source:      grant.NewEnd(r.src.host, r.req.Source.Evidence, r.req.Source.Nonce, sealed),
		Destination: grant.NewEnd(r.dst.host, r.req.Destination.Evidence, r.req.Destination.Nonce, sealed),
	}
	signed, err = grant.Sign(g, attackerKey.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) {
		return ed25519.Sign(attackerKey, msg), nil
	})
	if err != nil {
		s.t.Fatal(err)
	}
	return sealed, signed
}

// prep0 returns the destination's prepare answer as the broker kept it.
func (r *attackRun) prep0() *agentapi.PrepareResponse {
	if r.prep == nil {
		st, _ := attest.ParseCleanMemoryStatement(r.req.Destination.Evidence.Statement)
		r.prep = &agentapi.PrepareResponse{Evidence: r.req.Destination.Evidence}
		if st != nil {
			r.prep.DataEndpoint = st.DataEndpoint
		}
	}
	return r.prep
}

// trap listens where the malicious broker wants pages sent and counts the connections it gets.
type trap struct {
	ln    net.Listener
	conns atomic.Int64
}

func (s *scn) trap() *trap {
	s.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.t.Fatal(err)
	}
	tr := &trap{ln: ln}
	s.t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tr.conns.Add(1)
			c.Close()
		}
	}()
	return tr
}

// refused requires err to be the agent's refusal with a message containing want.
func (s *scn) refused(what string, err error, want string) {
	s.t.Helper()
	if err == nil {
		s.t.Fatalf("%s was accepted", what)
	}
	if !strings.Contains(err.Error(), want) {
		s.t.Fatalf("%s refused for the wrong reason: %v (want %q)", what, err, want)
	}
}

// forgedToSource: the broker gives the source a TK it knows, with a grant it signed itself,
// and asks it to send the guest to the broker's own listener. The source must open nothing and
// send nothing.
func forgedToSource(s *scn, r *attackRun) {
	ctx := s.t.Context()
	tk := make([]byte, seal.KeySize)
	rand.Read(tk)
	sealed, signed := s.forge(r, attest.RoleSource, &seal.Keys{TK: tk})
	tr := s.trap()
	for _, c := range []struct {
		name  string
		grant []byte
		want  string
	}{
		{"keys without a grant", nil, "grant refused"},
		{"keys with a grant signed by the broker", signed, "not signed by the pinned keybroker key"},
	} {
		err := s.agents.Keys(ctx, r.src.host, &agentapi.KeysRequest{MigrationID: r.id, Role: attest.RoleSource, SealedKeys: sealed, Grant: c.grant})
		s.refused(c.name, err, c.want)
	}
	_, err := s.agents.Transfer(ctx, r.src.host, &agentapi.TransferRequest{MigrationID: r.id, Tenant: demoTenant, VM: r.vm, DataEndpoint: tr.ln.Addr().String()})
	s.refused("a transfer to the broker's listener", err, "no keys")
	if n := tr.conns.Load(); n != 0 {
		s.t.Fatalf("the source connected %d times to the broker's listener", n)
	}
	s.abortAgents(r.id, r.src, r.dst)
	s.outcome = "refused: the source opened no key and sent nothing"
}

// forgedToDestination: the broker seals a TK and an MDK it knows to the destination, to make
// it receive (and run) a guest the broker chose.
func forgedToDestination(s *scn, r *attackRun) {
	ctx := s.t.Context()
	tk, mdk := make([]byte, seal.KeySize), make([]byte, seal.KeySize)
	rand.Read(tk)
	rand.Read(mdk)
	sealed, signed := s.forge(r, attest.RoleDestination, &seal.Keys{TK: tk, MDK: mdk, Epoch: 2})
	err := s.agents.Keys(ctx, r.dst.host, &agentapi.KeysRequest{MigrationID: r.id, Role: attest.RoleDestination, SealedKeys: sealed, Grant: signed})
	s.refused("forged keys to the destination", err, "not signed by the pinned keybroker key")
	st, err := s.agents.Status(ctx, r.dst.host, &agentapi.StatusRequest{MigrationID: r.id})
	if err != nil || st.Transfer != nil {
		s.t.Fatalf("destination after forged keys: %+v, %v; want no reception", st, err)
	}
	s.abortAgents(r.id, r.src, r.dst)
	s.outcome = "refused: the destination opened no key and receives nothing"
}

// forgedAdoption: the broker gives a guest's first memory key, one it knows, to the agent at
// adoption, so that everything the guest spools is readable by the broker.
func forgedAdoption(s *scn) {
	vm := s.vm("g")
	a := s.agent(snp(snpBase, vm))
	ctx := s.t.Context()
	id := "adv-adopt-" + randomHex(6)
	n, err := s.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: id, Role: attest.RoleAdopt})
	if err != nil {
		s.t.Fatal(err)
	}
	ev, err := s.agents.Attest(ctx, a.host, &agentapi.AttestRequest{MigrationID: id, Role: attest.RoleAdopt, Nonce: n.Nonce, Tenant: demoTenant, VM: vm})
	if err != nil {
		s.t.Fatal(err)
	}
	mdk := make([]byte, seal.KeySize)
	rand.Read(mdk)
	sealed, err := seal.Seal(ev.HPKEPublicKey, id, attest.RoleAdopt, &seal.Keys{MDK: mdk, Epoch: 1})
	if err != nil {
		s.t.Fatal(err)
	}
	signed, err := grant.Sign(&grant.Grant{
		Kind: grant.Kind, Op: grant.OpAdopt, MigrationID: id, Tenant: demoTenant, VM: vm, ToEpoch: 1, IssuedAt: time.Now().UTC(),
		Destination: grant.NewEnd(a.host, ev, n.Nonce, sealed),
	}, attackerKey.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) { return ed25519.Sign(attackerKey, msg), nil })
	if err != nil {
		s.t.Fatal(err)
	}
	err = s.agents.Keys(ctx, a.host, &agentapi.KeysRequest{MigrationID: id, Role: attest.RoleAdopt, SealedKeys: sealed, Grant: signed})
	s.refused("a forged adoption", err, "not signed by the pinned keybroker key")
	s.abortAgents(id, a)
	// The guest is still free for a genuine adoption, which the probe then migrates.
	s.adopt(vm, a)
	s.outcome = "refused: the agent took no memory key from the broker"
}

// redirectTransfer: with genuine keys delivered, the broker asks the source to send the guest
// to the broker's own listener instead of the attested destination.
func redirectTransfer(s *scn, r *attackRun) {
	s.release(r)
	s.deliver(r)
	tr := s.trap()
	_, err := s.agents.Transfer(s.t.Context(), r.src.host, &agentapi.TransferRequest{
		MigrationID: r.id, Tenant: demoTenant, VM: r.vm, DataEndpoint: tr.ln.Addr().String(),
	})
	s.refused("a transfer redirected to the broker", err, "the keybroker's grant names")
	if n := tr.conns.Load(); n != 0 {
		s.t.Fatalf("the source connected %d times to the broker's listener", n)
	}
	s.abortRun(r)
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventDestroy, keybroker.DecisionAllow})
	s.outcome = "refused: the source sends only to the endpoint the grant names"
}

// commitUnproven: right after a release, with nothing transferred, the broker commits: the
// live source epoch would be destroyed and an erased receipt signed.
func commitUnproven(s *scn, r *attackRun) {
	s.release(r)
	s.deliver(r)
	err := s.commit(r, nil, nil, false)
	s.refused("a commit without acknowledgement", err, "commit acknowledgement")
	err = s.commit(r, nil, nil, true)
	s.refused("a forced commit without acknowledgement", err, "commit acknowledgement")
	s.requireEpochKey(r.vm, 1)
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventDestroy, keybroker.DecisionDeny})
	s.abortRun(r)
	s.outcome = "refused: no commit without the destination's acknowledgement"
}

// commitWrongMAC: the broker makes up a commit acknowledgement (it cannot compute the MAC,
// which needs TK).
func commitWrongMAC(s *scn, r *attackRun) {
	s.release(r)
	s.deliver(r)
	transcript := make([]byte, 32)
	rand.Read(transcript)
	mac := make([]byte, 32)
	rand.Read(mac)
	ack, _ := json.Marshal(grant.CommitAck{MigrationID: r.id, Transcript: transcript, MAC: mac})
	err := s.commit(r, ack, nil, true)
	s.refused("a commit with a made-up acknowledgement", err, "MAC does not verify")
	s.requireEpochKey(r.vm, 1)
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventDestroy, keybroker.DecisionDeny})
	s.abortRun(r)
	s.outcome = "refused: the acknowledgement's MAC does not verify under TK"
}

// erasureOtherChip: the migration really commits, but the broker presents as the source's
// erasure evidence genuine evidence from another chip (one the broker controls, which never
// held the guest), to get an erased receipt for a source that kept everything.
func erasureOtherChip(s *scn, r *attackRun) {
	ctx := s.t.Context()
	s.release(r)
	s.deliver(r)
	ack := s.transferToCommit(r)

	nonce, err := s.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: r.id, Role: attest.RoleErased})
	if err != nil {
		s.t.Fatal(err)
	}
	stmt, err := attest.ErasureStatement{MigrationID: r.id, KeysZeroized: []string{attest.KeyTransfer, attest.KeyMemoryData, attest.KeyHPKE}, PagesScrubbed: 2048, PageBytesScrubbed: 8 << 20}.Encode()
	if err != nil {
		s.t.Fatal(err)
	}
	chip := sha512.Sum512([]byte("a chip the broker controls"))
	tcb, err := attest.ParseSNPTCB(snpBase)
	if err != nil {
		s.t.Fatal(err)
	}
	other, err := emulate.Open(s.emuDir, attest.PlatformEmulatedSEVSNP, emulate.Options{TCB: &tcb, ChipID: chip[:]})
	if err != nil {
		s.t.Fatal(err)
	}
	fake, err := attest.Produce(ctx, other, attest.Binding{MigrationID: r.id, Role: attest.RoleErased, Nonce: nonce.Nonce, Statement: stmt})
	if err != nil {
		s.t.Fatal(err)
	}
	err = s.commit(r, ack, &kbwire.Attestation{Nonce: nonce.Nonce, Evidence: fake}, false)
	s.refused("erasure evidence from another chip", err, "chip")
	s.requireEpochKey(r.vm, 1)
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventDestroy, keybroker.DecisionDeny})

	s.commitHonestly(r, ack)
	s.outcome = "refused: erasure evidence must come from the released source's chip"
}

// abortAfterCommit: the migration really commits (the destination resumed the guest, the
// source erased it), and the broker then asks the keybroker to abort: epoch e+1, the key the
// guest now runs under, would be destroyed, and a receipt would say the guest runs on at the
// source, where nothing of it is left.
func abortAfterCommit(s *scn, r *attackRun) {
	ctx := s.t.Context()
	s.release(r)
	s.deliver(r)
	ack := s.transferToCommit(r)
	_, err := s.kbc.Destroy(ctx, &kbwire.DestroyRequest{MigrationID: r.id, Tenant: demoTenant, VM: r.vm, Ending: kbwire.Abort})
	s.refused("an abort without the destination's evidence", err, "never resumed the guest")
	// The destination gives none: it resumed the guest, and says so with its acknowledgement.
	nonce, err := s.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: r.id, Role: attest.RoleErased})
	if err != nil {
		s.t.Fatal(err)
	}
	_, err = s.agents.Erase(ctx, r.dst.host, &agentapi.EraseRequest{MigrationID: r.id, Nonce: nonce.Nonce})
	s.refused("erasure evidence from a destination that resumed the guest", err, "neither a committed source nor an aborted destination")
	resp, err := s.agents.Abort(ctx, r.dst.host, &agentapi.AbortRequest{MigrationID: r.id, Reason: "broker says so"})
	if err != nil || !resp.Committed || len(resp.CommitAck) == 0 {
		s.t.Fatalf("the destination's answer to an abort after it resumed the guest: %+v, %v; want committed with its acknowledgement", resp, err)
	}
	s.requireEpochKey(r.vm, 2)
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventDestroy, keybroker.DecisionDeny})

	s.commitHonestly(r, ack)
	s.outcome = "refused: an abort needs the destination's evidence that it never resumed the guest"
}

// commitHonestly ends r as an honest broker does after a commit: the source's own erasure
// evidence and the acknowledgement to the keybroker, then the guest record moved.
func (s *scn) commitHonestly(r *attackRun, ack []byte) {
	s.t.Helper()
	ctx := s.t.Context()
	nonce, err := s.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: r.id, Role: attest.RoleErased})
	if err != nil {
		s.t.Fatal(err)
	}
	ev, err := s.agents.Erase(ctx, r.src.host, &agentapi.EraseRequest{MigrationID: r.id, Nonce: nonce.Nonce})
	if err != nil {
		s.t.Fatal(err)
	}
	if err := s.commit(r, ack, &kbwire.Attestation{Nonce: nonce.Nonce, Evidence: ev}, false); err != nil {
		s.t.Fatalf("committing with the source's own erasure evidence: %v", err)
	}
	s.moveGuestRecord(r)
	s.guests[r.vm].at = r.dst
}

// transferToCommit runs r's transfer to the granted endpoint and returns the source's commit
// acknowledgement.
func (s *scn) transferToCommit(r *attackRun) []byte {
	s.t.Helper()
	ctx := s.t.Context()
	if _, err := s.agents.Transfer(ctx, r.src.host, &agentapi.TransferRequest{MigrationID: r.id, Tenant: demoTenant, VM: r.vm}); err != nil {
		s.t.Fatalf("starting the transfer: %v", err)
	}
	var ack []byte
	poll(s.t, "the commit of "+r.id, func() (bool, string) {
		st, err := s.agents.Status(ctx, r.src.host, &agentapi.StatusRequest{MigrationID: r.id})
		if err != nil || st.Transfer == nil {
			return false, fmt.Sprint(st, err)
		}
		switch st.Transfer.Phase {
		case agentapi.TransferCommitted:
			ack = st.Transfer.CommitAck
			return true, ""
		case agentapi.TransferFailed:
			s.t.Fatalf("the transfer failed: %s", st.Transfer.Error)
		}
		return false, string(st.Transfer.Phase)
	})
	return ack
}

// moveGuestRecord moves the broker's record of r's guest to the destination, as the broker
// does after a commit.
func (s *scn) moveGuestRecord(r *attackRun) {
	s.t.Helper()
	ctx := s.t.Context()
	kv, err := s.js.KeyValue(ctx, broker.GuestsBucket)
	if err != nil {
		s.t.Fatal(err)
	}
	key := broker.GuestKey(demoTenant, r.vm)
	entry, err := kv.Get(ctx, key)
	if err != nil {
		s.t.Fatal(err)
	}
	var g broker.Guest
	if err := json.Unmarshal(entry.Value(), &g); err != nil {
		s.t.Fatal(err)
	}
	g.Host, g.Epoch, g.WrappedMDK = r.dst.host, r.rel.ToEpoch, r.rel.WrappedMDK
	b, _ := json.Marshal(g)
	if _, err := kv.Update(ctx, key, b, entry.Revision()); err != nil {
		s.t.Fatal(err)
	}
}

// commit asks the keybroker to commit r.
func (s *scn) commit(r *attackRun, ack []byte, erasure *kbwire.Attestation, unverified bool) error {
	_, err := s.kbc.Destroy(s.t.Context(), &kbwire.DestroyRequest{
		MigrationID: r.id, Tenant: demoTenant, VM: r.vm, Ending: kbwire.Commit,
		CommitAck: ack, Erasure: erasure, UnverifiedErasure: unverified,
	})
	return err
}

// requireEpochKey fails unless vm's epoch key of epoch e exists in Vault.
func (s *scn) requireEpochKey(vm string, e int) {
	s.t.Helper()
	keys, err := s.transitKeys(s.t.Context())
	if err != nil {
		s.t.Fatal(err)
	}
	if want := fmt.Sprintf("lethe-%s-%s-e%d", demoTenant, vm, e); !slices.Contains(keys, want) {
		s.t.Fatalf("the live epoch key %s is gone", want)
	}
}

// otherGuestsID: the broker names another guest's live migration in requests about its own
// guest: an abort of "its" migration would destroy the other guest's migration key, a release
// would tie the other guest's receipt to this one. vm2 migrates from b to c under id r.id; the
// broker then runs a genuine attestation round of vm1 (on a, to d) under the same id, with
// nonces the keybroker issued for r.id, so that only the id's owner can refuse the release.
func otherGuestsID(s *scn) {
	ctx := s.t.Context()
	vm1, vm2 := s.vm("g1"), s.vm("g2")
	a, b := s.agent(snp(snpBase, vm1)), s.agent(snp(snpBase, vm2))
	c, d := s.agent(snp(snpBase)), s.agent(snp(snpBase))
	s.adopt(vm1, a)
	s.adopt(vm2, b)
	r := s.attest(vm2, b, c)
	s.release(r)
	_, err := s.kbc.Destroy(ctx, &kbwire.DestroyRequest{MigrationID: r.id, Tenant: demoTenant, VM: vm1, Ending: kbwire.Abort})
	s.refused("an abort naming another guest's migration", err, "belongs to another guest")
	keys, err := s.transitKeys(ctx)
	if err != nil {
		s.t.Fatal(err)
	}
	if !slices.Contains(keys, "lethe-mig-"+r.id) {
		s.t.Fatalf("the migration key of %s's migration is gone", vm2)
	}
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventDestroy, keybroker.DecisionDeny})

	// Fresh nonces for r.id and evidence bound to them: everything a release checks before the
	// migration id is in order.
	req := s.releaseRequest(r.id, vm1, a, d)
	_, err = s.kbc.Release(ctx, req)
	s.refused(fmt.Sprintf("a release of %s under %s's migration id", vm1, vm2), err, "belongs to another guest")
	s.audits = append(s.audits, auditWant{r.id, keybroker.EventRelease, keybroker.DecisionDeny})
	s.abortAgents(r.id, a, d)
	s.requireEpochKey(vm1, 1)
	s.abortRun(r)
	s.outcome = "refused: a migration id belongs to one guest"
}

// replayGrant: the broker replays a genuine grant and its sealed keys from an earlier release
// of the same guest: to a new migration, and to the same migration after its agents attested
// again with new keys.
func replayGrant(s *scn, r *attackRun) {
	ctx := s.t.Context()
	s.release(r)
	old := *r.rel
	s.abortRun(r)

	// A new migration of the same guest between the same hosts.
	r2 := s.attest(r.vm, r.src, r.dst)
	err := s.agents.Keys(ctx, r.src.host, &agentapi.KeysRequest{MigrationID: r2.id, Role: attest.RoleSource, SealedKeys: old.SealedSource, Grant: old.Grant})
	s.refused("an old grant for a new migration", err, "grant names migration")
	s.abortAgents(r2.id, r.src, r.dst)

	// The same migration id, attested again (new HPKE keys and nonces). An agent keeps the
	// earlier attempt's key until keys open under one attempt, so that a broker retrying a
	// step does not break keys the keybroker already sealed: the first attempt's grant opens
	// them. Once keys opened, no other keys open in that migration, whatever grant comes with
	// them.
	r3 := s.attest(r.vm, r.src, r.dst)
	s.release(r3)
	s.releaseRequest(r3.id, r.vm, r.src, r.dst) // both agents attest again: new HPKE keys
	if err := s.agents.Keys(ctx, r.dst.host, &agentapi.KeysRequest{MigrationID: r3.id, Role: attest.RoleDestination, SealedKeys: r3.rel.SealedDestination, Grant: r3.rel.Grant}); err != nil {
		s.t.Fatalf("the keys of the first attempt, under its grant, after the agents attested again: %v", err)
	}
	err = s.agents.Keys(ctx, r.dst.host, &agentapi.KeysRequest{MigrationID: r3.id, Role: attest.RoleDestination, SealedKeys: old.SealedDestination, Grant: old.Grant})
	s.refused("other keys after keys opened", err, "opened other keys")
	s.abortRun(r3)
	s.outcome = "refused: a grant names one migration and one attestation of each end, and keys open once"
}
