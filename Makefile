# Lethe's build. `make demo` runs a whole migration on one machine; `make test` runs the tests
# (it builds the cached Vault first). Every target works on a fresh machine with Go installed.

GO      ?= go
BIN     := bin
CMDS    := lethectl lethe-broker lethe-keybroker lethe-agent
# VERSION is stamped into every binary (--version, the startup log, lethe_build_info): by
# default the nearest tag of the checkout (with -N-gREV past it, -dirty if modified); with no
# tag, --version reports the Go module's version. The VCS revision is always recorded.
VERSION ?= $(shell git describe --tags --dirty 2>/dev/null)
GOBUILD  = $(GO) build $(if $(VERSION),-ldflags "-X github.com/lethe-cc/lethe/internal/version.Version=$(VERSION)")
# The default test run: every package, with the race detector off on 2 cores to keep CI short;
# `make test-race` runs the same under -race.
TESTFLAGS ?= -count=1 -timeout=30m

.PHONY: e2e-libvirt-linux all build agent-production test test-race bench lint vault demo demo-attest e2e evidence fuzz clean docs e2e-libvirt bench-libvirt libvirt-down e2e-cluster

all: build

build:
	@mkdir -p $(BIN)
	@for c in $(CMDS); do \
		if [ -d cmd/$$c ]; then echo "go build -o $(BIN)/$$c ./cmd/$$c"; $(GOBUILD) -o $(BIN)/$$c ./cmd/$$c || exit 1; fi; \
	done

# agent-production builds the agent as it runs inside a host's TEE: with the build tag
# lethe_noemulation, so that the attestation emulator (attest/emulate) is not linked at all and
# the agent attests with SEV-SNP or TDX hardware only. `build` keeps the emulator, which the
# demo, the tests and CI need.
agent-production:
	@mkdir -p $(BIN)/production
	$(GOBUILD) -tags lethe_noemulation -o $(BIN)/production/lethe-agent ./cmd/lethe-agent
	$(BIN)/production/lethe-agent --version

# vault builds a real Vault once into a per-user cache and links it as bin/vault.
vault:
	@bash scripts/vault.sh

# test runs every package's tests, then the end-to-end suite with its table.
test: vault
	$(GO) test $(TESTFLAGS) $$($(GO) list ./... | grep -v '/e2e$$')
	@$(MAKE) --no-print-directory e2e

test-race: vault
	$(GO) test -race $(TESTFLAGS) ./...

# e2e runs the end-to-end, fault and adversarial suite on real NATS, Vault and daemon
# processes, and prints its table (the data-plane capture needs root / CAP_NET_RAW).
E2E_TESTFLAGS ?= -count=1 -timeout=20m
e2e: vault
	$(GO) test $(E2E_TESTFLAGS) -v -run 'TestE2E|TestCaptureScan' ./e2e/

# e2e-cluster runs migrations through the faults of a cluster — NATS leaders killed, a node
# partitioned, quorum lost, a broker, a keybroker and the Vault leader killed — on three
# nats-server processes (built once from the module go.mod requires), a three-node Vault HA
# cluster, two brokers and two keybrokers.
E2E_CLUSTER_TESTFLAGS ?= -count=1 -timeout=15m
e2e-cluster: vault
	$(GO) test $(E2E_CLUSTER_TESTFLAGS) -v -run 'TestCluster' ./e2e/

# evidence runs `lethectl attest verify` over the real evidence corpus (SEV-SNP reports and TDX
# quotes captured on hardware, kept outside the repository in LETHE_EVIDENCE_DIR, by default
# ../shared/evidence) and checks every case's verdict. Without the corpus it says so, and fails
# only in CI (CI=true).
LETHE_EVIDENCE_DIR ?= $(abspath $(CURDIR)/../shared/evidence)
evidence:
	@if [ ! -f "$(LETHE_EVIDENCE_DIR)/SOURCES.md" ]; then \
		echo "evidence: no evidence corpus at $(LETHE_EVIDENCE_DIR) (set LETHE_EVIDENCE_DIR)"; \
		if [ "$$CI" = true ]; then exit 1; fi; \
	else \
		echo "LETHE_EVIDENCE=1 LETHE_EVIDENCE_DIR=$(LETHE_EVIDENCE_DIR) $(GO) test -count=1 -v -run '^TestEvidenceCorpus$$' ./cmd/lethectl/"; \
		LETHE_EVIDENCE=1 LETHE_EVIDENCE_DIR=$(LETHE_EVIDENCE_DIR) $(GO) test -count=1 -v -run '^TestEvidenceCorpus$$' ./cmd/lethectl/; \
	fi

# bench runs every benchmark against its baseline in one run and writes BENCHMARKS.md.
bench: vault
	@bash scripts/bench.sh

lint:
	$(GO) vet ./...
	$(GO) vet -tags libvirt ./e2e/ ./migagent/libvirt/...
	$(GO) tool staticcheck ./...
	$(GO) tool staticcheck -tags libvirt ./e2e/ ./migagent/libvirt/...

# fuzz runs each fuzz target for a short while beyond its seed corpus (which `make test` runs).
FUZZTIME ?= 20s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

# demo runs a whole migration on this machine (see scripts/demo.sh); demo-attest shows
# attestation and policy alone.
demo: build vault
	@bash scripts/demo.sh

demo-attest: build
	@bash scripts/demo-attest.sh

# dev-up starts a development stack that stays up (Vault, the broker with NATS, the keybroker,
# three agents, the tenant demo) on free ports, in .dev/ (LETHE_DEV_DIR), and prints the
# exports that point lethectl at it; dev-down stops it; dev-clean also removes its state.
.PHONY: dev-up dev-down dev-clean
dev-up: build vault
	@bash scripts/dev.sh up

dev-down:
	@bash scripts/dev.sh down

dev-clean:
	@bash scripts/dev.sh clean

clean:
	rm -rf $(BIN)

# e2e-libvirt starts two libvirt hosts in network and mount namespaces (installing libvirt and
# QEMU with apt-get on first use; needs root) and runs the live-migration tests against them:
# memtest86+ and a 1 GiB Linux guest (Debian's kernel, init built from e2e/guestload by the
# tests) that checks every page it wrote.
LIBVIRT_TESTFLAGS ?= -count=1 -timeout=20m
e2e-libvirt: vault
	bash scripts/libvirt-hosts.sh up
	$(GO) test -tags libvirt $(LIBVIRT_TESTFLAGS) -run 'Libvirt' ./e2e/ ./migagent/libvirt/...

# e2e-libvirt-linux runs only the Linux guest's migrations (direct, relayed and through
# Lethe), LETHE_LIBVIRT_ROUNDS times there and back.
e2e-libvirt-linux: vault
	bash scripts/libvirt-hosts.sh up
	$(GO) test -tags libvirt $(LIBVIRT_TESTFLAGS) -run 'Libvirt.*LinuxMigration' ./e2e/

bench-libvirt: vault
	bash scripts/libvirt-hosts.sh up
	$(GO) test -tags libvirt -run '^$$' -bench 'Libvirt(Linux)?Migration' -benchtime 3x -timeout 60m ./e2e/

libvirt-down:
	bash scripts/libvirt-hosts.sh down

# docs regenerates the configuration reference and the example NATS server config.
docs:
	$(GO) test ./cmd/lethe-broker ./cmd/lethe-keybroker ./cmd/lethe-agent -run 'TestConfigurationReference|TestNATSServerConfigExample' -update

# --- Releases and installation ---------------------------------------------------------------
# release builds the release into DIST for each platform of PLATFORMS: reproducible archives,
# SBOMs, the daemons' OCI images, SHA256SUMS and its signature (see scripts/release.sh; sign
# with LETHE_RELEASE_KEY). install copies the binaries, systemd units, documentation, shell
# completions and man pages under DESTDIR$(PREFIX), as packagers expect.
DIST      ?= dist
PLATFORMS ?= linux/amd64 linux/arm64
PREFIX    ?= /usr/local
DESTDIR   ?=
SYSTEMDDIR ?= $(PREFIX)/lib/systemd/system
DAEMONS   := lethe-broker lethe-keybroker lethe-agent

.PHONY: release install completions man

release:
	@DIST="$(DIST)" PLATFORMS="$(PLATFORMS)" VERSION="$(VERSION)" GO="$(GO)" bash scripts/release.sh

completions: build
	@mkdir -p $(BIN)/completions
	$(BIN)/lethectl completion bash > $(BIN)/completions/lethectl.bash
	$(BIN)/lethectl completion zsh > $(BIN)/completions/_lethectl
	$(BIN)/lethectl completion fish > $(BIN)/completions/lethectl.fish

# man writes lethectl's pages (section 1, one per command) and the daemons' (section 8, their
# --help as it stands).
man: build
	@rm -rf $(BIN)/man && mkdir -p $(BIN)/man
	$(BIN)/lethectl man $(BIN)/man
	@for d in $(DAEMONS); do \
		echo "$(BIN)/$$d --help > $(BIN)/man/$$d.8"; \
		{ printf '.TH "%s" 8 "" "Lethe" "Lethe Manual"\n.SH NAME\n%s \\- a daemon of Lethe\n.SH SYNOPSIS\n.nf\n' \
			"$$(echo $$d | tr a-z A-Z)" "$$d"; \
		  $(BIN)/$$d --help 2>&1 | sed 's/\\/\\e/g; s/^[.'"'"']/\\\&&/'; \
		  printf '.fi\n.SH SEE ALSO\n\\fBlethectl\\fP(1)\n'; } > $(BIN)/man/$$d.8 || exit 1; \
	done

install: build completions man
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SYSTEMDDIR) $(DESTDIR)$(PREFIX)/share/doc/lethe \
		$(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man8 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	install -m 0755 $(addprefix $(BIN)/,$(CMDS)) $(DESTDIR)$(PREFIX)/bin/
	@for d in $(DAEMONS); do \
		echo "install $$d.service"; \
		sed 's#/usr/local/bin/#$(PREFIX)/bin/#g; s#/usr/share/doc/lethe/#$(PREFIX)/share/doc/lethe/#g' \
			deploy/systemd/$$d.service > $(DESTDIR)$(SYSTEMDDIR)/$$d.service || exit 1; \
		chmod 0644 $(DESTDIR)$(SYSTEMDDIR)/$$d.service; \
	done
	install -m 0644 README.md docs/*.md deploy/*.yaml deploy/nats-server.conf $(DESTDIR)$(PREFIX)/share/doc/lethe/
	install -m 0644 $(BIN)/man/*.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 0644 $(BIN)/man/*.8 $(DESTDIR)$(PREFIX)/share/man/man8/
	install -m 0644 $(BIN)/completions/lethectl.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/lethectl
	install -m 0644 $(BIN)/completions/_lethectl $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_lethectl
	install -m 0644 $(BIN)/completions/lethectl.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/lethectl.fish
