package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/broker/brokertest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/agentapi/agentapitest"
)

// fleet is a NATS server with a broker, a fake keybroker and fake agents, which lethectl
// reaches with --nats-url as an operator.
type fleet struct {
	t      *testing.T
	srv    *natstest.Server
	kb     *brokertest.KeyBroker
	agents map[string]*agentapitest.Agent
}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	for _, k := range []string{"LETHECTL_CONFIG", "LETHE_TENANT", "LETHE_NATS_URL", "LETHE_NATS_CREDS", "LETHE_NATS_USER", "LETHE_NATS_PASSWORD"} {
		t.Setenv(k, "")
	}
	f := &fleet{t: t, srv: natstest.Start(t, natstest.Options{}), kb: &brokertest.KeyBroker{}, agents: map[string]*agentapitest.Agent{}}
	b, err := broker.New(broker.Config{
		Conn: f.connect(natsauth.RoleBroker, ""), KeyBroker: f.kb,
		CheckInterval: 20 * time.Millisecond, HostTTL: time.Hour, AgentTimeout: 5 * time.Second,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("broker: %v", err)
		}
	})
	select {
	case <-b.Ready():
	case err := <-done:
		done <- err // for the cleanup, which waits for it
		t.Fatalf("broker stopped before ready: %v", err)
	}
	return f
}

func (f *fleet) connect(role natsauth.Role, name string) *nats.Conn {
	return f.srv.Connect(f.t, nats.CustomInboxPrefix(natsauth.InboxPrefix(role, name)))
}

// addHost starts a fake agent serving host, with 4 GiB allocatable and an SEV-SNP TCB of
// microcode ucode, running guests of tenant acme (adopted) of 1 MiB each.
func (f *fleet) addHost(host string, ucode uint8, vms ...string) *agentapitest.Agent {
	f.t.Helper()
	a := agentapitest.New(host, attest.PlatformEmulatedSEVSNP)
	nc := f.connect(natsauth.RoleAgent, host)
	ctx, cancel := context.WithCancel(context.Background())
	stop, err := agentapi.Start(ctx, nc, host, a)
	if err != nil {
		cancel()
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { cancel(); stop() })
	var guests []agentapi.HostGuest
	for _, vm := range vms {
		guests = append(guests, agentapi.HostGuest{Tenant: "acme", VM: vm, MemoryBytes: 1 << 20})
	}
	rec := a.Record("eu", nil, guests...)
	rec.AllocatableBytes, rec.MemoryBytes = 4<<30, 8<<30
	rec.TCB = &attest.HostTCB{SNP: &attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: ucode}}
	if err := agentapi.PutHost(context.Background(), nc, &rec); err != nil {
		f.t.Fatal(err)
	}
	tc := broker.NewTenantClient(f.connect(natsauth.RoleTenant, "acme"), "acme")
	if _, err := tc.ApplyPolicy(f.t.Context(), &broker.ApplyPolicyRequest{Envelope: []byte(`{"fake":"policy"}`)}); err != nil {
		f.t.Fatal(err)
	}
	for _, vm := range vms {
		if _, err := tc.AdoptGuest(f.t.Context(), &broker.AdoptGuestRequest{VM: vm, Host: host}); err != nil {
			f.t.Fatalf("adopting %s: %v", vm, err)
		}
	}
	f.agents[host] = a
	return a
}

// run runs lethectl against the fleet's NATS server.
func (f *fleet) run(args ...string) (stdout, stderr string, code int) {
	f.t.Helper()
	return runLethectl(f.t, append(args, "--nats-url", f.srv.URL)...)
}

func TestHostsCordonUncordonAndList(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web")
	f.addHost("h2", 120)

	out, errOut, code := f.run("hosts", "cordon", "h2", "--reason", "firmware update")
	if code != 0 || !strings.HasPrefix(out, "h2: cordoned (firmware update) by operator since ") {
		t.Fatalf("cordon: exit %d, %q %q", code, out, errOut)
	}
	out, _, code = f.run("hosts", "list")
	if code != 0 {
		t.Fatalf("hosts list: exit %d", code)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if got, want := strings.Fields(lines[0]), []string{"HOST", "PLATFORM", "REGION", "LIVE", "STATE", "GUESTS", "ALLOCATABLE", "COMMITTED", "TCB", "IN/OUT", "LABELS"}; !cmp.Equal(got, want) {
		t.Errorf("header %v, want %v", got, want)
	}
	for _, want := range []string{
		"h1    emulated-sev-snp  eu      true  schedulable  1       4.0 GiB      1.0 MiB (0%)  bl=3,tee=0,snp=8,ucode=115  0/0     -",
		"h2    emulated-sev-snp  eu      true  cordoned     0       4.0 GiB      0 B (0%)      bl=3,tee=0,snp=8,ucode=120  0/0     -",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("hosts list lacks %q:\n%s", want, out)
		}
	}
	out, _, _ = f.run("hosts", "list", "-o", "wide")
	if !strings.Contains(out, "REASON") || !strings.Contains(out, "operator  firmware update") {
		t.Errorf("hosts list -o wide lacks who cordoned h2 and why:\n%s", out)
	}
	out, _, _ = f.run("hosts", "list", "-o", "json")
	var list broker.ListHostsResponse
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatal(err)
	}
	if st := list.Hosts[1].StateRecord; st == nil || st.Reason != "firmware update" {
		t.Errorf("hosts list -o json: h2's state record %+v, want the reason", st)
	}

	// A tenant sees states, not memory nor reasons; and may not cordon.
	out, _, _ = f.run("hosts", "list", "--tenant", "acme")
	if !strings.Contains(out, "h2    emulated-sev-snp  eu      true  cordoned     0       -            -          ") {
		t.Errorf("hosts list as a tenant:\n%s", out)
	}
	_, errOut, code = f.run("hosts", "cordon", "h1", "--tenant", "acme", "--timeout", "300ms")
	if code == 0 || !strings.Contains(errOut, "lethectl hosts cordon needs operator credentials") || !strings.Contains(errOut, "tenant acme") {
		t.Errorf("a tenant cordoning: exit %d, %q; want a message that operators only may", code, errOut)
	}

	out, errOut, code = f.run("hosts", "uncordon", "h2")
	if code != 0 || !strings.HasPrefix(out, "h2: schedulable by operator") {
		t.Errorf("uncordon: exit %d, %q %q", code, out, errOut)
	}
}

func TestHostsDrainDryRun(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web", "db")
	f.addHost("h2", 120)
	out, errOut, code := f.run("hosts", "drain", "h1", "--dry-run")
	if code != 0 {
		t.Fatalf("drain --dry-run: exit %d, %s", code, errOut)
	}
	for _, want := range []string{"drain of h1 would move 2 guests (2.0 MiB)", "acme/db    h1 → ", "acme/web   h1 → ", "waiting"} {
		if !strings.Contains(out, want) {
			t.Errorf("drain --dry-run lacks %q:\n%s", want, out)
		}
	}
	out, _, _ = f.run("hosts", "list")
	if !strings.Contains(out, "h1    emulated-sev-snp  eu      true  schedulable") {
		t.Errorf("a dry run changed h1's state:\n%s", out)
	}
}

// TestHostsDrainWait drains a host to the end, then reads the operation back as JSON.
func TestHostsDrainWait(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web", "db").AutoCommit = true
	f.addHost("h2", 120)
	out, errOut, code := f.run("hosts", "drain", "h1", "--reason", "kernel update", "--max-parallel", "1", "--wait")
	if code != 0 {
		t.Fatalf("drain --wait: exit %d\n%s%s", code, out, errOut)
	}
	for _, want := range []string{": drain of h1 done: 2 moved, 0 failed, 0 stuck, 0 skipped of 2 guests",
		"TENANT/VM  FROM → TO  STATUS  OUTCOME  MIGRATION", "acme/db    h1 → h2    moved   erased   mig-", "receipts: lethectl receipt get <migration-id>"} {
		if !strings.Contains(out, want) {
			t.Errorf("drain --wait lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(errOut, "started") || !strings.Contains(errOut, "done: 2/2 done, 0 in flight") || strings.ContainsAny(errOut, "\r\033") {
		t.Errorf("progress in a pipe:\n%s", errOut)
	}

	out, _, _ = f.run("fleet", "list", "-o", "json")
	var list broker.ListFleetOpsResponse
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list.Operations) != 1 {
		t.Fatalf("fleet list -o json: %v, %s", err, out)
	}
	out, _, code = f.run("fleet", "get", list.Operations[0].ID, "-o", "json")
	var v broker.FleetOpView
	if err := json.Unmarshal([]byte(out), &v); err != nil || code != 0 {
		t.Fatalf("fleet get -o json: exit %d, %v\n%s", code, err, out)
	}
	if v.State != broker.FleetDone || v.Kind != broker.FleetDrain || v.Reason != "kernel update" || v.Counts.Moved != 2 || v.Counts.BytesMoved != 2<<20 {
		t.Errorf("fleet get: %s %s %q %+v", v.State, v.Kind, v.Reason, v.Counts)
	}
	out, _, _ = f.run("hosts", "list", "-o", "wide")
	if !strings.Contains(out, "maintenance") {
		t.Errorf("h1 after its drain:\n%s", out)
	}
}

// TestHostsDrainWaitStuckExitsOne: a guest no host admits ends the wait with status 1 and
// its reason.
func TestHostsDrainWaitStuckExitsOne(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web").AutoCommit = true
	f.addHost("h2", 120)
	if _, errOut, code := f.run("hosts", "cordon", "h2", "--reason", "full"); code != 0 {
		t.Fatal(errOut)
	}
	out, errOut, code := f.run("hosts", "drain", "h1", "--wait")
	if code != exitNotAllMoved {
		t.Fatalf("drain --wait with a stuck guest: exit %d, want %d\n%s%s", code, exitNotAllMoved, out, errOut)
	}
	if !strings.Contains(out, "0 moved, 0 failed, 1 stuck") || !strings.Contains(out, "h2: cordoned by operator: full") {
		t.Errorf("drain --wait lacks the stuck guest and why:\n%s", out)
	}
	if strings.Contains(out, "receipts:") {
		t.Errorf("a receipt hint with no migration:\n%s", out)
	}
}

func TestHostsEvacuateTCBParseError(t *testing.T) {
	for name, tcb := range map[string]string{
		"snp":  "bl=3,tee=x,snp=8,ucode=115",
		"tdx":  "0b0b03",
		"junk": "latest",
	} {
		t.Run(name, func(t *testing.T) {
			_, errOut, code := runLethectl(t, "hosts", "evacuate", "--below-tcb", tcb, "--nats-url", "nats://127.0.0.1:1")
			if code != 1 || !strings.HasPrefix(errOut, "--below-tcb: ") {
				t.Errorf("evacuate --below-tcb %s: exit %d, %q; want a parse error naming the flag", tcb, code, errOut)
			}
		})
	}
	_, errOut, _ := runLethectl(t, "hosts", "evacuate", "--below-tcb", "latest")
	if !strings.Contains(errOut, "bl=N,tee=N,snp=N,ucode=N") || !strings.Contains(errOut, "32 hex digits") {
		t.Errorf("the parse error does not show the two forms: %q", errOut)
	}
}

func TestPrintPlanRebalance(t *testing.T) {
	var b bytes.Buffer
	printPlan(&b, &broker.FleetOpResponse{
		Operation: &broker.FleetOpView{
			FleetOp: broker.FleetOp{Kind: broker.FleetRebalance, Items: []broker.FleetItem{
				{Tenant: "acme", VM: "web", From: "h1", To: "h3", MemoryBytes: 1 << 30, Status: broker.ItemWaiting},
			}},
			Counts: broker.FleetCounts{Total: 1, Waiting: 1, BytesTotal: 1 << 30},
		},
		Plan: &broker.FleetPlan{
			Hosts: []broker.PlanHost{
				{Host: "h1", AllocatableBytes: 4 << 30, CommittedBefore: 7 << 29, CommittedAfter: 5 << 29},
				{Host: "h3", TCB: &attest.HostTCB{SNP: &attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 120}}, AllocatableBytes: 4 << 30, CommittedBefore: 1 << 30, CommittedAfter: 2 << 30},
			},
			Notes: []string{"host h4 reports no allocatable memory: left out"},
		},
	})
	want := `rebalance would move 1 guest (1.0 GiB)
HOST  TCB                         ALLOCATABLE  COMMITTED BEFORE → AFTER
h1    -                           4.0 GiB      3.5 GiB (88%) → 2.5 GiB (62%)
h3    bl=3,tee=0,snp=8,ucode=120  4.0 GiB      1.0 GiB (25%) → 2.0 GiB (50%)
TENANT/VM  FROM → TO  MEMORY   STATUS   REASON
acme/web   h1 → h3    1.0 GiB  waiting  
note: host h4 reports no allocatable memory: left out
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("plan (-want +got):\n%s", diff)
	}
}

// TestFleetInterruptedSaysTheOperationGoesOn: Ctrl-C while following an operation says how
// to follow or abort it, and ends with 130.
func TestFleetInterruptedSaysTheOperationGoesOn(t *testing.T) {
	var b bytes.Buffer
	err := fleetInterrupted(&b, "op-1", &broker.FleetOpView{FleetOp: broker.FleetOp{ID: "op-1", State: broker.FleetRunning}, Counts: broker.FleetCounts{Total: 4, Moved: 1}})
	if ee, ok := errors.AsType[*exitError](err); !ok || ee.code != 130 {
		t.Fatalf("fleetInterrupted = %v, want exit 130", err)
	}
	for _, want := range []string{"fleet operation op-1 goes on (running, 1 of 4 guests moved)", "lethectl fleet watch op-1", "lethectl fleet abort op-1"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("interrupted message %q lacks %q", b.String(), want)
		}
	}
}

func TestFleetProgressLine(t *testing.T) {
	v := &broker.FleetOpView{
		FleetOp: broker.FleetOp{ID: "op-1", State: broker.FleetRunning},
		Counts:  broker.FleetCounts{Total: 6, Moved: 2, Migrating: 2, Waiting: 1, Stuck: 1, BytesMoved: 2 << 30, BytesTotal: 6 << 30},
		ETA:     4200 * time.Millisecond,
	}
	want := "op-1 running: 2/6 done, 2 in flight, 1 waiting, 0 failed, 1 stuck, 0 skipped; 2.0 GiB of 6.0 GiB moved; ETA 4s"
	if got := fleetProgressLine(v); got != want {
		t.Errorf("progress line\n%q\nwant\n%q", got, want)
	}
	before := fleetProgressKey(v)
	v.ETA = time.Second
	if fleetProgressKey(v) != before {
		t.Error("a new ETA alone makes a new plain line")
	}
	v.Counts.Moved++
	if fleetProgressKey(v) == before {
		t.Error("a guest moved makes no new plain line")
	}
}
