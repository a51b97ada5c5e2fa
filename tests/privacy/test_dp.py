"""Differential privacy of one peer (issue 25): budgets, DP-SGD in the trainer, noised updates.

The budget arithmetic is Opacus's; these tests check that we feed it the right mechanisms,
refuse impossible targets with the values named, clip per record, stop at the budget and
keep counting across a resume.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant
from pydantic import ValidationError

from swarmlm.model import ModelConfig, Transformer
from swarmlm.privacy.accountant import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyLedger,
    plan_privacy,
)
from swarmlm.privacy.config import PrivacyConfig
from swarmlm.privacy.dp import clipped_gradient_sum, privatize_update
from swarmlm.train import RunConfig
from swarmlm.train.trainer import Trainer

TINY = {
    "vocab_size": 512,
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "d_ff": 64,
    "max_seq_len": 64,
}


def run_config(data: Path, out: Path, steps: int, **privacy: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": TINY,
            "data": {"path": str(data), "batch_size": 8, "seq_len": 16, "prefetch": 1},
            "optim": {"lr": 0.003},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {
                "max_steps": steps,
                "eval_batches": 2,
                "eval_every": 1000,
                "log_every": 2,
                "checkpoint_every": 1000,
                "out_dir": str(out),
                "threads": 1,
                "precision": "fp32",
            },
            "privacy": {"secure_rng": False, **privacy},
        }
    )


# -- budgets ---------------------------------------------------------------------------------


def test_calibrated_noise_spends_the_target_and_matches_opacus() -> None:
    cfg = PrivacyConfig(dp_sgd=True, target_epsilon=8.0, target_delta=1e-5)
    plan = plan_privacy(cfg, steps=200, sample_rate=0.01)
    assert plan.noise_multiplier is not None
    assert plan.record_epsilon is not None
    assert 0.97 * 8.0 <= plan.record_epsilon <= 8.0
    reference = RDPAccountant()
    reference.history = [(plan.noise_multiplier, 0.01, 200)]
    # our extra Renyi orders can only tighten Opacus's bound, never loosen it
    assert plan.record_epsilon <= reference.get_epsilon(1e-5) + 1e-9
    assert plan.record_epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=0.02)


def test_an_impossible_dp_sgd_target_is_refused_naming_the_values() -> None:
    cfg = PrivacyConfig(dp_sgd=True, noise_multiplier=0.5, target_epsilon=1.0)
    with pytest.raises(PrivacyConfigError) as err:
        plan_privacy(cfg, steps=1000, sample_rate=0.02)
    msg = str(err.value)
    for text in ("target_epsilon=1.0", "noise_multiplier=0.5", "1000 steps", "0.02", "at least"):
        assert text in msg


def test_an_impossible_contribution_target_is_refused_when_the_swarm_config_loads(
    tmp_path: Path,
) -> None:
    from swarmlm.swarm.config import SwarmRunConfig

    raw = {
        "data": {"path": str(tmp_path)},
        "swarm": {"rounds": 20},
        "privacy": {
            "contribution_noise": True,
            "contribution_noise_multiplier": 0.5,
            "target_epsilon": 2.0,
        },
    }
    with pytest.raises(ValidationError) as err:
        SwarmRunConfig.model_validate(raw)
    msg = str(err.value)
    for text in ("target_epsilon=2.0", "contribution_noise_multiplier=0.5", "20 rounds"):
        assert text in msg
    raw["privacy"]["contribution_noise_multiplier"] = None  # type: ignore[index]
    ok = SwarmRunConfig.model_validate(raw)  # calibrated instead: accepted
    assert ok.privacy.contribution_noise


def test_dp_sgd_is_refused_with_settings_it_cannot_honour(tmp_path: Path) -> None:
    from swarmlm.swarm.config import SwarmRunConfig

    with pytest.raises(ValidationError, match=r"privacy\.noise_multiplier is unset"):
        PrivacyConfig(dp_sgd=True)
    with pytest.raises(ValidationError, match=r"train\.curriculum"):
        RunConfig.model_validate(
            {
                "data": {"path": str(tmp_path)},
                "train": {"curriculum": [{"until_step": 5, "seq_len": 8}]},
                "privacy": {"dp_sgd": True, "noise_multiplier": 1.0},
            }
        )
    with pytest.raises(ValidationError, match="synchronous"):
        SwarmRunConfig.model_validate(
            {
                "data": {"path": str(tmp_path)},
                "swarm": {"mode": "synchronous"},
                "privacy": {"dp_sgd": True, "noise_multiplier": 1.0},
            }
        )


def steps_until_refused(ledger: PrivacyLedger) -> int:
    spent = 0
    while True:
        try:
            ledger.check(steps=1)
        except PrivacyBudgetExhaustedError:
            return spent
        ledger.spend(steps=1)
        spent += 1


def test_the_ledger_stops_or_warns_before_the_step_that_would_exceed_the_target(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = PrivacyConfig(dp_sgd=True, noise_multiplier=1.0, target_epsilon=2.0)
    plan = plan_privacy(cfg, steps=5, sample_rate=0.05)
    ledger = PrivacyLedger(cfg, plan)
    spent = steps_until_refused(ledger)
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"target_epsilon=2\.0"):
        ledger.check(steps=1)
    assert spent >= 5
    assert ledger.record_epsilon is not None
    assert ledger.record_epsilon <= 2.0
    warn = PrivacyLedger(cfg.model_copy(update={"on_budget_spent": "warn"}), plan)
    warn.spend(steps=spent)
    with caplog.at_level(logging.WARNING, logger="swarmlm.privacy.accountant"):
        warn.check(steps=1)
        warn.check(steps=1)
    assert [r.message.count("privacy budget spent") for r in caplog.records] == [1]


# -- mechanisms ------------------------------------------------------------------------------


def test_each_records_gradient_is_clipped_before_the_sum() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    x = torch.randint(0, 512, (5, 12))
    y = torch.randint(0, 512, (5, 12))
    clip = 0.05  # far below these gradients' norms: every row is clipped
    sums, losses = clipped_gradient_sum(model, x, y, clip, chunk=2, autocast=contextlib.nullcontext)
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        loss = model(x[i : i + 1], targets=y[i : i + 1]).loss
        loss.backward()
        assert float(losses[i]) == pytest.approx(loss.item(), rel=1e-5)
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        assert float(norm) > clip
        for k, g in grads.items():
            expected[k] += g * (clip / (float(norm) + 1e-6))
    for k, v in expected.items():
        torch.testing.assert_close(sums[k], v, rtol=1e-4, atol=1e-6)
    total = torch.sqrt(sum(v.pow(2).sum() for v in sums.values()))
    assert float(total) <= 5 * clip + 1e-6


def test_a_privatized_update_is_clipped_then_noised_with_the_stated_std() -> None:
    gen = torch.Generator().manual_seed(0)
    update = torch.full((200_000,), 0.01)  # norm 4.47
    out, norm = privatize_update(update, clip=1.0, noise_multiplier=0.5, generator=gen)
    assert norm == pytest.approx(float(update.norm()), rel=1e-5)
    noise = out - update * (1.0 / norm)
    assert float(noise.std()) == pytest.approx(0.5, rel=0.01)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.005)


# -- DP-SGD in the trainer -------------------------------------------------------------------


def test_dp_sgd_trains_and_reports_epsilon_in_the_log_and_metrics(
    prepared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = run_config(prepared_data, tmp_path / "run", 6, dp_sgd=True, target_epsilon=8.0)
    tr = Trainer(cfg, show_progress=False)
    assert tr.privacy is not None
    plan = tr.privacy.plan
    assert plan.sample_rate == pytest.approx(8 / tr.privacy.windows.records)  # type: ignore[union-attr]
    before = {k: p.detach().clone() for k, p in tr.model_core.named_parameters()}
    with caplog.at_level(logging.INFO, logger="swarmlm.train.trainer"):
        result = tr.fit()
    assert result.step == 6
    moved = [not torch.equal(before[k], p) for k, p in tr.model_core.named_parameters()]
    assert all(moved)
    report = tr.privacy.report()
    assert report["dp_steps"] == 6
    assert 0 < report["epsilon"] <= 8.0
    assert report["epsilon"] == pytest.approx(plan.record_epsilon, rel=1e-6)
    assert any("privacy epsilon" in r.message for r in caplog.records)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"epsilon"' in line for line in lines)


def test_an_impossible_dp_sgd_target_is_refused_before_the_first_step(
    prepared_data: Path, tmp_path: Path
) -> None:
    cfg = run_config(
        prepared_data, tmp_path, 500, dp_sgd=True, noise_multiplier=0.6, target_epsilon=1.0
    )
    with pytest.raises(PrivacyConfigError, match=r"noise_multiplier=0.6 over 500 steps"):
        Trainer(cfg, show_progress=False)


def test_the_run_stops_when_the_budget_is_spent_and_a_resume_keeps_counting(
    prepared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # the target is calibrated for 4 steps; the run is then asked for more (as a resumed run
    # with a larger max_steps would be): it stops where the budget ends
    cfg = run_config(prepared_data, out, 4, dp_sgd=True, target_epsilon=3.0)
    tr = Trainer(cfg, show_progress=False)
    tr.cfg.train.max_steps = 50
    result = tr.fit()
    assert tr.privacy is not None
    stopped_at = result.step
    assert 4 <= stopped_at < 50
    assert tr.privacy.report()["epsilon"] <= 3.0
    resumed = Trainer(run_config(prepared_data, out, 4, dp_sgd=True, target_epsilon=3.0))
    resumed.cfg.train.max_steps = 50
    resumed.fit(resume=True)
    assert resumed.privacy is not None
    assert resumed.privacy.ledger.steps == stopped_at  # no step left in the budget
    assert resumed.step == stopped_at


def test_secure_noise_is_not_the_seeds(prepared_data: Path, tmp_path: Path) -> None:
    """With secure_rng the noise does not follow from train.seed (which peers share)."""

    def first_grad(secure: bool, out: str) -> torch.Tensor:
        cfg = run_config(prepared_data, tmp_path / out, 2, dp_sgd=True, noise_multiplier=5.0)
        cfg.privacy.secure_rng = secure
        tr = Trainer(cfg, show_progress=False)
        assert tr.privacy is not None
        tr.privacy.gradient_step(tr.model_core, tr.precision.autocast)
        grad = tr.model_core.embed.weight.grad
        assert grad is not None
        tr.loader.close()
        return grad.clone()

    assert torch.equal(first_grad(False, "a"), first_grad(False, "b"))
    assert not torch.equal(first_grad(True, "c"), first_grad(True, "d"))
