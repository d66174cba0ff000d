package broker_test

import (
	"encoding/json"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// TestDestroyResponseWire checks that the broker's reading of the keybroker's destroy answer
// keeps the receipt envelope and the log proof exactly as the keybroker encoded them.
func TestDestroyResponseWire(t *testing.T) {
	env := &receipt.Envelope{PayloadType: "application/vnd.lethe.receipt+json", Payload: []byte(`{"x":1}`),
		Signatures: []receipt.Signature{{KeyID: "k1", Sig: []byte{1, 2, 3}}}}
	inc := &tlog.Inclusion{Checkpoint: []byte("log.example\n3\nAAAA\n\n— log.example sig\n"),
		Entry: tlog.ProvenEntry{Index: 2, Leaf: []byte(`{"kind":"commit"}`), Proof: [][]byte{{1}, {2}}}}
	data, err := json.Marshal(kbwire.DestroyResponse{Receipt: env, Log: inc})
	if err != nil {
		t.Fatal(err)
	}
	var got broker.DestroyResponse
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	want, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), string(got.Receipt)); diff != "" {
		t.Errorf("receipt (-want +got):\n%s", diff)
	}
	wantLog, err := json.Marshal(inc)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(wantLog), string(got.Log)); diff != "" {
		t.Errorf("log proof (-want +got):\n%s", diff)
	}
}
