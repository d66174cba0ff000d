package e2e

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// scenario is one end-to-end scenario: run drives the system and leaves in s what it expects;
// the invariants are checked after it.
type scenario struct {
	name string
	run  func(s *scn)
}

var scenarios = []scenario{
	// Happy paths.
	{"happy/snp-to-snp", happy(snp(snpBase), snp(snpHigher), nil)},
	{"happy/tdx-to-tdx", happy(tdx(tdxBase), tdx(tdxBase), nil)},
	{"happy/snp-to-tdx (policy: destinationTcbAtLeastSource false)", happy(snp(snpBase), tdx(tdxBase), crossArch)},

	// Denials.
	{"deny/destination-tcb-below-source", denied(snp(snpBase), snp(snpWeak), nil, "microcode")},
	{"deny/debug-guest-at-destination", denied(snp(snpBase), debugGuest(snp(snpBase)), nil, "debug")},
	{"deny/unlisted-measurement", denied(snp(snpBase), snp(snpBase), withMeasurement, "measurement")},
	{"deny/emulated-platform-not-allowed", denied(snp(snpBase), snp(snpBase), realOnly, "platform")},
	{"deny/host-label-mismatch", denied(snp(snpBase), snp(snpBase), secureZone, "zone")},
	{"deny/tdx-to-snp-cross-architecture", denied(tdx(tdxBase), snp(snpBase), nil, "platform")},

	// Policy attacks.
	{"adversarial/policy-lower-svn", policyAttack(func(s *scn) []byte {
		return s.sign(withSVN(s.basePolicy, basePolicySVN-1), s.demoKey)
	}, "rollback")},
	{"adversarial/policy-re-signed-by-another-key", policyAttack(func(s *scn) []byte {
		return s.sign(s.basePolicy, s.otherKey)
	}, "signature")},
	{"adversarial/policy-unsigned", policyAttack(func(s *scn) []byte {
		return []byte(fmt.Sprintf(`{"payloadType":"application/vnd.lethe.policy+yaml","payload":%q,"signatures":[]}`, s.basePolicy))
	}, "signature")},

	// Evidence attacks: a broker that lies to the keybroker with real agents' evidence.
	{"adversarial/evidence-bound-to-another-hpke-key", evidenceAttack("hpke")},
	{"adversarial/evidence-replayed", evidenceAttack("replay")},
	{"adversarial/evidence-from-another-migration", evidenceAttack("other-migration")},

	// Data-plane attacks.
	{"adversarial/relay-mitm (key confirmation)", dataPlaneAttack(relayMITM)},
	{"adversarial/frame-tampered", dataPlaneAttack(relayTamper)},
	{"adversarial/frame-reordered", dataPlaneAttack(relayReorder)},
	{"adversarial/frame-replayed", dataPlaneAttack(relayReplay)},
	{"adversarial/frame-truncated", dataPlaneAttack(relayTruncate)},

	// Identity attacks.
	{"adversarial/tenant-acts-on-another-tenants-guest", crossTenant},
	{"adversarial/agent-speaks-for-another-host", impersonateHost},
	{"adversarial/agent-advertises-a-tcb-it-lacks", advertisedTCB},

	// Faults.
	{"fault/destination-killed@attesting", fault(atAttesting, killDestination)},
	{"fault/destination-killed@transferring", fault(atTransferring, killDestination)},
	{"fault/source-killed@attesting", fault(atAttesting, killSource)},
	{"fault/source-killed@transferring", fault(atTransferring, killSource)},
	{"fault/broker-killed@attesting", fault(atAttesting, killBroker)},
	{"fault/broker-killed@transferring", fault(atTransferring, killBroker)},
	{"fault/nats-restarted@attesting", fault(atAttesting, restartNATS)},
	{"fault/nats-restarted@transferring", fault(atTransferring, restartNATS)},
	{"fault/vault-cut@transferring (commit waits for Vault)", fault(atTransferring, cutVault)},
	{"fault/vault-cut@attesting", fault(atAttesting, cutVault)},
	{"fault/network-cut@transferring", fault(atTransferring, cutNetwork)},
	{"fault/not-converging (the guest is never paused)", notConverging},

	// Load.
	{"load/two-requests-for-one-guest", sameGuestTwice},
	{"load/50-concurrent-migrations", concurrent50},
}

func TestE2E(t *testing.T) {
	runScenarios(t, slices.Concat(scenarios, maliciousScenarios, deputyScenarios, tenantScenarios, verifierScenarios))
}

func runScenarios(t *testing.T, scenarios []scenario) {
	e := newEnv(t)
	start := time.Now()
	for i, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			s := &scn{
				env: e, t: t, index: i + 1, start: e.capture.mark(),
				guests: map[string]*guestWant{}, vmPolicies: map[string]bool{}, noProbe: map[string]string{},
			}
			ran := false
			var bad []string
			defer func() {
				inv := "yes"
				switch {
				case !ran:
					inv = "not checked"
				case len(bad) > 0:
					inv = "no"
				}
				out := s.outcome
				if t.Failed() && !ran {
					out = "FAILED: " + out
				}
				addRow(row{scenario: sc.name, outcome: out, invariants: inv})
			}()
			sc.run(s)
			bad = s.check()
			bad = append(bad, s.probe()...)
			bad = append(bad, s.checkWire()...)
			ran = true
			for _, b := range bad {
				t.Error(b)
			}
		})
	}
	t.Run("residency-log-audit", func(t *testing.T) { auditResidencyLog(t, e) })
	t.Run("tenant-fetches-keybroker-key", func(t *testing.T) { tenantFetchesKey(t, e) })
	t.Logf("suite ran in %v", time.Since(start).Round(time.Second))
}

// auditResidencyLog is the monitor's check of the whole residency log after every scenario (lethectl
// log audit): every leaf fetched as an operator (here, the broker's connection), hashing to
// the keybroker's signed checkpoint, and every guest's history in it complete, whatever the
// scenarios did to the guests, the broker, NATS or Vault.
func auditResidencyLog(t *testing.T, e *env) {
	ctx := t.Context()
	c := kbclient.New(e.conn, 30*time.Second)
	signed, err := c.LogCheckpoint(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	v, err := tlog.LogVerifier(e.kb.LogOrigin(), e.kbPub)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := tlog.Open(signed, v, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	leaves, err := c.LogEntries(ctx, 0, cp.Size)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := tlog.Audit(cp, leaves)
	if err != nil {
		t.Fatalf("the residency log of %d entries does not audit: %v", cp.Size, err)
	}
	t.Logf("residency log: %d entries of %d guests, every history complete", cp.Size, len(rep.Guests))
}

// tenantFetchesKey: a tenant, with its own NATS permissions, gets the key it verifies receipts
// and the log with (lethectl keybroker pubkey).
func tenantFetchesKey(t *testing.T, e *env) {
	k, err := kbclient.New(e.demoNC, 30*time.Second).PublicKey(t.Context())
	if err != nil {
		t.Fatalf("the tenant fetching the keybroker's key: %v", err)
	}
	if pub, err := receipt.ParsePublicKeyPEM([]byte(k.PEM)); err != nil || !pub.Equal(e.kbPub) || k.LogOrigin != e.kb.LogOrigin() {
		t.Errorf("the tenant fetched key %x (log %q), %v; want the keybroker's %x (log %q)", pub, k.LogOrigin, err, e.kbPub, e.kb.LogOrigin())
	}
}

// Policy variants.

// crossArch allows a migration between architectures: the TCB comparison is off (it compares
// components of one architecture only, so the default policy denies SNP → TDX).
func crossArch(y []byte) []byte {
	return replaceLine(y, "  destinationTcbAtLeastSource:", "  destinationTcbAtLeastSource: false")
}

// debugGuest makes an agent whose platform reports a debug guest.
func debugGuest(a agentSpec) agentSpec {
	a.extra = append(a.extra, "--emulated-debug")
	return a
}

// withMeasurement accepts only a launch measurement the emulated guests do not have.
func withMeasurement(y []byte) []byte {
	return insertAfter(y, "  destination:", "      allowDebug: false", `      measurements: ["`+strings.Repeat("11", 48)+`"]`)
}

// realOnly accepts only real hardware at the destination.
func realOnly(y []byte) []byte {
	return replaceFirstAfter(y, "  destination:", "    platforms: [emulated-sev-snp, emulated-tdx]", "    platforms: [sev-snp, tdx]")
}

// secureZone requires a destination host label the agents do not have.
func secureZone(y []byte) []byte {
	return insertAfter(y, "  destination:", "    platforms: [emulated-sev-snp, emulated-tdx]", "    hostLabels:\n      zone: secure")
}

func replaceFirstAfter(y []byte, section, old, repl string) []byte {
	lines := strings.Split(string(y), "\n")
	in := false
	for i, l := range lines {
		if l == section {
			in = true
		}
		if in && l == old {
			lines[i] = repl
			break
		}
	}
	return []byte(strings.Join(lines, "\n"))
}

// happy migrates a guest from a src to a dst agent, with the tenant's policy changed by
// variant if set, and requires a commit.
func happy(src, dst agentSpec, variant func([]byte) []byte) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		src.guests = []string{vm}
		a, b := s.agent(src), s.agent(dst)
		if variant != nil {
			if err := s.policy(vm, variant(s.basePolicy)); err != nil {
				s.t.Fatalf("applying the policy variant: %v", err)
			}
		}
		s.adopt(vm, a)
		id := s.migrate(vm, b)
		m := s.requireEnd(id, vm, broker.OutcomeErased, a, b)
		s.outcome = fmt.Sprintf("committed, erased (%d rounds)", m.Progress.Round)
	}
}

// denied requires the migration to be refused: by the broker's pre-filter (then the keybroker
// is asked directly, as by a broker that skips it, and must deny too) or by the keybroker.
func denied(src, dst agentSpec, variant func([]byte) []byte, names string) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		src.guests = []string{vm}
		a, b := s.agent(src), s.agent(dst)
		s.adopt(vm, a)
		if variant != nil {
			if err := s.policy(vm, variant(s.basePolicy)); err != nil {
				s.t.Fatalf("applying the policy variant: %v", err)
			}
		}
		id, err := s.tryMigrate(vm, b)
		if err != nil {
			if !strings.Contains(err.Error(), names) {
				s.t.Fatalf("the broker refused the migration with %v; want a reason naming %q", err, names)
			}
			// A broker that skips its pre-filter: the keybroker must deny on its own.
			rid, kerr := s.directRelease(vm, a, b, nil)
			if !errors.Is(kerr, broker.ErrDenied) || !strings.Contains(kerr.Error(), names) {
				s.t.Fatalf("the keybroker, asked directly, answered %v; want a denial naming %q", kerr, names)
			}
			s.audits = append(s.audits, auditWant{rid, keybroker.EventRelease, keybroker.DecisionDeny})
			s.outcome = "refused by the broker's pre-filter; keybroker asked directly: denied (" + names + ")"
			return
		}
		m := s.requireEnd(id, vm, broker.OutcomeAborted, a, b)
		if !strings.Contains(m.AbortReason, "denied") || !strings.Contains(m.AbortReason, names) {
			s.t.Fatalf("abort reason %q; want a denial naming %q", m.AbortReason, names)
		}
		s.outcome = "aborted: keybroker denied (" + names + ")"
	}
}

// policyAttack applies a bad policy envelope for the guest and requires that it is refused
// when applied or that the release is denied.
func policyAttack(envelope func(*scn) []byte, names string) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
		s.adopt(vm, a)
		s.vmPolicies[vm] = true
		if _, err := s.demo.ApplyPolicy(s.t.Context(), &broker.ApplyPolicyRequest{VM: vm, Envelope: envelope(s)}); err != nil {
			s.outcome = "refused when applied: " + err.Error()
			return
		}
		id := s.migrate(vm, b)
		m := s.requireEnd(id, vm, broker.OutcomeAborted, a, b)
		if !strings.Contains(m.AbortReason, "policy") || !strings.Contains(m.AbortReason, names) {
			s.t.Fatalf("abort reason %q; want the policy rejected for %q", m.AbortReason, names)
		}
		if !hasEvent(s.audit.of(id), keybroker.EventRelease, keybroker.DecisionDeny) {
			s.t.Errorf("no release/deny audit event")
		}
		s.outcome = "aborted: keybroker rejected the policy (" + names + ")"
	}
}

// directRelease acts as a broker toward the keybroker: it gets nonces for a new migration id,
// real evidence from the source and destination agents, and asks for the keys, after mutate
// changed the request. The agents' state of the migration is aborted afterwards. It returns
// the migration id and the keybroker's answer; keys released are destroyed again.
func (s *scn) directRelease(vm string, src, dst *agent, mutate func(*kbwire.ReleaseRequest)) (string, error) {
	s.t.Helper()
	ctx := s.t.Context()
	id := "adv-" + randomHex(8)
	req := s.releaseRequest(id, vm, src, dst)
	if mutate != nil {
		mutate(req)
	}
	_, err := s.kbc.Release(ctx, req)
	if err == nil {
		s.t.Errorf("the keybroker released keys for %s", id)
		if _, derr := s.kbc.Destroy(ctx, &kbwire.DestroyRequest{MigrationID: id, Tenant: demoTenant, VM: vm, Ending: kbwire.Abort, UnverifiedErasure: true}); derr != nil {
			s.t.Errorf("destroying the keys of %s: %v", id, derr)
		}
	}
	s.abortAgents(id, src, dst)
	return id, err
}

// releaseRequest builds a genuine release request for migration id of vm from src to dst.
func (s *scn) releaseRequest(id, vm string, src, dst *agent) *kbwire.ReleaseRequest {
	s.t.Helper()
	ctx := s.t.Context()
	ns, err := s.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: id, Role: attest.RoleSource})
	if err != nil {
		s.t.Fatalf("getting a source nonce: %v", err)
	}
	nd, err := s.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: id, Role: attest.RoleDestination})
	if err != nil {
		s.t.Fatalf("getting a destination nonce: %v", err)
	}
	evS, err := s.agents.Attest(ctx, src.host, &agentapi.AttestRequest{MigrationID: id, Role: attest.RoleSource, Nonce: ns.Nonce, Tenant: demoTenant, VM: vm})
	if err != nil {
		s.t.Fatalf("attesting the source: %v", err)
	}
	prep, err := s.agents.Prepare(ctx, dst.host, &agentapi.PrepareRequest{MigrationID: id, Nonce: nd.Nonce, Tenant: demoTenant, VM: vm, MemoryBytes: 8 << 20})
	if err != nil {
		s.t.Fatalf("preparing the destination: %v", err)
	}
	pol, ok, err := getKV[broker.PolicyRecord](ctx, s.js, broker.PoliciesBucket, broker.GuestKey(demoTenant, vm))
	if err != nil || !ok {
		pol, _, err = getKV[broker.PolicyRecord](ctx, s.js, broker.PoliciesBucket, demoTenant)
	}
	if err != nil || pol == nil {
		s.t.Fatalf("reading the policy: %v", err)
	}
	rec, _, err := getKV[agentapi.HostRecord](ctx, s.js, broker.HostsBucket, dst.host)
	if err != nil || rec == nil {
		s.t.Fatalf("reading the destination's host record: %v", err)
	}
	return &kbwire.ReleaseRequest{
		MigrationID: id, Tenant: demoTenant, VM: vm, Policy: pol.Envelope,
		Source:          kbwire.Attestation{Nonce: ns.Nonce, Evidence: evS},
		Destination:     kbwire.Attestation{Nonce: nd.Nonce, Evidence: prep.Evidence},
		DestinationHost: kbwire.Host{Name: dst.host, Labels: rec.Labels, Region: rec.Region},
		SourceHost:      src.host,
	}
}

func (s *scn) abortAgents(id string, agents ...*agent) {
	for _, a := range agents {
		if _, err := s.agents.Abort(s.t.Context(), a.host, &agentapi.AbortRequest{MigrationID: id, Reason: "test"}); err != nil && !errors.Is(err, agentapi.ErrNotFound) {
			s.t.Errorf("aborting %s on %s: %v", id, a.host, err)
		}
	}
}

// evidenceAttack asks the keybroker for keys with evidence that is genuine but not for this
// request: bound to another HPKE key, replayed after its nonce was used, or made for another
// migration.
func evidenceAttack(kind string) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
		s.adopt(vm, a)
		ctx := s.t.Context()
		var id string
		var err error
		switch kind {
		case "hpke":
			// The broker swaps the destination's HPKE key for its own: the keys would be
			// sealed to it.
			id, err = s.directRelease(vm, a, b, func(r *kbwire.ReleaseRequest) {
				k, kerr := seal.GenerateKey()
				if kerr != nil {
					s.t.Fatal(kerr)
				}
				ev := *r.Destination.Evidence
				ev.HPKEPublicKey = k.PublicKey()
				r.Destination.Evidence = &ev
			})
		case "replay":
			// A first request is denied (it carries a policy that does not accept this
			// destination) and uses up the nonces; the same evidence sent again with the
			// tenant's real policy must not count.
			first := s.releaseRequest("adv-"+randomHex(8), vm, a, b)
			good := first.Policy
			first.Policy = s.sign(secureZone(s.basePolicy), s.demoKey)
			if _, ferr := s.kbc.Release(ctx, first); !errors.Is(ferr, broker.ErrDenied) {
				s.t.Fatalf("first request: %v, want denied", ferr)
			}
			s.audits = append(s.audits, auditWant{first.MigrationID, keybroker.EventRelease, keybroker.DecisionDeny})
			first.Policy = good
			id = first.MigrationID
			_, err = s.kbc.Release(ctx, first)
			s.abortAgents(id, a, b)
		case "other-migration":
			// Evidence made for migration X, sent with fresh nonces for migration Y.
			x := s.releaseRequest("adv-"+randomHex(8), vm, a, b)
			s.abortAgents(x.MigrationID, a, b)
			id, err = s.directRelease(vm, a, b, func(r *kbwire.ReleaseRequest) {
				r.Source.Evidence, r.Destination.Evidence = x.Source.Evidence, x.Destination.Evidence
			})
		}
		if err == nil {
			s.t.Fatalf("the keybroker accepted %s evidence", kind)
		}
		if got := s.audit.of(id); len(got) == 0 || got[len(got)-1].Decision == keybroker.DecisionAllow {
			s.t.Errorf("audit of %s: %+v, want a refusal", id, got)
		}
		s.audits = append(s.audits, auditWant{id, keybroker.EventRelease, keybroker.DecisionDeny})
		s.outcome = "refused: " + shorten(err.Error())
	}
}

func shorten(s string) string {
	if i := strings.Index(s, ": "); i > 0 && len(s) > 80 {
		s = s[i+2:]
	}
	return s
}

// dataPlaneAttack puts a relay that mode describes between the agents: the transfer must
// fail and the migration abort.
func dataPlaneAttack(mode relayMode) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		dspec := snp(snpBase)
		dspec.relay = true
		a, b := s.agent(snp(snpBase, vm)), s.agent(dspec)
		s.adopt(vm, a)
		b.relay.setMode(mode)
		id := s.migrate(vm, b)
		m := s.requireEnd(id, vm, broker.OutcomeAborted, a, b)
		if !b.relay.Mutated() {
			s.t.Fatalf("the relay never acted (%s); the migration ended %s: %s", mode, m.Outcome, m.AbortReason)
		}
		s.outcome = "aborted: " + shorten(m.AbortReason)
	}
}

// crossTenant: tenant "other" tries to see, move and abort tenant demo's guest.
func crossTenant(s *scn) {
	vm := s.vm("g")
	a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
	s.adopt(vm, a)
	ctx := s.t.Context()
	if _, err := s.other.CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: b.host}); err == nil {
		s.t.Fatal("tenant other migrated demo's guest")
	}
	if _, err := s.other.CreateMigration(ctx, &broker.CreateMigrationRequest{Tenant: demoTenant, VM: vm, Destination: b.host}); err == nil {
		s.t.Fatal("tenant other migrated demo's guest naming tenant demo")
	}
	if _, err := s.other.AdoptGuest(ctx, &broker.AdoptGuestRequest{Tenant: demoTenant, VM: vm, Host: a.host}); err == nil {
		s.t.Fatal("tenant other adopted demo's guest")
	}
	guests, err := s.other.ListGuests(ctx, &broker.ListGuestsRequest{})
	if err != nil {
		s.t.Fatal(err)
	}
	for _, g := range guests.Guests {
		if g.Tenant == demoTenant {
			s.t.Fatalf("tenant other sees demo's guest %+v", g)
		}
	}
	// A migration of demo's, which other must neither see nor abort nor get the receipt of.
	id := s.migrate(vm, b)
	if _, err := s.other.AbortMigration(ctx, &broker.AbortMigrationRequest{ID: id}); err == nil {
		s.t.Fatal("tenant other aborted demo's migration")
	}
	if _, err := s.other.GetMigration(ctx, id); err == nil {
		s.t.Fatal("tenant other read demo's migration")
	}
	s.requireEnd(id, vm, broker.OutcomeErased, a, b)
	if _, err := s.other.GetReceipt(ctx, id); err == nil {
		s.t.Fatal("tenant other got demo's receipt")
	}
	// On the wire: other's connection may not publish on demo's subjects.
	nc := s.connect("tenant-"+otherTenant, natsauth.InboxPrefix(natsauth.RoleTenant, otherTenant))
	if _, err := nc.Request(broker.TenantSubject(demoTenant, broker.OpGuestsList), []byte(`{}`), 2*time.Second); err == nil {
		s.t.Fatal("tenant other's connection called the API as demo")
	}
	s.outcome = "refused (create, adopt, abort, get, receipt, list, raw publish); demo's migration committed"
}

// impersonateHost: an agent's NATS user tries to write another host's record and to serve
// another host's agent API.
func impersonateHost(s *scn) {
	vm := s.vm("g")
	a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
	s.adopt(vm, a)
	ctx := s.t.Context()
	nc, perm := s.connectAsAgent(s.t, b)
	js, err := jetstream.New(nc)
	if err != nil {
		s.t.Fatal(err)
	}
	// Claim host a's guest in a forged record of host a.
	kv, err := js.KeyValue(ctx, broker.HostsBucket)
	if err == nil {
		forged := fmt.Sprintf(`{"host":%q,"platform":"emulated-sev-snp","region":"forged","heartbeat":%q}`, a.host, time.Now().UTC().Format(time.RFC3339Nano))
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, err = kv.Put(pctx, a.host, []byte(forged))
		cancel()
	}
	if err == nil {
		s.t.Fatal("host b wrote host a's record")
	}
	// Serve host a's agent API.
	sub, err := nc.SubscribeSync(agentapi.Subject(a.host, "status"))
	if err == nil {
		_ = nc.Flush()
		select {
		case perr := <-perm:
			if !strings.Contains(strings.ToLower(perr.Error()), "permission") {
				s.t.Fatalf("subscribing as host a: %v", perr)
			}
		case <-time.After(5 * time.Second):
			s.t.Fatal("host b subscribed to host a's agent API without a permission error")
		}
		_ = sub.Unsubscribe()
	}
	rec, _, err := getKV[agentapi.HostRecord](ctx, s.js, broker.HostsBucket, a.host)
	if err != nil || rec == nil || rec.Region == "forged" || rec.Guest(demoTenant, vm) == nil {
		s.t.Fatalf("host a's record after the attempt: %+v, %v", rec, err)
	}
	id := s.migrate(vm, b)
	s.requireEnd(id, vm, broker.OutcomeErased, a, b)
	s.outcome = "refused (record write, API subscription); a real migration still committed"
}

// Fault phases and faults.

type faultPhase int

const (
	atAttesting faultPhase = iota
	atTransferring
)

// faultCtx is a migration held at a phase, and the fault to inject there.
type faultCtx struct {
	s      *scn
	vm, id string
	src    *agent
	dst    *agent
	phase  faultPhase
	// wantOutcome is how the migration must end after the fault.
	wantOutcome string
	// ifReleased, if set, is how it must end instead if the keybroker released its keys after
	// all: a release the broker had asked for just before the fault, waiting for Vault,
	// completes once Vault is back.
	ifReleased string
}

// fault runs a migration, holds it at phase (Vault cut for Attesting: the release cannot
// complete; a relay holding the source's bytes for Transferring), injects f and lets it go.
func fault(phase faultPhase, f func(*faultCtx) func()) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		dspec := snp(snpHigher)
		dspec.relay = true
		a, b := s.agent(snp(snpBase, vm)), s.agent(dspec)
		s.adopt(vm, a)
		fc := &faultCtx{s: s, vm: vm, src: a, dst: b, phase: phase}
		s.t.Cleanup(s.vproxy.Restore)
		var resume func()
		switch phase {
		case atAttesting:
			s.vproxy.Cut()
			fc.id = s.migrate(vm, b)
			poll(s.t, "a release refused for want of Vault", func() (bool, string) {
				return hasEvent(s.audit.of(fc.id), keybroker.EventRelease, keybroker.DecisionError), "no release/error audit event"
			})
			resume = s.vproxy.Restore
		case atTransferring:
			b.relay.hold(2 << 20)
			fc.id = s.migrate(vm, b)
			select {
			case <-b.relay.Reached():
			case <-time.After(waitLimit):
				s.t.Fatal("the transfer did not start")
			}
			if m := s.phase(fc.id, broker.PhaseTransferring); m.Phase != broker.PhaseTransferring {
				s.t.Fatalf("phase %s, want Transferring", m.Phase)
			}
			resume = b.relay.Release
		}
		after := f(fc)
		resume()
		if after != nil {
			after()
		}
		if fc.ifReleased != "" {
			s.end(fc.id)
			if hasEvent(s.audit.of(fc.id), keybroker.EventRelease, keybroker.DecisionAllow) {
				fc.wantOutcome = fc.ifReleased
			}
		}
		m := s.requireEnd(fc.id, vm, fc.wantOutcome, fc.src, fc.dst)
		s.outcome = m.Outcome
		if m.AbortReason != "" {
			s.outcome += ": " + shorten(m.AbortReason)
		}
		if len(m.Notes) > 0 {
			s.outcome += " (" + shorten(strings.Join(m.Notes, "; ")) + ")"
		}
	}
}

// killDestination kills the destination agent. Once keys were released to it, it cannot
// attest that it erased and never resumed the guest: the receipt says so.
func killDestination(fc *faultCtx) func() {
	fc.dst.proc.kill()
	fc.wantOutcome = broker.OutcomeAborted
	if fc.phase == atTransferring {
		fc.wantOutcome = broker.OutcomeAbortedUnverifiedErasure
	} else {
		// The broker may have had the destination's evidence, and a release waiting for
		// Vault, before the kill.
		fc.ifReleased = broker.OutcomeAbortedUnverifiedErasure
	}
	return nil
}

// killSource kills the source agent; the guest dies with its host. The host comes back after
// the abort with the guest restarted (it runs, but holds no memory key: nothing in Lethe
// reissues it, so it cannot be probed with a migration).
func killSource(fc *faultCtx) func() {
	fc.src.proc.kill()
	fc.wantOutcome = broker.OutcomeAborted
	fc.s.noProbe[fc.vm] = "the source host restarted: its restarted guest holds no memory key"
	return func() {
		fc.s.end(fc.id)
		fc.s.restart(fc.src.proc)
		fc.s.waitAgent(fc.s.t, fc.src)
	}
}

// killBroker kills the broker process that drives the migration; the other one takes over
// once the lease expires, and the migration commits. The killed broker is started again
// afterwards.
func killBroker(fc *faultCtx) func() {
	s := fc.s
	m, err := s.migration(s.t.Context(), fc.id)
	if err != nil {
		s.t.Fatal(err)
	}
	s.mu.Lock()
	p := s.brokers[m.Owner]
	s.mu.Unlock()
	if p == nil {
		s.t.Fatalf("migration owned by %q, not a broker of the suite", m.Owner)
	}
	p.kill()
	fc.wantOutcome = broker.OutcomeErased
	return func() {
		end := s.end(fc.id)
		if end.Owner == m.Owner {
			s.t.Errorf("the killed broker %s still owns the migration", m.Owner)
		}
		s.restart(p)
	}
}

func restartNATS(fc *faultCtx) func() {
	fc.s.nats.Restart()
	fc.wantOutcome = broker.OutcomeErased
	return nil
}

// cutVault cuts the keybroker from Vault. At Attesting, nothing is released while it lasts;
// at Transferring, the agents commit and the destruction waits for Vault.
func cutVault(fc *faultCtx) func() {
	s := fc.s
	fc.wantOutcome = broker.OutcomeErased
	if fc.phase == atAttesting {
		return nil // Vault is cut already; it is restored when the migration is let go
	}
	s.vproxy.Cut()
	return func() {
		m := s.phase(fc.id, broker.PhaseCommitted)
		if m.Phase != broker.PhaseCommitted {
			s.t.Fatalf("phase %s, want Committed while Vault is cut", m.Phase)
		}
		// The destruction waits for Vault: the migration key is still there.
		keys, err := s.transitKeys(s.t.Context())
		if err != nil {
			s.t.Fatal(err)
		}
		if !slices.Contains(keys, "lethe-mig-"+fc.id) {
			s.t.Fatalf("the migration key is gone while Vault was cut: %v", keys)
		}
		if m, err := s.migration(s.t.Context(), fc.id); err != nil || m.Phase != broker.PhaseCommitted {
			s.t.Fatalf("migration %+v, %v; want it Committed until Vault is back", m, err)
		}
		s.vproxy.Restore()
	}
}

func cutNetwork(fc *faultCtx) func() {
	fc.dst.relay.Cut()
	fc.wantOutcome = broker.OutcomeAborted
	return nil
}

// notConverging migrates a guest that rewrites its hot tenth (6.4 MiB) faster than any final
// round could send it within the tenant's downtime limit of 1 ms, with auto-converge off: the
// source must end pre-copy without pausing it, the migration must abort naming why, and the
// guest must run on at the source, the released keys destroyed (the invariants).
func notConverging(s *scn) {
	vm := s.vm("g")
	src := snp(snpBase)
	src.guests, src.size = []string{vm}, "64MiB"
	src.extra = append(src.extra, "--workload-rate", "1000000", "--workload-auto-converge=false")
	a, b := s.agent(src), s.agent(snp(snpBase))
	limited := strings.Replace(string(s.basePolicy), "  erasure:\n", "  transport:\n    maxDowntime: 1ms\n  erasure:\n", 1)
	if err := s.policy(vm, []byte(limited)); err != nil {
		s.t.Fatalf("applying the policy with a 1 ms downtime limit: %v", err)
	}
	s.adopt(vm, a)
	id := s.migrate(vm, b)
	m := s.requireEnd(id, vm, broker.OutcomeAborted, a, b)
	if !strings.Contains(m.AbortReason, "did not converge") {
		s.t.Fatalf("abort reason %q; want one saying pre-copy did not converge", m.AbortReason)
	}
	if m.Progress == nil || m.Progress.Downtime != 0 {
		s.t.Fatalf("the source reported %+v; want a report without a pause", m.Progress)
	}
	s.outcome = fmt.Sprintf("aborted before any pause: %s", m.AbortReason)
}

// sameGuestTwice asks for two migrations of one guest at once: exactly one may proceed.
func sameGuestTwice(s *scn) {
	vm := s.vm("g")
	a, b, c := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase)), s.agent(snp(snpBase))
	s.adopt(vm, a)
	type res struct {
		id  string
		err error
		dst *agent
	}
	out := make([]res, 2)
	var wg sync.WaitGroup
	for i, d := range []*agent{b, c} {
		wg.Go(func() {
			id, err := s.tryMigrate(vm, d)
			out[i] = res{id, err, d}
		})
	}
	wg.Wait()
	var ids []res
	for _, r := range out {
		if r.err == nil {
			ids = append(ids, r)
		}
	}
	committed := 0
	for _, r := range ids {
		m := s.end(r.id)
		s.expect(r.id, vm, m.Outcome, a, r.dst)
		if m.Outcome == broker.OutcomeErased {
			committed++
		}
	}
	if committed != 1 {
		s.t.Fatalf("%d of the two migrations committed (accepted %d), want exactly 1", committed, len(ids))
	}
	s.outcome = fmt.Sprintf("%d accepted, 1 committed", len(ids))
}

// concurrent50 runs 50 migrations of different 4 MiB guests at once: five sources with ten
// guests each, to five destinations.
func concurrent50(s *scn) {
	const perHost, hosts = 10, 5
	var srcs, dsts []*agent
	var vms [][]string
	for h := range hosts {
		var names []string
		for g := range perHost {
			names = append(names, s.vm(fmt.Sprintf("h%d-%d", h, g)))
		}
		spec := snp(snpBase, names...)
		spec.size = "4MiB"
		spec.extra = []string{"--workload-rate", "200"}
		srcs = append(srcs, s.agent(spec))
		dsts = append(dsts, s.agent(snp(snpBase)))
		vms = append(vms, names)
	}
	for h := range hosts {
		for _, vm := range vms[h] {
			s.adopt(vm, srcs[h])
		}
	}
	type mig struct {
		id, vm   string
		src, dst *agent
	}
	var migs []mig
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for h := range hosts {
		for i, vm := range vms[h] {
			dst := dsts[(h+1+i)%hosts]
			wg.Go(func() {
				id := s.migrate(vm, dst)
				mu.Lock()
				migs = append(migs, mig{id, vm, srcs[h], dst})
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	for _, m := range migs {
		s.requireEnd(m.id, m.vm, broker.OutcomeErased, m.src, m.dst)
	}
	elapsed := time.Since(start)
	// Probe a few guests only: fifty probes would double the scenario.
	for i, m := range migs {
		if i >= 3 {
			s.noProbe[m.vm] = "load: three guests are probed"
		}
	}
	s.outcome = fmt.Sprintf("50 of 50 committed in %v", elapsed.Round(100*time.Millisecond))
}
