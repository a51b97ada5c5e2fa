# The two commands a new user types: `make run` and `make test`.
# Each creates .venv when missing. torch==2.13.0 is installed first and exactly: on these
# machines it is a cached CPU build, any other version pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup run local-swarm-args train-tiny test lint typecheck check bench clean clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev,triton]'
	@touch $(STAMP)

# The main job: tokenize the bundled corpus (once), then start a full node (configs/node.yaml):
# swarm training with a live dashboard and annotation tasks from model samples at
# http://127.0.0.1:8080 (admin password in runs/nodes/node-1/admin-password). Ctrl+C stops it
# cleanly within ~2 s (checkpoint, store flushed); `make run` again resumes. `make run NODES=4`
# starts a local swarm of four (node 1 full on :8080, the others training; `NODES=` with no
# count means 4) and stops it on Ctrl+C. Four is the smallest swarm that survives a crashed
# or faulty member (f = (n - 1) // 3): with NODES=2 or 3 one crash stops every round, and
# the script and the nodes warn.
RUN_DATA := runs/data/kjv
NODES ?= 1
LOCAL_SWARM_NODES := $(if $(strip $(NODES)),$(strip $(NODES)),4)
LOCAL_SWARM := TESTNET_DIR=runs/local-swarm TESTNET_P2P_BASE=7777 TESTNET_WEB_BASE=8080
# A local swarm shares this machine's cores: each node gets cores / NODES torch threads (more
# threads than cores made every step several times slower), and rounds of 10 inner steps with
# 5 evaluation batches, so the first round is decided within a minute on 2 cores (50 steps
# and 20 batches per node took ~4 minutes with 3 nodes). The node config's other run keys
# (rounds, checkpoint_every) stay: each --set replaces one key.
LOCAL_SWARM_THREADS = $$(( $$(nproc) / $(LOCAL_SWARM_NODES) > 0 ? $$(nproc) / $(LOCAL_SWARM_NODES) : 1 ))
LOCAL_SWARM_SET := --set run.swarm.expect_peers=$(LOCAL_SWARM_NODES) --set run.swarm.inner_steps=10 --set run.train.eval_batches=5
LOCAL_SWARM_NODE_ARGS := --config configs/node.yaml $(LOCAL_SWARM_SET) --set max_cpu_threads=$(LOCAL_SWARM_THREADS)
run: $(STAMP)
	@test -f $(RUN_DATA)/meta.json || $(VENV)/bin/swarmlm data prepare \
		--input data/kjv.txt.gz --out $(RUN_DATA) --vocab-size 2048
	@if [ "$(LOCAL_SWARM_NODES)" = "1" ]; then \
		$(VENV)/bin/swarmlm node --config configs/node.yaml; \
	else \
		trap '$(LOCAL_SWARM) bash scripts/start_test_network.sh stop' EXIT; \
		trap 'exit 130' INT TERM; \
		$(LOCAL_SWARM) SWARMLM_NODE_ARGS="$(LOCAL_SWARM_NODE_ARGS)" \
			bash scripts/start_test_network.sh $(LOCAL_SWARM_NODES) && \
		echo "local swarm of $(LOCAL_SWARM_NODES) up: http://127.0.0.1:8080 (Ctrl+C stops it)" && \
		tail -n +1 -f runs/local-swarm/logs/node-1.log; \
	fi

# The node arguments `make run NODES=N` gives every node (scripts/first_round_time.sh reads
# them, so the measurement runs what `make run` runs).
local-swarm-args:
	@echo "$(LOCAL_SWARM_NODE_ARGS)"

# The single-process trainer (issue #3's main job), kept as its own target.
train-tiny: $(STAMP)
	@test -f $(RUN_DATA)/meta.json || $(VENV)/bin/swarmlm data prepare \
		--input data/kjv.txt.gz --out $(RUN_DATA) --vocab-size 2048
	$(VENV)/bin/swarmlm train --config configs/tiny.json --resume
	$(VENV)/bin/swarmlm generate --checkpoint runs/tiny \
		--prompt "In the beginning" --prompt "And the LORD said unto Moses" --top-k 40

# system-deps.sh installs Debian's postgresql and chromium when missing (root only); the
# store and browser tests use them and skip with a reason where they cannot be installed.
test: $(STAMP)
	bash scripts/system-deps.sh
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

bench: $(STAMP)
	$(PY) benchmarks/model_throughput.py --quick

clean-runs:
	rm -rf runs

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
