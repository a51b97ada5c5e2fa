#!/usr/bin/env bash
# Benchmark-only environment for the hivemind reference of benchmarks/swarm.py (column g).
#
# hivemind is never a dependency of swarmlm: it lives in its own virtualenv (default
# benchmarks/results/hivemind-venv, inside the git-ignored results folder). torch is pinned to 2.13.0 first (the cached CPU build;
# any other version pulls gigabytes of CUDA packages), then hivemind 1.1.12 with numpy<2.4
# (its Uniform8BitQuantization returns wrong averages with numpy 2.4, see KNOWN.md).
# Idempotent: a stamp file records a finished install.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/benchmarks/results/hivemind-venv}"
python="${PYTHON:-python3}"
stamp="$venv/.installed-hivemind-1.1.12"
if [[ -f "$stamp" ]]; then
    echo "$venv: hivemind 1.1.12 already installed"
    exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.13.0
"$venv/bin/python" -m pip install --quiet 'hivemind==1.1.12' 'numpy<2.4'
# swarmlm itself is imported from src/ through PYTHONPATH; these are its import-time needs
# for the model and the data loader (no torch upgrade: torch is already satisfied).
"$venv/bin/python" -m pip install --quiet pydantic tokenizers safetensors rich pyyaml zstandard msgpack
"$venv/bin/python" - <<'PY'
import hivemind, numpy, torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("hivemind", hivemind.__version__, "torch", torch.__version__, "numpy", numpy.__version__)
PY
touch "$stamp"
