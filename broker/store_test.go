package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// readAfterWriteRounds is how many writes each read-after-write test reads back.
const readAfterWriteRounds = 500

// clusterStore starts a 3-node JetStream cluster, opens the broker's store on it with 3
// replicas, and returns the store as a client connected to a follower of the migrations
// bucket's stream opens it (the node whose replica a direct get would be answered by), with a
// JetStream client connected to any node.
func clusterStore(t *testing.T) (*natstest.Cluster, *store, jetstream.JetStream) {
	t.Helper()
	c := natstest.StartCluster(t, 3, natstest.Options{})
	js, err := jetstream.New(c.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := openStore(t.Context(), js, storeConfig{replicas: 3, hostTTL: time.Minute, eventsRetention: time.Hour, auditRetention: time.Hour}); err != nil {
		t.Fatal(err)
	}
	fjs, err := jetstream.New(followerOf(t, c, js, "KV_"+MigrationsBucket).Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	st, err := openStore(t.Context(), fjs, storeConfig{replicas: 3, hostTTL: time.Minute, eventsRetention: time.Hour, auditRetention: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return c, st, js
}

// followerOf returns a node of c that holds a replica of stream and does not lead it.
func followerOf(t *testing.T, c *natstest.Cluster, js jetstream.JetStream, stream string) *natstest.Server {
	t.Helper()
	s, err := js.Stream(t.Context(), stream)
	if err != nil {
		t.Fatal(err)
	}
	info := s.CachedInfo()
	for _, n := range c.Nodes {
		if info.Cluster != nil && n.Server.Name() != info.Cluster.Leader {
			return n
		}
	}
	t.Fatalf("stream %s has no follower: %+v", stream, info.Cluster)
	return nil
}

// staleReads writes key readAfterWriteRounds times through kv and reads it back after each
// write, and returns how many reads returned an older revision than the write's.
func staleReads(t *testing.T, kv jetstream.KeyValue, key string) int {
	t.Helper()
	stale := 0
	for i := range readAfterWriteRounds {
		rev, err := kv.Put(t.Context(), key, fmt.Appendf(nil, "%d", i))
		if err != nil {
			t.Fatal(err)
		}
		e, err := kv.Get(t.Context(), key)
		if err != nil {
			t.Fatal(err)
		}
		if e.Revision() < rev {
			stale++
		}
	}
	return stale
}

// TestStoreReadAfterWriteR3 checks that a read of the broker's store on a cluster with 3
// replicas, from a client connected to a follower of the bucket's stream, never returns an
// older revision than the write the client had acknowledged before it: the broker runs side
// effects on what it reads.
func TestStoreReadAfterWriteR3(t *testing.T) {
	_, st, js := clusterStore(t)
	if s, err := js.Stream(t.Context(), "KV_"+MigrationsBucket); err != nil || s.CachedInfo().Config.AllowDirect {
		t.Fatalf("stream KV_%s allows direct gets (or: %v)", MigrationsBucket, err)
	}
	if n := staleReads(t, st.migrations, "m"); n > 0 {
		t.Errorf("%d of %d reads after a write returned an older revision", n, readAfterWriteRounds)
	}

}

// TestOpenStoreKeepsDirectGetsOff checks that a broker opening the store again, as one
// starting beside running brokers does, leaves direct gets off, even after the key-value API
// turned them on.
func TestOpenStoreKeepsDirectGetsOff(t *testing.T) {
	srv := natstest.Start(t, natstest.Options{})
	js, err := jetstream.New(srv.Connect(t, nats.Name("broker")))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateKeyValue(t.Context(), jetstream.KeyValueConfig{Bucket: MigrationsBucket, History: 5, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := openStore(t.Context(), js, storeConfig{replicas: 1, hostTTL: time.Minute, eventsRetention: time.Hour, auditRetention: time.Hour}); err != nil {
			t.Fatal(err)
		}
		for _, bucket := range []string{MigrationsBucket, HostsBucket, PoliciesBucket, GuestsBucket, ReceiptsBucket, FleetBucket} {
			s, err := js.Stream(t.Context(), "KV_"+bucket)
			if err != nil {
				t.Fatal(err)
			}
			if s.CachedInfo().Config.AllowDirect {
				t.Errorf("stream KV_%s allows direct gets", bucket)
			}
		}
	}
}

// TestListHostsUnderHeartbeats lists the hosts while every host's heartbeat rewrites its
// record: no listing may miss a live host, as placement and fleet operations would then skip
// it.
func TestListHostsUnderHeartbeats(t *testing.T) {
	srv := natstest.Start(t, natstest.Options{})
	js, err := jetstream.New(srv.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	st, err := openStore(t.Context(), js, storeConfig{replicas: 1, hostTTL: time.Minute, eventsRetention: time.Hour, auditRetention: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	const hosts = 40
	beat := func(i int) error {
		rec := agentapi.HostRecord{Host: fmt.Sprintf("h%02d", i), Platform: attest.PlatformEmulatedSEVSNP, Heartbeat: time.Now()}
		data, err := json.Marshal(rec)
		if err != nil {
			return err
		}
		_, err = st.hosts.Put(t.Context(), rec.Host, data)
		return err
	}
	for i := range hosts {
		if err := beat(i); err != nil {
			t.Fatal(err)
		}
	}
	ctx, stop := context.WithCancel(t.Context())
	churned := make(chan error, 1)
	go func() {
		for i := 0; ctx.Err() == nil; i++ {
			if err := beat(i % hosts); err != nil && ctx.Err() == nil {
				churned <- err
				return
			}
		}
		churned <- nil
	}()
	for range 50 {
		recs, err := st.listHosts(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if len(recs) != hosts {
			t.Errorf("a listing under heartbeats found %d of %d hosts", len(recs), hosts)
		}
	}
	stop()
	if err := <-churned; err != nil {
		t.Fatal(err)
	}
}

// TestOpenStoreConcurrently opens the store of two brokers at once on a three-node cluster,
// each connected to a different node, as two brokers starting together do: both must open
// it, though nats-server may answer neither of two concurrent creations of one clustered
// stream.
func TestOpenStoreConcurrently(t *testing.T) {
	c := natstest.StartCluster(t, 3, natstest.Options{})
	errs := make(chan error, 2)
	for i := range 2 {
		js, err := jetstream.New(c.Nodes[i].Connect(t))
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			_, err := openStore(t.Context(), js, storeConfig{replicas: 3, hostTTL: time.Minute, eventsRetention: time.Hour, auditRetention: time.Hour})
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Errorf("opening the store: %v", err)
		}
	}
}
