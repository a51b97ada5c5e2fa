# The two commands a new user types: `make run` and `make test`.
# Each creates .venv when missing. torch==2.13.0 is installed first and exactly: on these
# machines it is a cached CPU build, any other version pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup run test lint typecheck check bench clean clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev,triton]'
	@touch $(STAMP)

# The main job: tokenize the bundled corpus (once), train configs/tiny.json with a live
# progress bar (resuming if a run exists), then print samples from the trained model.
RUN_DATA := runs/data/kjv
run: $(STAMP)
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
