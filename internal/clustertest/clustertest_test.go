package clustertest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestNATS shows that three nodes form a JetStream cluster and that an R3 key-value bucket
// keeps its data and takes writes after its leader is killed, and again once it is back.
func TestNATS(t *testing.T) {
	c := StartNATS(t, NATSOptions{})
	nc, err := nats.Connect(c.URL, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "b", Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "k", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	leader := c.StreamLeader("KV_b")
	c.Kill(leader)
	if l := c.StreamLeader("KV_b"); l == leader {
		t.Fatalf("the killed node %s still leads", c.Name(leader))
	}
	put(t, kv, "k", "v2")
	if e, err := kv.Get(ctx, "k"); err != nil || string(e.Value()) != "v2" {
		t.Fatalf("after the kill: %v, %v", e, err)
	}
	c.Restart(leader)
	put(t, kv, "k", "v3")
	if c.MetaLeader() < 0 {
		t.Fatal("no meta leader")
	}
}

// TestNATSPartition shows that a partitioned node's routes are cut and come back.
func TestNATSPartition(t *testing.T) {
	c := StartNATS(t, NATSOptions{})
	nc, err := nats.Connect(c.URL, nats.MaxReconnects(-1))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	kv, err := js.CreateKeyValue(t.Context(), jetstream.KeyValueConfig{Bucket: "b", Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	leader := c.StreamLeader("KV_b")
	c.Partition(leader)
	// The other two elect a leader of their own.
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if _, err := waitFor(ctx, func(ctx context.Context) (string, error) {
		var got string
		for i := range 3 {
			if i == leader {
				continue
			}
			l, err := leaderSeenBy(ctx, c, i, "KV_b")
			if err != nil || l == "" || l == c.Name(leader) || (got != "" && l != got) {
				return "", fmt.Errorf("node %d sees leader %q (%v)", i, l, err)
			}
			got = l
		}
		return got, nil
	}); err != nil {
		t.Fatal(err)
	}
	c.Heal(leader)
	put(t, kv, "k", "after")
	c.StreamLeader("KV_b")
}

func leaderSeenBy(ctx context.Context, c *NATS, i int, stream string) (string, error) {
	var z jsz
	if err := getJSON(ctx, fmt.Sprintf("http://%s/jsz?accounts=true&streams=true", hostPort(c.nodes[i].http)), &z); err != nil {
		return "", err
	}
	for _, a := range z.Accounts {
		for _, s := range a.Streams {
			if s.Name == stream && s.Cluster != nil {
				return s.Cluster.Leader, nil
			}
		}
	}
	return "", errors.New("stream not seen")
}

// put writes key until it succeeds (a stream between leaders answers no writes).
func put(t *testing.T, kv jetstream.KeyValue, key, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	// Each try is bounded: a write sent just as a partition heals may never be acknowledged.
	if _, err := waitFor(ctx, func(ctx context.Context) (uint64, error) {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return kv.Put(ctx, key, []byte(value))
	}); err != nil {
		t.Fatalf("writing %s: %v", key, err)
	}
}

// TestVaultHA shows that three Vault nodes form a cluster that elects a new leader when its
// leader is killed, keeps its data, and takes the killed node back.
func TestVaultHA(t *testing.T) {
	v := StartVaultHA(t)
	c := v.Client()
	ctx := t.Context()
	if _, err := c.Logical().WriteWithContext(ctx, "transit/keys/k", nil); err != nil {
		t.Fatal(err)
	}
	leader := v.Leader()
	v.Kill(leader)
	if l := v.Leader(); l == leader {
		t.Fatalf("the killed node %d still leads", leader)
	}
	waitCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := waitFor(waitCtx, func(ctx context.Context) (any, error) {
		return c.Logical().ReadWithContext(ctx, "transit/keys/k")
	}); err != nil {
		t.Fatalf("reading the key after the kill: %v", err)
	}
	v.Restart(leader)
	if _, err := c.Logical().WriteWithContext(ctx, "transit/keys/k2", nil); err != nil {
		t.Fatal(err)
	}
}
