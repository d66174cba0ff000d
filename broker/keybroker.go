package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsrpc"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// KeyBroker is the broker's view of the keybroker. The broker forwards evidence and sealed
// keys; it never sees a plaintext key. Implementations return errors matching ErrDenied for
// a policy denial and ErrUnavailable when the keybroker cannot be reached.
type KeyBroker interface {
	// Nonce issues a fresh single-use nonce for (migration, role).
	Nonce(ctx context.Context, req *kbwire.NonceRequest) (*kbwire.NonceResponse, error)
	// Release verifies both pieces of evidence and the tenant's signed policy and, if the policy
	// allows, creates epoch e+1 and the migration key and seals them to the agents.
	Release(ctx context.Context, req *kbwire.ReleaseRequest) (*kbwire.ReleaseResponse, error)
	// Adopt starts a guest's first residency (epoch 1) on the host whose evidence is given.
	Adopt(ctx context.Context, req *kbwire.AdoptRequest) (*kbwire.AdoptResponse, error)
	// Reissue seals the current epoch's memory key again to the agent of the host where the
	// guest already lives, for an agent that restarted and lost it.
	Reissue(ctx context.Context, req *kbwire.ReissueRequest) (*kbwire.ReissueResponse, error)
	// Destroy destroys the keys an outcome ends (commit: migration key and epoch e; abort:
	// migration key and epoch e+1) and returns the signed receipt. Repeating it for the same
	// migration and outcome returns the same receipt.
	Destroy(ctx context.Context, req *kbwire.DestroyRequest) (*DestroyResponse, error)
	// Forget destroys the live epoch's key of a guest whose VM is gone and drops the
	// keybroker's record of it, on the statement its tenant or an admin signed (the broker
	// passes it on and cannot forge it).
	Forget(ctx context.Context, req *kbwire.ForgetRequest) (*kbwire.ForgetResponse, error)
}

// KeyBrokerSubjectPrefix is the prefix of the keybroker API's subjects (kbwire.SubjectPrefix),
// for the broker's NATS permissions.
const KeyBrokerSubjectPrefix = kbwire.SubjectPrefix

// The keybroker's subjects, requests and responses are those of package kbwire, the keybroker
// API's wire contract, which the broker links without the keybroker's core (and its Vault
// client). Only the destroy response has a reading of the broker's own.

// DestroyResponse is the broker's reading of kbwire.DestroyResponse: it keeps the signed
// receipt envelope and the residency log's proof (a tlog.Inclusion) as the keybroker encoded
// them, to store them verbatim, and never parses the proof: the tenant verifies it.
type DestroyResponse struct {
	Receipt json.RawMessage `json:"receipt"`
	// Log is the proof that the migration's ending is in the residency log; absent when the
	// keybroker sent none.
	Log json.RawMessage `json:"log,omitempty"`
}

// KeyBrokerClient is the NATS client of the keybroker API; it implements KeyBroker.
type KeyBrokerClient struct {
	nc      *nats.Conn
	timeout time.Duration
}

// NewKeyBrokerClient returns a client on nc. timeout bounds calls whose context has no
// deadline; 0 means 30 s.
func NewKeyBrokerClient(nc *nats.Conn, timeout time.Duration) *KeyBrokerClient {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	return &KeyBrokerClient{nc: nc, timeout: timeout}
}

// Nonce implements KeyBroker. Keybroker error codes denied, policy_rejected,
// evidence_rejected and unknown_tenant match ErrDenied; unavailable, busy and
// destruction_pending (Vault is down; the keybroker retries the destruction and the broker
// asks again later) match ErrUnavailable; each error answer is a *wireerr.Error whose
// kbwire code matches with errors.Is. No answer at all matches ErrUnavailable.
func (c *KeyBrokerClient) Nonce(ctx context.Context, req *kbwire.NonceRequest) (*kbwire.NonceResponse, error) {
	return call[kbwire.NonceResponse](ctx, c, kbwire.OpNonce, req)
}

// Release implements KeyBroker.
func (c *KeyBrokerClient) Release(ctx context.Context, req *kbwire.ReleaseRequest) (*kbwire.ReleaseResponse, error) {
	return call[kbwire.ReleaseResponse](ctx, c, kbwire.OpRelease, req)
}

// Adopt implements KeyBroker.
func (c *KeyBrokerClient) Adopt(ctx context.Context, req *kbwire.AdoptRequest) (*kbwire.AdoptResponse, error) {
	return call[kbwire.AdoptResponse](ctx, c, kbwire.OpAdopt, req)
}

// Reissue implements KeyBroker.
func (c *KeyBrokerClient) Reissue(ctx context.Context, req *kbwire.ReissueRequest) (*kbwire.ReissueResponse, error) {
	return call[kbwire.ReissueResponse](ctx, c, kbwire.OpReissue, req)
}

// Forget implements KeyBroker.
func (c *KeyBrokerClient) Forget(ctx context.Context, req *kbwire.ForgetRequest) (*kbwire.ForgetResponse, error) {
	return call[kbwire.ForgetResponse](ctx, c, kbwire.OpGuestForget, req)
}

// Destroy implements KeyBroker.
func (c *KeyBrokerClient) Destroy(ctx context.Context, req *kbwire.DestroyRequest) (*DestroyResponse, error) {
	return call[DestroyResponse](ctx, c, kbwire.OpDestroy, req)
}

// deniedCodes and unavailableCodes classify the keybroker's error answers for the broker.
var (
	deniedCodes      = []wireerr.Code{kbwire.CodeDenied, kbwire.CodePolicyRejected, kbwire.CodeEvidenceRejected, kbwire.CodeUnknownTenant}
	unavailableCodes = []wireerr.Code{kbwire.CodeUnavailable, kbwire.CodeBusy, kbwire.CodeDestructionPending}
)

func call[Resp, Req any](ctx context.Context, c *KeyBrokerClient, op string, req Req) (*Resp, error) {
	resp, err := natsrpc.Call[Req, Resp](ctx, c.nc, kbwire.SubjectPrefix+"."+op, req,
		natsrpc.WithTimeout(c.timeout), natsrpc.WithMaxResponse(maxReply))
	if err == nil {
		return resp, nil
	}
	if e, ok := errors.AsType[*wireerr.Error](err); ok {
		switch {
		case slices.Contains(deniedCodes, e.Code):
			return nil, &keybrokerError{op: op, class: ErrDenied, wire: e}
		case slices.Contains(unavailableCodes, e.Code):
			return nil, &keybrokerError{op: op, class: ErrUnavailable, wire: e}
		}
		return nil, fmt.Errorf("calling keybroker %s: %w", op, err)
	}
	if errors.Is(err, natsrpc.ErrNoAnswer) {
		return nil, fmt.Errorf("calling keybroker %s: %w: %w", op, ErrUnavailable, err)
	}
	return nil, fmt.Errorf("calling keybroker %s: %w", op, err)
}

// keybrokerError is an error answer of the keybroker that the broker classifies: it matches
// its class (ErrDenied or ErrUnavailable) and the keybroker's error answer (and so its kbwire
// code), whose message already names the decision and every failing rule.
type keybrokerError struct {
	op    string
	class error
	wire  *wireerr.Error
}

func (e *keybrokerError) Error() string {
	if string(e.wire.Code) == e.class.Error() {
		return fmt.Sprintf("keybroker %s %v: %s", e.op, e.class, e.wire.Message)
	}
	return fmt.Sprintf("keybroker %s %v (%s): %s", e.op, e.class, e.wire.Code, e.wire.Message)
}

func (e *keybrokerError) Unwrap() []error { return []error{e.class, e.wire} }

// maxReply bounds replies read by the broker's clients.
const maxReply = 4 << 20
