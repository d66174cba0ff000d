package keybroker

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"
)

// transitKey is what the keybroker reads of a Transit key.
type transitKey struct {
	Type          string
	LatestVersion int
	Exportable    bool
	// PlaintextBackup is allow_plaintext_backup: the key can be backed up in plaintext.
	PlaintextBackup bool
	// Imported is imported_key: the key material came from outside Vault.
	Imported bool
	// Created is when version 1 was created; zero if Vault did not say.
	Created time.Time
	// PublicKey is the latest version's public key (ed25519 keys only).
	PublicKey ed25519.PublicKey
}

// keyStore is the keybroker's view of Vault Transit.
type keyStore interface {
	// createKey creates the named key of the given Transit type, never exportable, and checks
	// what Vault then holds under the name (see vaultClient.createKey): it returns
	// ErrUnsafeKey if that is not a key Lethe may use.
	createKey(ctx context.Context, name, typ string) error
	// dataKey draws a 256-bit data key under name: its plaintext and its wrapped form.
	dataKey(ctx context.Context, name string) (plaintext []byte, wrapped string, err error)
	// decrypt unwraps a wrapped data key.
	decrypt(ctx context.Context, name, wrapped string) ([]byte, error)
	// readKey returns the named key, or nil if there is none.
	readKey(ctx context.Context, name string) (*transitKey, error)
	// deleteKey allows deletion of the named key, deletes it and checks that it is gone.
	deleteKey(ctx context.Context, name string) error
	// sign signs msg with the named ed25519 key.
	sign(ctx context.Context, name string, msg []byte) ([]byte, error)
}

// recordStore is the keybroker's view of Vault's KV v2 engine. Records are JSON objects.
type recordStore interface {
	// get decodes the record at path into v and returns its version, or 0 if there is none.
	get(ctx context.Context, path string, v any) (int, error)
	// put writes v at path if the record's current version is cas (0: if there is none) and
	// returns the new version; errConflict if the version moved.
	put(ctx context.Context, path string, v any, cas int) (int, error)
	// list returns the names under dir.
	list(ctx context.Context, dir string) ([]string, error)
	// remove deletes the record at path with all its versions; a missing record is no error.
	remove(ctx context.Context, path string) error
}

// ErrVaultUnavailable is returned (wrapped) when Vault cannot be reached, is sealed, or fails
// with a server error. Nothing is released when it is returned.
var ErrVaultUnavailable = errors.New("vault unavailable")

// ErrUnsafeKey is returned (wrapped) when a Transit key the keybroker creates is not the key it
// asked for: the name was taken before (Transit's create of an existing name changes nothing
// and reports success), or the key is exportable, allows plaintext backup, holds imported key
// material or has another type. Nothing is drawn from, sealed or released under such a key.
// It says that someone with write access to Lethe's Transit mount prepared a key of a name
// Lethe uses: the operator must look.
var ErrUnsafeKey = errors.New("transit key is not one the keybroker created")

// errConflict is a KV check-and-set mismatch.
var errConflict = errors.New("record changed concurrently")

// vaultClient implements keyStore and recordStore over Vault's HTTP API.
type vaultClient struct {
	c       *api.Client
	transit string // Transit mount
	kv      string // KV v2 mount
	// metrics counts Vault's unavailability; nil counts nothing.
	metrics Metrics
	// now is the clock createKey judges a key's creation time by; nil: time.Now. It is not
	// the keybroker's clock (Config.Now), which tests pin: Vault stamps keys with real time.
	now func() time.Time
}

// sharedKeys are the Transit keys every keybroker of a deployment shares, created by
// whichever comes first: createKey accepts them existing (with safe properties), because
// another keybroker may have created them a moment earlier. Every other key is one
// migration's or one epoch's and must be new.
var sharedKeys = map[string]bool{NonceWrappingKey: true, ReceiptSigningKey: true}

// keyFreshness is how recent a created key's version 1 must be for createKey to take it as
// the key its own request created. It allows for clock skew between Vault and the keybroker.
const keyFreshness = 2 * time.Minute

// classify marks transport failures and server errors as ErrVaultUnavailable.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if re, ok := errors.AsType[*api.ResponseError](err); ok && re.StatusCode < 500 && re.StatusCode != http.StatusTooManyRequests {
		return err
	}
	// Transport errors, timeouts (context ones included), 5xx and 429.
	return fmt.Errorf("%w: %w", ErrVaultUnavailable, err)
}

// createKey creates the named key and checks, from Vault's answer (Vault ≥ 1.14 returns the
// key; an older one costs one read), that the key under the name is of type typ, not
// exportable, without plaintext backup and not imported; and, unless it is one of sharedKeys,
// that it is new: at version 1, created within keyFreshness of now. Transit's create of a name
// that exists is a silent no-op, so without this a key someone prepared under a name Lethe is
// about to use (an exportable lethe-mig-<id>, say) would be used as Lethe's own. It returns
// ErrUnsafeKey (wrapped) for such a key, or ErrVaultUnavailable.
//
// It never deletes a key it refuses: what it refuses is not its own. (A refused release's
// cleanup may destroy it later, under the cleanup's own rules: see executeCleanup.)
func (v *vaultClient) createKey(ctx context.Context, name, typ string) error {
	s, err := v.c.Logical().WriteWithContext(ctx, v.transit+"/keys/"+name, map[string]any{
		"type":                   typ,
		"exportable":             false,
		"allow_plaintext_backup": false,
	})
	if err != nil {
		return fmt.Errorf("creating transit key %s: %w", name, countVault(v.metrics, err))
	}
	var k *transitKey
	if s != nil && s.Data != nil && s.Data["latest_version"] != nil {
		if k, err = parseTransitKey(name, s.Data); err != nil {
			return fmt.Errorf("creating transit key %s: %w", name, err)
		}
	} else if k, err = v.readKey(ctx, name); err != nil {
		return fmt.Errorf("creating transit key %s: %w", name, err)
	}
	if err := v.checkCreated(name, typ, k); err != nil {
		return fmt.Errorf("creating transit key %s: %w", name, err)
	}
	return nil
}

// checkCreated returns ErrUnsafeKey (wrapped, with every reason) unless k is a key createKey
// may hand out under name.
func (v *vaultClient) checkCreated(name, typ string, k *transitKey) error {
	if k == nil {
		return fmt.Errorf("%w: Vault holds no key under the name after creating it", ErrUnsafeKey)
	}
	var why []string
	if k.Type != typ {
		why = append(why, fmt.Sprintf("type %s, want %s", k.Type, typ))
	}
	if k.Exportable {
		why = append(why, "exportable")
	}
	if k.PlaintextBackup {
		why = append(why, "plaintext backup allowed")
	}
	if k.Imported {
		why = append(why, "imported key material")
	}
	if !sharedKeys[name] {
		now := time.Now()
		if v.now != nil {
			now = v.now()
		}
		switch {
		case k.LatestVersion != 1:
			why = append(why, fmt.Sprintf("existed before (latest version %d)", k.LatestVersion))
		case k.Created.IsZero():
			why = append(why, "creation time unknown")
		case k.Created.Before(now.Add(-keyFreshness)) || k.Created.After(now.Add(keyFreshness)):
			why = append(why, fmt.Sprintf("existed before (created %s)", k.Created.UTC().Format(time.RFC3339)))
		}
	}
	if len(why) > 0 {
		return fmt.Errorf("%w: %s", ErrUnsafeKey, strings.Join(why, ", "))
	}
	return nil
}

func (v *vaultClient) dataKey(ctx context.Context, name string) ([]byte, string, error) {
	s, err := v.c.Logical().WriteWithContext(ctx, v.transit+"/datakey/plaintext/"+name, map[string]any{"bits": 256})
	if err != nil {
		return nil, "", fmt.Errorf("drawing data key under %s: %w", name, countVault(v.metrics, err))
	}
	if s == nil || s.Data == nil {
		return nil, "", fmt.Errorf("drawing data key under %s: empty response", name)
	}
	pt, _ := s.Data["plaintext"].(string)
	ct, _ := s.Data["ciphertext"].(string)
	key, err := base64.StdEncoding.DecodeString(pt)
	if err != nil || len(key) != 32 || !strings.HasPrefix(ct, "vault:") {
		return nil, "", fmt.Errorf("drawing data key under %s: malformed response", name)
	}
	return key, ct, nil
}

func (v *vaultClient) decrypt(ctx context.Context, name, wrapped string) ([]byte, error) {
	s, err := v.c.Logical().WriteWithContext(ctx, v.transit+"/decrypt/"+name, map[string]any{"ciphertext": wrapped})
	if err != nil {
		return nil, fmt.Errorf("unwrapping data key under %s: %w", name, countVault(v.metrics, err))
	}
	if s == nil || s.Data == nil {
		return nil, fmt.Errorf("unwrapping data key under %s: empty response", name)
	}
	pt, _ := s.Data["plaintext"].(string)
	key, err := base64.StdEncoding.DecodeString(pt)
	if err != nil {
		return nil, fmt.Errorf("unwrapping data key under %s: malformed response", name)
	}
	return key, nil
}

func (v *vaultClient) readKey(ctx context.Context, name string) (*transitKey, error) {
	s, err := v.c.Logical().ReadWithContext(ctx, v.transit+"/keys/"+name)
	if err != nil {
		return nil, fmt.Errorf("reading transit key %s: %w", name, countVault(v.metrics, err))
	}
	if s == nil || s.Data == nil {
		return nil, nil
	}
	k, err := parseTransitKey(name, s.Data)
	if err != nil {
		return nil, fmt.Errorf("reading transit key %s: %w", name, err)
	}
	return k, nil
}

// parseTransitKey reads what the keybroker needs of a key as Transit describes it (GET
// transit/keys/:name, and the answer to its creation).
func parseTransitKey(name string, d map[string]any) (*transitKey, error) {
	k := &transitKey{}
	k.Type, _ = d["type"].(string)
	k.Exportable, _ = d["exportable"].(bool)
	k.PlaintextBackup, _ = d["allow_plaintext_backup"].(bool)
	k.Imported, _ = d["imported_key"].(bool)
	if n, ok := d["latest_version"].(json.Number); ok {
		i, err := n.Int64()
		if err != nil {
			return nil, fmt.Errorf("latest_version: %w", err)
		}
		k.LatestVersion = int(i)
	}
	keys, _ := d["keys"].(map[string]any)
	// Version 1's creation time: Unix seconds for symmetric keys, an RFC 3339 creation_time
	// for asymmetric ones.
	switch first := keys["1"].(type) {
	case json.Number:
		if sec, err := first.Int64(); err == nil {
			k.Created = time.Unix(sec, 0)
		}
	case map[string]any:
		if ct, ok := first["creation_time"].(string); ok {
			k.Created, _ = time.Parse(time.RFC3339Nano, ct)
		}
	}
	if k.Type == "ed25519" {
		latest, _ := keys[strconv.Itoa(k.LatestVersion)].(map[string]any)
		pub, _ := latest["public_key"].(string)
		b, err := base64.StdEncoding.DecodeString(pub)
		if err != nil || len(b) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("transit key %s: malformed public key", name)
		}
		k.PublicKey = b
	}
	return k, nil
}

// deleteKey allows deletion of the named key, deletes it and reads it back: a key that is
// still there after Transit accepted its deletion is an error, so that no one records as
// destroyed what is not.
func (v *vaultClient) deleteKey(ctx context.Context, name string) error {
	if _, err := v.c.Logical().WriteWithContext(ctx, v.transit+"/keys/"+name+"/config", map[string]any{"deletion_allowed": true}); err != nil {
		return fmt.Errorf("allowing deletion of transit key %s: %w", name, countVault(v.metrics, err))
	}
	if _, err := v.c.Logical().DeleteWithContext(ctx, v.transit+"/keys/"+name); err != nil {
		return fmt.Errorf("deleting transit key %s: %w", name, countVault(v.metrics, err))
	}
	k, err := v.readKey(ctx, name)
	if err != nil {
		return fmt.Errorf("checking the deletion of transit key %s: %w", name, err)
	}
	if k != nil {
		return fmt.Errorf("deleting transit key %s: %w", name, errKeyNotDeleted)
	}
	return nil
}

// errKeyNotDeleted is a Transit key still readable after its deletion was accepted.
var errKeyNotDeleted = errors.New("the key is still there after its deletion")

func (v *vaultClient) sign(ctx context.Context, name string, msg []byte) ([]byte, error) {
	s, err := v.c.Logical().WriteWithContext(ctx, v.transit+"/sign/"+name, map[string]any{
		"input": base64.StdEncoding.EncodeToString(msg),
	})
	if err != nil {
		return nil, fmt.Errorf("signing with transit key %s: %w", name, countVault(v.metrics, err))
	}
	if s == nil || s.Data == nil {
		return nil, fmt.Errorf("signing with transit key %s: empty response", name)
	}
	sig, _ := s.Data["signature"].(string)
	// vault:v<N>:<base64>
	parts := strings.SplitN(sig, ":", 3)
	if len(parts) != 3 || parts[0] != "vault" {
		return nil, fmt.Errorf("signing with transit key %s: malformed signature", name)
	}
	b, err := base64.StdEncoding.DecodeString(parts[2])
	if err != nil {
		return nil, fmt.Errorf("signing with transit key %s: malformed signature: %w", name, err)
	}
	return b, nil
}

func (v *vaultClient) get(ctx context.Context, path string, into any) (int, error) {
	s, err := v.c.KVv2(v.kv).Get(ctx, path)
	if errors.Is(err, api.ErrSecretNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading record %s: %w", path, countVault(v.metrics, err))
	}
	if s.Data == nil || s.VersionMetadata == nil || s.VersionMetadata.Destroyed || !s.VersionMetadata.DeletionTime.IsZero() {
		return 0, nil
	}
	b, err := json.Marshal(s.Data)
	if err != nil {
		return 0, fmt.Errorf("reading record %s: %w", path, err)
	}
	if err := json.Unmarshal(b, into); err != nil {
		return 0, fmt.Errorf("decoding record %s: %w", path, err)
	}
	return s.VersionMetadata.Version, nil
}

func (v *vaultClient) put(ctx context.Context, path string, rec any, cas int) (int, error) {
	b, err := json.Marshal(rec)
	if err != nil {
		return 0, fmt.Errorf("writing record %s: %w", path, err)
	}
	var data map[string]any
	if err := json.Unmarshal(b, &data); err != nil {
		return 0, fmt.Errorf("writing record %s: %w", path, err)
	}
	s, err := v.c.KVv2(v.kv).Put(ctx, path, data, api.WithCheckAndSet(cas))
	if err != nil {
		if re, ok := errors.AsType[*api.ResponseError](err); ok && re.StatusCode == http.StatusBadRequest && strings.Contains(strings.Join(re.Errors, " "), "check-and-set") {
			return 0, fmt.Errorf("writing record %s: %w", path, errConflict)
		}
		return 0, fmt.Errorf("writing record %s: %w", path, countVault(v.metrics, err))
	}
	if s == nil || s.VersionMetadata == nil {
		return 0, fmt.Errorf("writing record %s: empty response", path)
	}
	return s.VersionMetadata.Version, nil
}

func (v *vaultClient) list(ctx context.Context, dir string) ([]string, error) {
	s, err := v.c.Logical().ListWithContext(ctx, v.kv+"/metadata/"+dir)
	if err != nil {
		return nil, fmt.Errorf("listing records under %s: %w", dir, countVault(v.metrics, err))
	}
	if s == nil || s.Data == nil {
		return nil, nil
	}
	raw, _ := s.Data["keys"].([]any)
	out := make([]string, 0, len(raw))
	for _, k := range raw {
		if name, ok := k.(string); ok {
			out = append(out, name)
		}
	}
	return out, nil
}

func (v *vaultClient) remove(ctx context.Context, path string) error {
	if err := v.c.KVv2(v.kv).DeleteMetadata(ctx, path); err != nil {
		return fmt.Errorf("deleting record %s: %w", path, countVault(v.metrics, err))
	}
	return nil
}
