"""benchmarks/_privacy_secagg.py's measurements mean what BENCHMARKS.md says (small sizes;
the training comparison is exercised by the benchmark itself, it takes minutes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "_privacy_secagg.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("privacy_secagg_benchmark", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_finds_the_exact_sum_and_the_dropout_threshold() -> None:
    bench = _load()
    assert bench.sum_exact(500) is True
    drops = bench.dropouts(64)
    # n = 8, t = 6: two peers may vanish at either point; a third abandons, never a wrong sum.
    assert drops["tolerated"] == 2
    assert drops["beyond_clean"] is True
    assert drops["outcomes"]["masked"][3] == "abandoned"


def test_secure_aggregation_bytes_approach_the_plain_payload_as_vectors_grow() -> None:
    bench = _load()
    small, large = bench.bytes_overhead(1_000), bench.bytes_overhead(100_000)
    assert small["ratio"] > large["ratio"] > 1.0
    assert large["ratio"] < 1.05
    assert large["plain_bytes"] == 4 * 100_000 * 8 * 7
