"""The robustness benchmark script still runs end to end against the real model (tiny run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "robustness.py"


def load_benchmark() -> ModuleType:
    """benchmarks/robustness.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("robustness_benchmark", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_robustness_benchmark_reports_its_headline_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_benchmark()
    argv = ["--quick", "--steps", "2", "--skip-speed", "--aggregators", "mean", "centered_clip"]
    argv += ["centered_clip_rep"]
    argv += ["--attacks", "alie", "large_constant", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        assert module.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the simulator's thread count
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert headline["cc_worst_attack"] in ("alie", "large_constant")
    assert headline["compression_factor"] > 50
    assert headline["cc_worst_attack_loss_ratio"] > 0
    assert headline["cc_reputation_worst_attack"] in ("alie", "large_constant")
    assert headline["cc_reputation_honest_exclusions"] == 0
    assert headline["honest_only_f3_loss_ratio"] > 0
    report = json.loads((tmp_path / "robustness_quick.json").read_text())
    # mean and centered_clip: clean + 2 attacks; the filtered row also runs f = 3 unattacked;
    # plus the compressed run and the honest-rows-only floor.
    assert len(report["runs"]) == 3 + 3 + 4 + 1 + 1
    assert "honest rows only" in report["markdown_table"]
    assert (tmp_path / "robustness_quick.png").stat().st_size > 0


def test_the_interleaved_split_deals_blocks_round_robin() -> None:
    module = load_benchmark()
    block = module.SPLIT_BLOCK
    contiguous = module.Simulator(module.SimConfig(steps=1))
    inter = module.Simulator(module.SimConfig(steps=1, split="interleaved"))
    text = torch.cat(contiguous.shards)  # the training text, in order
    assert len({len(s) for s in inter.shards}) == 1
    for w in (0, 3, 9):
        shard = inter.shards[w]
        # worker w holds blocks w, w + 10, w + 20, ...: pieces of the whole book
        assert torch.equal(shard[:block], text[w * block : (w + 1) * block])
        k = 100  # its 101st block comes from far into the text
        start = (k * 10 + w) * block
        assert torch.equal(shard[k * block : (k + 1) * block], text[start : start + block])
