package attest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// ErrCollateralMissing is returned by the collateral cache for a document that is neither in
// the cache nor fetchable (fetching is off).
var ErrCollateralMissing = errors.New("collateral not in the offline cache and fetching is off")

// collateralCache serves collateral (certificates, CRLs, TCB info, QE identity) by the URL the
// vendor's service publishes it at, from files under a directory: the URL
// https://kdsintf.amd.com/vcek/v1/Milan/cert_chain is the file
// DIR/kdsintf.amd.com/vcek/v1/Milan/cert_chain, with the response headers a service sends
// (Intel PCS sends issuer chains in headers) in a sibling file with suffix ".headers.json".
// Query strings become part of the name (`?` → `@`). With fetching allowed, a missing document
// is fetched at most once per minFetchInterval and written to the cache; fetching never
// happens otherwise. Safe for concurrent use.
type collateralCache struct {
	dir   string
	fetch bool

	// static documents (an emulator's PCS) are served before the directory, by URL.
	static map[string]collateralDoc

	mu        sync.Mutex
	lastFetch time.Time
	client    *http.Client
}

type collateralDoc struct {
	Headers map[string][]string `json:"headers,omitempty"`
	Body    []byte              `json:"-"`
}

const minFetchInterval = 200 * time.Millisecond

func newCollateralCache(dir string, fetch bool) *collateralCache {
	return &collateralCache{dir: dir, fetch: fetch, static: map[string]collateralDoc{}, client: &http.Client{Timeout: 30 * time.Second}}
}

// addStatic serves body (and headers) at url ahead of the directory.
func (c *collateralCache) addStatic(rawURL string, headers map[string][]string, body []byte) {
	c.static[rawURL] = collateralDoc{Headers: headers, Body: body}
}

// path returns the cache file for rawURL, or an error for a URL that cannot name a file safely.
func (c *collateralCache) path(rawURL string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", fmt.Errorf("parsing collateral URL: %w", err)
	}
	name := u.Host + u.Path
	if u.RawQuery != "" {
		name += "@" + u.RawQuery
	}
	if !fs.ValidPath(name) || strings.Contains(name, "..") {
		return "", fmt.Errorf("collateral URL %q does not name a cache file", rawURL)
	}
	return filepath.Join(c.dir, filepath.FromSlash(name)), nil
}

// get returns the document at rawURL.
func (c *collateralCache) get(ctx context.Context, rawURL string) (map[string][]string, []byte, error) {
	if d, ok := c.static[rawURL]; ok {
		return d.Headers, d.Body, nil
	}
	if c.dir != "" {
		p, err := c.path(rawURL)
		if err != nil {
			return nil, nil, err
		}
		if body, err := os.ReadFile(p); err == nil {
			var d collateralDoc
			if hb, err := os.ReadFile(p + ".headers.json"); err == nil {
				if err := json.Unmarshal(hb, &d); err != nil {
					return nil, nil, fmt.Errorf("reading cached headers of %s: %w", rawURL, err)
				}
			}
			return d.Headers, body, nil
		} else if !errors.Is(err, fs.ErrNotExist) {
			return nil, nil, fmt.Errorf("reading collateral cache: %w", err)
		}
	}
	if !c.fetch {
		return nil, nil, fmt.Errorf("%s: %w", rawURL, ErrCollateralMissing)
	}
	return c.fetchAndStore(ctx, rawURL)
}

func (c *collateralCache) fetchAndStore(ctx context.Context, rawURL string) (map[string][]string, []byte, error) {
	c.mu.Lock()
	if wait := minFetchInterval - time.Since(c.lastFetch); wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			c.mu.Unlock()
			return nil, nil, ctx.Err()
		case <-t.C:
		}
	}
	c.lastFetch = time.Now()
	c.mu.Unlock()

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("fetching collateral: %w", err)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("fetching collateral: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, nil, fmt.Errorf("fetching collateral %s: %w", rawURL, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("fetching collateral %s: HTTP %d", rawURL, resp.StatusCode)
	}
	if c.dir != "" {
		if err := c.store(rawURL, resp.Header, body); err != nil {
			return nil, nil, err
		}
	}
	return resp.Header, body, nil
}

func (c *collateralCache) store(rawURL string, headers map[string][]string, body []byte) error {
	p, err := c.path(rawURL)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("writing collateral cache: %w", err)
	}
	hb, err := json.Marshal(collateralDoc{Headers: headers})
	if err != nil {
		return fmt.Errorf("writing collateral cache: %w", err)
	}
	if err := os.WriteFile(p+".headers.json", hb, 0o644); err != nil {
		return fmt.Errorf("writing collateral cache: %w", err)
	}
	if err := os.WriteFile(p, body, 0o644); err != nil {
		return fmt.Errorf("writing collateral cache: %w", err)
	}
	return nil
}

// snpGetter adapts the cache to go-sev-guest's trust.HTTPSGetter and ContextHTTPSGetter.
type snpGetter struct{ c *collateralCache }

func (g snpGetter) Get(u string) ([]byte, error) { return g.GetContext(context.Background(), u) }
func (g snpGetter) GetContext(ctx context.Context, u string) ([]byte, error) {
	_, b, err := g.c.get(ctx, u)
	return b, err
}
