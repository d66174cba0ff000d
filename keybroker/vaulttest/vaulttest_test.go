package vaulttest

import "testing"

func TestStartStopRestart(t *testing.T) {
	s := Start(t)
	if _, err := s.Client.Logical().WriteWithContext(t.Context(), TransitMount+"/keys/k", nil); err != nil {
		t.Fatalf("transit: %v", err)
	}
	if _, err := s.Client.KVv2(KVMount).Put(t.Context(), "x", map[string]any{"a": 1}); err != nil {
		t.Fatalf("kv: %v", err)
	}

	p := s.Proxy(t)
	c, err := NewClient(p.Addr, s.Token)
	if err != nil {
		t.Fatal(err)
	}
	p.Cut()
	_, err = c.Logical().ReadWithContext(t.Context(), TransitMount+"/keys/k")
	if err == nil {
		t.Fatalf("read through a cut proxy: %v, want an error", err)
	}
	p.Restore()
	if sec, err := c.Logical().ReadWithContext(t.Context(), TransitMount+"/keys/k"); err != nil || sec == nil {
		t.Fatalf("read through a restored proxy: %v", err)
	}

	s.Restart()
	sec, err := s.Client.Logical().ReadWithContext(t.Context(), TransitMount+"/keys/k")
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	if sec != nil {
		t.Errorf("a dev server kept a key across a restart")
	}
}
