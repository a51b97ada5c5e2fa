"""DP peers in a swarm (issue 25): noised updates still compress, aggregate robustly and
apply identically; each peer's (epsilon, delta) reaches its metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.swarm.conftest import peer_id, swarm_config

from swarmlm.aggregation import ErrorFeedback, get_aggregator, get_codec
from swarmlm.node.events import Event
from swarmlm.node.metrics import NodeMetrics
from swarmlm.privacy.accountant import PrivacyBudgetExhaustedError
from swarmlm.privacy.dp import privatize_update
from swarmlm.swarm.config import SwarmRunConfig
from swarmlm.swarm.simulate import LocalSwarm
from swarmlm.swarm.worker import SwarmWorker


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rule", ["centered_clip", "trimmed_mean", "median", "geometric_median"])
def test_noised_updates_aggregate_to_the_noiseless_mean_in_expectation(rule: str) -> None:
    """Clipped + noised updates of 8 peers, through int8 error feedback and a robust rule:
    every aggregate is finite and their average over many rounds approaches the mean of the
    clipped updates (the noise is zero-mean and symmetric; the rules are equivariant)."""
    n, d, clip, sigma, trials = 8, 500, 1.0, 0.05, 300
    torch.manual_seed(0)
    direction = torch.randn(d)
    updates = torch.stack([direction + 0.3 * torch.randn(d) for _ in range(n)])
    updates = updates / updates.norm(dim=1, keepdim=True) * 0.8  # inside the clip
    noiseless = updates.mean(0)
    codec = get_codec("int8", block_size=1024, zstd=True)
    feedback = [ErrorFeedback(codec) for _ in range(n)]
    gen = torch.Generator().manual_seed(1)
    aggregate = get_aggregator(rule, f=1)
    total = torch.zeros(d)
    for _ in range(trials):
        sent = []
        for i in range(n):
            noised, _ = privatize_update(updates[i], clip, sigma, gen)
            sent.append(feedback[i].encode(noised).transmitted)
        agg = aggregate(torch.stack(sent))
        assert torch.isfinite(agg).all()
        total += agg
    mean = total / trials
    rel = float((mean - noiseless).norm() / noiseless.norm())
    single = float((agg - noiseless).norm() / noiseless.norm())
    assert rel < 0.1, (rule, rel)
    assert rel < single / 3  # the average really converges: one round alone is far noisier


def dp_swarm(data: Path, tmp: Path, n: int = 4, **privacy: object) -> LocalSwarm:
    workers = []
    for i in range(n):
        cfg = swarm_config(data, tmp / f"p{i}", rounds=2, inner_steps=2, data_shard=i)
        raw = cfg.model_dump(mode="json")
        raw["privacy"] = {"secure_rng": True, **privacy}
        raw["train"]["precision"] = "fp32"
        workers.append(SwarmWorker(SwarmRunConfig.model_validate(raw), peer_id(i)))
    return LocalSwarm(workers)


def test_a_swarm_round_of_dp_peers_applies_identically_and_reports_epsilon(
    prepared_data: Path, tmp_path: Path, one_thread: None
) -> None:
    swarm = dp_swarm(
        prepared_data,
        tmp_path,
        dp_sgd=True,
        noise_multiplier=1.0,
        contribution_noise=True,
        contribution_noise_multiplier=0.02,
        contribution_clip=0.5,  # no target: the noise is far too small for one
    )
    try:
        reports = swarm.run_round(1)
        assert all(len(r.accepted) == 4 for r in reports.values())
        hashes = {w.params_sha256() for w in swarm.workers.values()}
        assert len(hashes) == 1
        for w in swarm.workers.values():
            assert torch.isfinite(w.engine.params).all()
            assert w.last_update is not None
            # what left the peer: clipped to 0.5 plus noise of std 0.02 per coordinate
            d = w.last_update.numel()
            assert float(w.last_update.norm()) <= 0.5 + 3 * 0.02 * math.sqrt(d)
            rep = w.privacy_report()
            assert rep is not None
            assert rep["dp_steps"] == 2
            assert rep["noised_rounds"] == 1
            assert rep["record_epsilon"] > rep["peer_epsilon"] > 0
    finally:
        swarm.close()


def test_a_peer_out_of_budget_refuses_its_next_round(
    prepared_data: Path, tmp_path: Path, one_thread: None
) -> None:
    # calibrated to 2 rounds; a third one would exceed the target
    swarm = dp_swarm(prepared_data, tmp_path, n=1, contribution_noise=True, target_epsilon=4.0)
    try:
        swarm.run_round(1)
        swarm.run_round(2)
        worker = next(iter(swarm.workers.values()))
        rep = worker.privacy_report()
        assert rep is not None
        assert rep["peer_epsilon"] <= 4.0
        with pytest.raises(PrivacyBudgetExhaustedError, match=r"target_epsilon=4\.0"):
            worker.local_phase()
    finally:
        swarm.close()


def test_round_privacy_reaches_prometheus_and_the_dashboard_feed() -> None:
    metrics = NodeMetrics("n1", "training")
    privacy = {
        "epsilon": 3.5,
        "record_epsilon": 3.5,
        "peer_epsilon": 1.25,
        "delta": 1e-5,
        "target_epsilon": 8.0,
    }
    metrics.observe(Event("round_decided", {"round": 3, "privacy": privacy}, 7, 1.0))
    text = metrics.render().decode()
    assert 'swarmlm_privacy_epsilon{level="record"} 3.5' in text
    assert 'swarmlm_privacy_epsilon{level="peer"} 1.25' in text
    assert "swarmlm_privacy_delta 1e-05" in text
    assert "swarmlm_privacy_target_epsilon 8.0" in text
    assert metrics.rounds_feed()[0]["epsilon"] == 3.5
    assert metrics.training_feed()["privacy"]["peer_epsilon"] == 1.25
    # a round without privacy leaves the gauges as they were and logs no epsilon
    metrics.observe(Event("round_decided", {"round": 4}, 8, 2.0))
    assert metrics.rounds_feed()[0]["epsilon"] is None
