package keybroker

import (
	"encoding/json"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"testing"

	"github.com/lethe-cc/lethe/keybroker/seal"
)

// FuzzReleaseRequest decodes release requests as an edge would and runs the checks that come
// before any Vault call.
func FuzzReleaseRequest(f *testing.F) {
	f.Add([]byte(`{"migrationId":"m1","tenant":"demo","vm":"vm1","policy":"e30=","source":{"nonce":"AAAA","evidence":{"platform":"emulated-sev-snp","raw":"AA=="}},"destination":{}}`))
	f.Add([]byte(`{"migrationId":"../x","tenant":"mig","vm":"A"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var req kbwire.ReleaseRequest
		if err := json.Unmarshal(b, &req); err != nil {
			return
		}
		if checkID(req.MigrationID) == nil {
			if n := migrationKeyName(req.MigrationID); len(n) > 80 {
				t.Fatalf("migration key name %q too long", n)
			}
		}
		if checkGuest(req.Tenant, req.VM) == nil {
			epochKeyName(req.Tenant, req.VM, 1)
		}
		for _, a := range []kbwire.Attestation{req.Source, req.Destination} {
			if a.Evidence != nil {
				seal.CheckPublicKey(a.Evidence.HPKEPublicKey)
			}
		}
		ErrorCode(nil)
	})
}
