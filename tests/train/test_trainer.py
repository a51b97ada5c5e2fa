"""The trainer end to end on a small real corpus: learning, exact resume, failure handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from swarmlm.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from swarmlm.train.config import RunConfig
from swarmlm.train.metrics import read_metrics
from swarmlm.train.trainer import (
    EvaluationInterruptedError,
    Trainer,
    TrainingDivergedError,
    load_model,
)
from tests.train.conftest import tiny_run_config


def make(data: Path, out: Path, **train: object) -> Trainer:
    return Trainer(
        RunConfig.model_validate(tiny_run_config(data, out, **train)), show_progress=False
    )


def test_training_lowers_validation_loss_and_writes_metrics(
    prepared_data: Path, tmp_path: Path
) -> None:
    before = make(prepared_data, tmp_path / "a", max_steps=1).evaluate()
    trainer = make(prepared_data, tmp_path / "b", max_steps=40)
    result = trainer.fit()
    assert result.step == 40
    assert result.last_eval is not None
    assert result.last_eval.loss < before.loss - 0.5
    assert result.last_eval.bits_per_byte == pytest.approx(
        result.last_eval.loss
        * trainer.val_shards.info.loss_tokens
        / trainer.val_shards.info.bytes
        / math.log(2)
    )
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 41))
    assert any(r["kind"] == "eval" for r in records)
    assert latest_checkpoint(tmp_path / "b") is not None


def test_resume_continues_exactly(prepared_data: Path, tmp_path: Path) -> None:
    straight = make(prepared_data, tmp_path / "straight", max_steps=20).fit().losses
    first = make(prepared_data, tmp_path / "split", max_steps=20).fit(until_step=10).losses
    resumed = make(prepared_data, tmp_path / "split", max_steps=20).fit(resume=True).losses
    assert len(first) == 10
    assert len(resumed) == 10
    assert first + resumed == straight  # bitwise: same data, weights, optimizer and RNG


def test_resume_with_dropout_and_accumulation_continues_exactly(
    prepared_data: Path, tmp_path: Path
) -> None:
    def run(out: Path, until: int | None = None, resume: bool = False) -> list[float]:
        cfg = tiny_run_config(prepared_data, out, max_steps=12, grad_accum=2)
        cfg["model"]["resid_dropout"] = 0.1  # type: ignore[index]
        trainer = Trainer(RunConfig.model_validate(cfg), show_progress=False)
        return trainer.fit(resume=resume, until_step=until).losses

    straight = run(tmp_path / "s")
    assert run(tmp_path / "p", until=6) + run(tmp_path / "p", resume=True) == straight


def test_a_new_run_refuses_a_directory_with_checkpoints(
    prepared_data: Path, tmp_path: Path
) -> None:
    make(prepared_data, tmp_path / "r", max_steps=2).fit()
    with pytest.raises(CheckpointError, match="--resume"):
        make(prepared_data, tmp_path / "r", max_steps=4).fit()


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    prepared_data: Path, tmp_path: Path
) -> None:
    trainer = make(prepared_data, tmp_path / "n", max_steps=10, checkpoint_every=3)
    original = trainer.train_step
    calls = {"n": 0}

    def poisoned() -> tuple[float, float]:
        calls["n"] += 1
        if calls["n"] == 5:
            with torch.no_grad():
                trainer.model_core.embed.weight.fill_(float("nan"))
        return original()

    trainer.train_step = poisoned  # type: ignore[method-assign]
    with pytest.raises(TrainingDivergedError, match="step 4") as info:
        trainer.fit()
    assert "step-00000003" in str(info.value)
    good = load_checkpoint(tmp_path / "n")
    assert good.step == 3
    assert all(torch.isfinite(t).all() for t in good.model_state.values())


def test_a_failing_disk_does_not_stop_training_or_lose_the_good_checkpoint(
    prepared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarmlm.train import checkpoint as ckpt_mod

    trainer = make(prepared_data, tmp_path / "d", max_steps=4, checkpoint_every=2)
    real_save = ckpt_mod.torch.save
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        real_save(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ckpt_mod.torch, "save", flaky)
    result = trainer.fit()
    assert result.step == 4
    assert load_checkpoint(tmp_path / "d").step == 2


@pytest.mark.parametrize(
    "overrides",
    [
        {"precision": "bf16"},
        {"qat_int8": True},
        {"curriculum": [{"until_step": 3, "seq_len": 16}]},
        {"async_checkpoint": True, "checkpoint_every": 2},
    ],
)
def test_training_options_run_and_learn(
    prepared_data: Path, tmp_path: Path, overrides: dict[str, object]
) -> None:
    result = make(prepared_data, tmp_path / "o", max_steps=6, **overrides).fit()
    assert result.step == 6
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]
    assert load_checkpoint(tmp_path / "o").step == 6


def test_sam_and_moe_train(prepared_data: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(prepared_data, tmp_path / "sam", max_steps=6)
    cfg["optim"] = {"name": "sam", "lr": 0.003, "sam_rho": 0.05}
    cfg["model"].update({"n_experts": 4, "top_k": 2})  # type: ignore[union-attr]
    result = Trainer(RunConfig.model_validate(cfg), show_progress=False).fit()
    assert result.losses[-1] < result.losses[0]


def test_checkpoints_load_for_generation_and_export(prepared_data: Path, tmp_path: Path) -> None:
    from swarmlm.model.hf import load_swarmlm_weights

    make(prepared_data, tmp_path / "g", max_steps=3).fit()
    model, cfg = load_model(tmp_path / "g")
    assert cfg.model.d_model == 64
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)
    path = latest_checkpoint(tmp_path / "g")
    assert path is not None
    hf_cfg, state = load_swarmlm_weights(path)
    assert hf_cfg == cfg.model
    assert json.loads((path / "config.json").read_text())["d_model"] == 64
    assert set(state) >= {"embed.weight"}


def test_out_of_memory_splits_the_micro_batch_and_keeps_the_same_gradients(
    prepared_data: Path, tmp_path: Path
) -> None:
    reference = make(prepared_data, tmp_path / "ref", max_steps=3)
    expected = reference.fit().losses
    trainer = make(prepared_data, tmp_path / "oom", max_steps=3)
    real_forward = trainer.model.forward
    calls = {"n": 0}

    def forward_that_runs_out_of_memory_once(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    trainer.model.forward = forward_that_runs_out_of_memory_once  # type: ignore[method-assign]
    losses = trainer.fit().losses
    assert trainer.micro_splits == 2
    assert losses == pytest.approx(expected, abs=1e-5)


def test_out_of_memory_is_raised_when_adaptive_batch_is_off(
    prepared_data: Path, tmp_path: Path
) -> None:
    trainer = make(prepared_data, tmp_path / "off", max_steps=2, adaptive_batch=False)

    def oom(*args: object, **kwargs: object) -> object:
        raise torch.OutOfMemoryError("simulated")

    trainer.model.forward = oom  # type: ignore[method-assign]
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit()


def test_a_time_budget_anneals_the_learning_rate_within_the_budget(
    prepared_data: Path, tmp_path: Path
) -> None:
    trainer = make(prepared_data, tmp_path / "t", max_steps=100_000, max_seconds=4.0)
    result = trainer.fit()
    assert 0 < result.step < 100_000
    # The cosine horizon was pulled in to where the budget ends, so the last rate is near the
    # floor rather than the peak (with max_steps=100,000 it would still be at the peak).
    assert trainer.schedule.max_steps < 100_000
    last_lr = trainer.schedule.lr(result.step - 1)
    assert last_lr < 0.5 * trainer.cfg.optim.lr


def test_an_interrupted_evaluation_stops_between_batches(
    prepared_data: Path, tmp_path: Path
) -> None:
    """A stopping swarm node sets ``interrupt``: the evaluation (which holds the worker's
    lock the final checkpoint waits for) ends at the next batch instead of the whole set."""
    trainer = make(prepared_data, tmp_path / "run")
    assert trainer.evaluate(max_batches=2).loss > 0
    was = trainer.model.training
    trainer.interrupt.set()
    with pytest.raises(EvaluationInterruptedError, match="after 0 batches"):
        trainer.evaluate()
    assert trainer.model.training == was  # left as it was found
