"""precision: auto picks bf16 only where the hardware has it, and bf16 training still learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmlm.train import RunConfig
from swarmlm.train import precision as precision_mod
from swarmlm.train.precision import Precision, PrecisionError, resolve_precision
from swarmlm.train.trainer import Trainer
from tests.train.conftest import tiny_run_config


def test_auto_is_the_default_and_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig.model_validate({"data": {"path": "x"}})
    assert cfg.train.precision == "auto"
    cpu = torch.device("cpu")
    precision_mod.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(precision_mod, "_cpuinfo_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve_precision("auto", cpu) == ("bf16" if _onednn_bf16() else "fp32")
    precision_mod.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(precision_mod, "_cpuinfo_flags", lambda: {"avx512f", "avx2"})
    assert resolve_precision("auto", cpu) == "fp32"
    assert Precision("auto", cpu).mode == "fp32"
    # An explicit choice is kept whatever the hardware says.
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    precision_mod.cpu_has_native_bf16.cache_clear()
    with pytest.raises(PrecisionError, match="fp8"):
        resolve_precision("fp8", cpu)


def _onednn_bf16() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return probe is None or bool(probe())


def test_bf16_training_reaches_the_fp32_validation_loss(
    prepared_data: Path, tmp_path: Path
) -> None:
    """Same seed, data and steps: bf16 autocast ends within 2 % of the fp32 validation loss
    (the KJV bits/byte comparison at full scale is in BENCHMARKS.md)."""
    losses = {}
    for mode in ("fp32", "bf16"):
        cfg = tiny_run_config(prepared_data, tmp_path / mode, max_steps=30, precision=mode)
        trainer = Trainer(RunConfig.model_validate(cfg), show_progress=False)
        assert trainer.precision.mode == mode
        before = trainer.evaluate().loss
        result = trainer.fit()
        assert result.last_eval is not None
        assert result.last_eval.loss < before - 0.5
        losses[mode] = result.last_eval.loss
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.02


def test_moe_trains_under_bf16_autocast(prepared_data: Path, tmp_path: Path) -> None:
    """The expert outputs (bf16 under autocast) are combined without a dtype clash."""
    cfg = tiny_run_config(prepared_data, tmp_path / "moe", max_steps=8, precision="bf16")
    cfg["model"] = {**cfg["model"], "n_experts": 4, "top_k": 2}  # type: ignore[dict-item]
    result = Trainer(RunConfig.model_validate(cfg), show_progress=False).fit()
    assert result.losses[-1] < result.losses[0]
