package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
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
	// Destroy destroys the keys an outcome ends (commit: migration key and epoch e; abort:
	// migration key and epoch e+1) and returns the signed receipt. Repeating it for the same
	// migration and outcome returns the same receipt.
	Destroy(ctx context.Context, req *DestroyRequest) (*DestroyResponse, error)
}

// KeyBrokerSubjectPrefix is the prefix of the keybroker API's subjects.
const KeyBrokerSubjectPrefix = "lethe.v1.keybroker"

// The keybroker API's operations: lethe.v1.keybroker.<op>.
const (
	KeyBrokerOpNonce   = "nonce"
	KeyBrokerOpRelease = "release"
	KeyBrokerOpAdopt   = "adopt"
	KeyBrokerOpDestroy = "destroy"
	KeyBrokerOpReceipt = "receipt"
)

// NonceRequest asks for a nonce bound to a migration (or adoption) and a role.
type NonceRequest struct {
	MigrationID string      `json:"migrationId"`
	Role        attest.Role `json:"role"`
}

// NonceResponse is a fresh nonce.
type NonceResponse struct {
	Nonce   []byte    `json:"nonce"`
	Expires time.Time `json:"expires,omitzero"`
}

// The structs below are the broker's side of the keybroker's wire format (package
// keybroker's wire.go): the same JSON, declared here so that the broker does not link the
// keybroker (and its Vault client).

// Attestation is one agent's evidence and the nonce it was made for.
type Attestation struct {
	Nonce    []byte           `json:"nonce"`
	Evidence *attest.Evidence `json:"evidence"`
}

// KeyBrokerHost describes the host an agent runs on, from its host record.
type KeyBrokerHost struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
	Region string            `json:"region,omitempty"`
}

// ReleaseRequest asks for the keys of a migration.
type ReleaseRequest struct {
	MigrationID string `json:"migrationId"`
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	// Policy is the tenant's signed policy envelope, verbatim.
	Policy          []byte        `json:"policy"`
	Source          Attestation   `json:"source"`
	Destination     Attestation   `json:"destination"`
	DestinationHost KeyBrokerHost `json:"destinationHost"`
}

// ReleaseResponse carries the keys sealed to each agent.
type ReleaseResponse struct {
	MigrationID string `json:"migrationId"`
	// FromEpoch is the guest's epoch at the source (e), ToEpoch the destination's (e+1).
	FromEpoch uint64 `json:"fromEpoch"`
	ToEpoch   uint64 `json:"toEpoch"`
	// SealedSource is TK sealed to the source's HPKE key; SealedDestination is TK and
	// MDK_{e+1} sealed to the destination's.
	SealedSource      []byte `json:"sealedSource"`
	SealedDestination []byte `json:"sealedDestination"`
	// WrappedMDK is MDK_{e+1} wrapped by Vault.
	WrappedMDK   string          `json:"wrappedMdk"`
	PolicyDigest json.RawMessage `json:"policyDigest,omitempty"`
	PolicySVN    uint64          `json:"policySvn,omitempty"`
	// ZeroPageElision says whether the tenant's policy lets the source skip zero pages.
	ZeroPageElision bool `json:"zeroPageElision,omitempty"`
}

// AdoptRequest asks for a guest's first residency.
type AdoptRequest struct {
	AdoptionID string        `json:"adoptionId"`
	Tenant     string        `json:"tenant"`
	VM         string        `json:"vm"`
	Policy     []byte        `json:"policy"`
	Agent      Attestation   `json:"agent"`
	Host       KeyBrokerHost `json:"host"`
}

// AdoptResponse carries MDK_1 sealed to the host's agent.
type AdoptResponse struct {
	Epoch        uint64          `json:"epoch"`
	Sealed       []byte          `json:"sealed"`
	WrappedMDK   string          `json:"wrappedMdk"`
	PolicyDigest json.RawMessage `json:"policyDigest,omitempty"`
	PolicySVN    uint64          `json:"policySvn,omitempty"`
}

// Ending says which keys Destroy destroys.
type Ending string

// The endings of a migration for Destroy.
const (
	// EndingCommit destroys the migration key and epoch e.
	EndingCommit Ending = "commit"
	// EndingAbort destroys the migration key and epoch e+1.
	EndingAbort Ending = "abort"
)

// DestroyRequest ends a migration's keys and asks for its receipt.
type DestroyRequest struct {
	MigrationID string `json:"migrationId"`
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	Ending      Ending `json:"ending"`
	// Erasure is the source's erasure evidence and its nonce (commit only, when the source
	// answered).
	Erasure *Attestation `json:"erasure,omitempty"`
	// CommitAck is the destination's commit acknowledgement (commit only, when there is one);
	// the receipt states its digest.
	CommitAck []byte `json:"commitAck,omitempty"`
}

// DestroyResponse carries the signed receipt.
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
// asks again later) match ErrUnavailable; others are *Error.
func (c *KeyBrokerClient) Nonce(ctx context.Context, req *NonceRequest) (*NonceResponse, error) {
	var resp NonceResponse
	return &resp, c.call(ctx, KeyBrokerOpNonce, req, &resp)
}

// Release implements KeyBroker.
func (c *KeyBrokerClient) Release(ctx context.Context, req *ReleaseRequest) (*ReleaseResponse, error) {
	var resp ReleaseResponse
	return &resp, c.call(ctx, KeyBrokerOpRelease, req, &resp)
}

// Adopt implements KeyBroker.
func (c *KeyBrokerClient) Adopt(ctx context.Context, req *AdoptRequest) (*AdoptResponse, error) {
	var resp AdoptResponse
	return &resp, c.call(ctx, KeyBrokerOpAdopt, req, &resp)
}

// Destroy implements KeyBroker.
func (c *KeyBrokerClient) Destroy(ctx context.Context, req *DestroyRequest) (*DestroyResponse, error) {
	var resp DestroyResponse
	return &resp, c.call(ctx, KeyBrokerOpDestroy, req, &resp)
}

func (c *KeyBrokerClient) call(ctx context.Context, op string, req, resp any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	if err := request(ctx, c.nc, KeyBrokerSubjectPrefix+"."+op, req, resp); err != nil {
		if e, ok := errors.AsType[*Error](err); ok {
			switch e.Code {
			case "denied", "policy_rejected", "evidence_rejected", "unknown_tenant":
				return &keybrokerError{op: op, class: ErrDenied, wire: e}
			case "unavailable", "busy", "destruction_pending":
				return &keybrokerError{op: op, class: ErrUnavailable, wire: e}
			}
		}
		return fmt.Errorf("calling keybroker %s: %w", op, err)
	}
	return nil
}

// keybrokerError is an error answer of the keybroker that the broker classifies: it matches
// its class (ErrDenied or ErrUnavailable) and the keybroker's *Error, whose message already
// names the decision and every failing rule.
type keybrokerError struct {
	op    string
	class error
	wire  *Error
}

func (e *keybrokerError) Error() string {
	if e.wire.Code == e.class.Error() {
		return fmt.Sprintf("keybroker %s %v: %s", e.op, e.class, e.wire.Message)
	}
	return fmt.Sprintf("keybroker %s %v (%s): %s", e.op, e.class, e.wire.Code, e.wire.Message)
}

func (e *keybrokerError) Unwrap() []error { return []error{e.class, e.wire} }

// maxReply bounds replies read by the broker's clients.
const maxReply = 4 << 20

// request sends req as JSON to subject and decodes the reply into resp. A reply with NATS
// micro error headers becomes an *Error; no responders or a timeout match ErrUnavailable.
func request(ctx context.Context, nc *nats.Conn, subject string, req, resp any) error {
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	msg, err := nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		return fmt.Errorf("requesting %s: %w: %w", subject, ErrUnavailable, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return &Error{Code: code, Message: msg.Header.Get(micro.ErrorHeader)}
	}
	if len(msg.Data) > maxReply {
		return fmt.Errorf("reading reply of %s: %d bytes exceeds the limit", subject, len(msg.Data))
	}
	if err := json.Unmarshal(msg.Data, resp); err != nil {
		return fmt.Errorf("decoding reply of %s: %w", subject, err)
	}
	return nil
}
