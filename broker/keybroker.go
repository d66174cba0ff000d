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
	Nonce(ctx context.Context, req *NonceRequest) (*NonceResponse, error)
	// Release verifies both pieces of evidence and the tenant's signed policy and, if the policy
	// allows, creates epoch e+1 and the migration key and seals them to the agents.
	Release(ctx context.Context, req *ReleaseRequest) (*ReleaseResponse, error)
	// Adopt starts a guest's first residency (epoch 1) on the host whose evidence is given.
	Adopt(ctx context.Context, req *AdoptRequest) (*AdoptResponse, error)
	// Reissue seals the current epoch's memory key again to the agent of the host where the
	// guest already lives, for an agent that restarted and lost it.
	Reissue(ctx context.Context, req *ReissueRequest) (*ReissueResponse, error)
	// Destroy destroys the keys an outcome ends (commit: migration key and epoch e; abort:
	// migration key and epoch e+1) and returns the signed receipt. Repeating it for the same
	// migration and outcome returns the same receipt.
	Destroy(ctx context.Context, req *DestroyRequest) (*DestroyResponse, error)
}

// KeyBrokerSubjectPrefix is the prefix of the keybroker API's subjects.
const KeyBrokerSubjectPrefix = kbwire.SubjectPrefix

// The keybroker API's operations the broker calls: lethe.v1.keybroker.<op>.
const (
	KeyBrokerOpNonce   = kbwire.OpNonce
	KeyBrokerOpRelease = kbwire.OpRelease
	KeyBrokerOpAdopt   = kbwire.OpAdopt
	KeyBrokerOpReissue = kbwire.OpReissue
	KeyBrokerOpDestroy = kbwire.OpDestroy
	KeyBrokerOpReceipt = kbwire.OpReceipt
)

// The keybroker's requests and responses are those of package kbwire, the keybroker API's
// wire contract, which the broker links without the keybroker's core (and its Vault client).
type (
	// NonceRequest asks for a nonce bound to a migration (or adoption) and a role.
	NonceRequest = kbwire.NonceRequest
	// NonceResponse is a fresh nonce.
	NonceResponse = kbwire.NonceResponse
	// Attestation is one agent's evidence and the nonce it was made for.
	Attestation = kbwire.Attestation
	// KeyBrokerHost describes the host an agent runs on, from its host record.
	KeyBrokerHost = kbwire.Host
	// ReleaseRequest asks for the keys of a migration.
	ReleaseRequest = kbwire.ReleaseRequest
	// ReleaseResponse carries the keys sealed to each agent.
	ReleaseResponse = kbwire.ReleaseResponse
	// AdoptRequest asks for a guest's first residency.
	AdoptRequest = kbwire.AdoptRequest
	// AdoptResponse carries MDK_1 sealed to the host's agent.
	AdoptResponse = kbwire.AdoptResponse
	// ReissueRequest asks again for the current epoch's memory key.
	ReissueRequest = kbwire.ReissueRequest
	// ReissueResponse carries the current epoch's memory key sealed to the host's agent.
	ReissueResponse = kbwire.ReissueResponse
	// Ending says which keys Destroy destroys.
	Ending = kbwire.Ending
	// DestroyRequest ends a migration's keys and asks for its receipt.
	DestroyRequest = kbwire.DestroyRequest
)

// The endings of a migration for Destroy.
const (
	// EndingCommit destroys the migration key and epoch e.
	EndingCommit = kbwire.Commit
	// EndingAbort destroys the migration key and epoch e+1.
	EndingAbort = kbwire.Abort
)

// DestroyResponse is the broker's reading of kbwire.DestroyResponse: it keeps the signed
// receipt envelope as the keybroker encoded it, to store it verbatim, and never parses it.
type DestroyResponse struct {
	Receipt json.RawMessage `json:"receipt"`
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
func (c *KeyBrokerClient) Nonce(ctx context.Context, req *NonceRequest) (*NonceResponse, error) {
	return call[NonceResponse](ctx, c, KeyBrokerOpNonce, req)
}

// Release implements KeyBroker.
func (c *KeyBrokerClient) Release(ctx context.Context, req *ReleaseRequest) (*ReleaseResponse, error) {
	return call[ReleaseResponse](ctx, c, KeyBrokerOpRelease, req)
}

// Adopt implements KeyBroker.
func (c *KeyBrokerClient) Adopt(ctx context.Context, req *AdoptRequest) (*AdoptResponse, error) {
	return call[AdoptResponse](ctx, c, KeyBrokerOpAdopt, req)
}

// Reissue implements KeyBroker.
func (c *KeyBrokerClient) Reissue(ctx context.Context, req *ReissueRequest) (*ReissueResponse, error) {
	return call[ReissueResponse](ctx, c, KeyBrokerOpReissue, req)
}

// Destroy implements KeyBroker.
func (c *KeyBrokerClient) Destroy(ctx context.Context, req *DestroyRequest) (*DestroyResponse, error) {
	return call[DestroyResponse](ctx, c, KeyBrokerOpDestroy, req)
}

// deniedCodes and unavailableCodes classify the keybroker's error answers for the broker.
var (
	deniedCodes      = []wireerr.Code{kbwire.CodeDenied, kbwire.CodePolicyRejected, kbwire.CodeEvidenceRejected, kbwire.CodeUnknownTenant}
	unavailableCodes = []wireerr.Code{kbwire.CodeUnavailable, kbwire.CodeBusy, kbwire.CodeDestructionPending}
)

func call[Resp, Req any](ctx context.Context, c *KeyBrokerClient, op string, req Req) (*Resp, error) {
	resp, err := natsrpc.Call[Req, Resp](ctx, c.nc, KeyBrokerSubjectPrefix+"."+op, req,
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
