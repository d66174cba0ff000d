package e2e

import (
	"encoding/hex"
	"fmt"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"slices"
	"strings"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// verifierScenarios attack what the keybroker trusts besides the evidence itself: the
// platform roots' revocations and the Vault keys it creates.
var verifierScenarios = []scenario{
	{"adversarial/revoked-vcek-at-destination", revokedDestination(attest.PlatformEmulatedSEVSNP)},
	{"adversarial/revoked-pck-at-destination", revokedDestination(attest.PlatformEmulatedTDX)},
	{"adversarial/vault-migration-key-prepared-exportable", preparedKey(func(id, vm string, epoch uint64) string { return "lethe-mig-" + id })},
	{"adversarial/vault-next-epoch-key-prepared-exportable", preparedKey(func(id, vm string, epoch uint64) string {
		return fmt.Sprintf("lethe-%s-%s-e%d", demoTenant, vm, epoch+1)
	})},
}

// revokedDestination starts a destination agent on a chip whose endorsement key (the SEV-SNP
// VCEK, the TDX PCK) the emulator revoked, as AMD or Intel revoke a compromised platform's,
// and migrates a guest to it: the keybroker, which checks revocation as in production, denies
// with reason revoked, and the guest stays at its source.
func revokedDestination(p attest.Platform) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		spec := snp(snpBase)
		if p == attest.PlatformEmulatedTDX {
			spec = tdx(tdxBase)
		}
		src := spec
		src.guests = []string{vm}
		a := s.agent(src)

		// The revoked chip: the emulator certifies one endorsement key certificate per chip
		// and TCB, so revoking it here revokes the agent that signs as that chip below.
		chip := randomHex(64)
		id, err := hex.DecodeString(chip)
		if err != nil {
			s.t.Fatal(err)
		}
		e, err := emulate.Open(s.emuDir, p, emulate.Options{ChipID: id})
		if err != nil {
			s.t.Fatal(err)
		}
		if err := e.Revoke(); err != nil {
			s.t.Fatal(err)
		}
		if err := e.Save(s.emuDir); err != nil {
			s.t.Fatal(err)
		}
		dst := spec
		dst.extra = append(dst.extra, "--emulated-chip-id", chip)
		b := s.agent(dst)

		s.adopt(vm, a)
		mid, err := s.tryMigrate(vm, b)
		if err != nil {
			s.t.Fatalf("the broker refused the migration: %v; the keybroker must be the one to refuse", err)
		}
		m := s.requireEnd(mid, vm, broker.OutcomeAborted, a, b)
		if !strings.Contains(m.AbortReason, "revoked") {
			s.t.Fatalf("abort reason %q; want the destination's evidence rejected as revoked", m.AbortReason)
		}
		if !revokedDenial(s.audit.of(mid)) {
			s.t.Errorf("no release/deny audit event with reason revoked for %s: %+v", mid, s.audit.of(mid))
		}
		s.outcome = "aborted: keybroker rejected the destination's evidence (revoked)"
	}
}

func revokedDenial(evs []keybroker.Event) bool {
	return slices.ContainsFunc(evs, func(ev keybroker.Event) bool {
		return ev.Kind == keybroker.EventRelease && ev.Decision == keybroker.DecisionDeny &&
			slices.ContainsFunc(ev.Reasons, func(r string) bool { return strings.Contains(r, "(revoked)") })
	})
}

// preparedKey creates, straight in Vault (as anyone with write access to the Transit mount
// could), an exportable key under the name the keybroker is about to create for a release,
// then asks the keybroker for the keys as a broker would: the release is refused and audited,
// nothing is sealed, the prepared key is destroyed with the release's other keys, and the
// guest keeps running at its source with its one live epoch key (the suite's invariants).
func preparedKey(name func(id, vm string, epoch uint64) string) func(*scn) {
	return func(s *scn) {
		vm := s.vm("g")
		a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
		s.adopt(vm, a)
		rec, ok, err := getKV[broker.Guest](s.t.Context(), s.js, broker.GuestsBucket, broker.GuestKey(demoTenant, vm))
		if err != nil || !ok {
			s.t.Fatalf("reading the guest record: %v", err)
		}
		var prepared string
		id, err := s.directRelease(vm, a, b, func(req *kbwire.ReleaseRequest) {
			prepared = name(req.MigrationID, vm, rec.Epoch)
			if _, err := s.vault.Client.Logical().WriteWithContext(s.t.Context(), vaulttest.TransitMount+"/keys/"+prepared,
				map[string]any{"type": "aes256-gcm96", "exportable": true}); err != nil {
				s.t.Fatalf("preparing %s: %v", prepared, err)
			}
		})
		if err == nil {
			s.t.Fatalf("the keybroker released keys with %s prepared", prepared)
		}
		s.audits = append(s.audits, auditWant{id, keybroker.EventRelease, keybroker.DecisionDeny})
		if !slices.ContainsFunc(s.audit.of(id), func(ev keybroker.Event) bool {
			return ev.Decision == keybroker.DecisionDeny && slices.ContainsFunc(ev.Reasons, func(r string) bool { return strings.Contains(r, "exportable") })
		}) {
			s.t.Errorf("no denial naming the exportable key among the audit events of %s: %+v", id, s.audit.of(id))
		}
		poll(s.t, "the prepared key's destruction", func() (bool, string) {
			keys, err := s.transitKeys(s.t.Context())
			if err != nil {
				return false, err.Error()
			}
			if slices.Contains(keys, prepared) || slices.Contains(keys, "lethe-mig-"+id) {
				return false, fmt.Sprintf("transit keys %v", keys)
			}
			return true, ""
		})
		s.outcome = "refused (" + prepared + " existed, exportable), audited; prepared key destroyed, guest intact"
	}
}
