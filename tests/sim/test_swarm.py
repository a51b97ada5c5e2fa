"""Real swarm trainer peers (SwarmNode, tiny model) over the simulated network (issue 18,
item 1: the swarm round logic runs unchanged over the simulator). Every number here is
virtual; a schedule costs a few CPU seconds."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmlm.sim.errors import ScheduleError
from swarmlm.sim.swarm import SWARM_FAULTS, SwarmSimulation, SwarmSpec, run_swarm_schedule

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # resyncs and the restarted peer's re-sent vote warn
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_swarm_peers_agree_on_every_round_under_crash_partition_and_a_byzantine_peer(
    seed: int, prepared_data: Path
) -> None:
    spec = SwarmSpec(peers=4, faults=SWARM_FAULTS, data=str(prepared_data))
    res = run_swarm_schedule(seed, spec)
    assert res.ok, res.report()
    assert res.rounds_decided == spec.rounds
    # the faults happened: one restart from disk, and the diverged peer fetched the state
    assert res.max_tables["restarts"] == 1
    assert res.max_tables["resyncs"] >= 1
    assert any("crash" in e for e in res.events)
    assert any("partition" in e for e in res.events)
    assert any(e.startswith("final params ") for e in res.events)


def test_same_seed_gives_the_same_swarm_trace(prepared_data: Path) -> None:
    spec = SwarmSpec(peers=4, faults=("crash", "diverge"), data=str(prepared_data))
    a = run_swarm_schedule(3, spec)
    b = run_swarm_schedule(3, spec)
    assert a.ok, a.report()
    assert b.ok, b.report()
    assert a.trace_digest == b.trace_digest
    assert a.events == b.events  # incl. the final parameters hash


def test_diverging_params_are_reported_as_a_safety_violation(
    prepared_data: Path, tmp_path: Path
) -> None:
    sim = SwarmSimulation(0, SwarmSpec(peers=4, faults=(), data=str(prepared_data)), tmp_path,
                          prepared_data)  # fmt: skip
    try:
        for i, peer in enumerate(sim.peers.values()):
            peer.rounds = {r: "a" * 64 for r in range(1, 9)}
            if i == 2:
                peer.rounds[5] = "b" * 64
        sim.check()
        assert sim.result.verdict == "safety"
        assert "round 5: params hashes differ" in sim.result.safety_violations[0]
        short = next(iter(sim.peers.values()))
        short.rounds = {1: "a" * 64}
        sim.result.safety_violations.clear()
        sim.check()
        assert "stopped before round 8" in str(sim.result.liveness_failure)
    finally:
        sim.net.loop.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"faults": ("crash", "equivocate")}, "unknown swarm fault(s) equivocate"),
        ({"peers": 3, "faults": ("byzantine",)}, "needs --peers >= 4"),
        ({"peers": 1, "faults": ()}, "at least 2"),
        ({"byzantine": 1, "faults": ()}, "--faults byzantine"),
        ({"inner_steps": 0, "faults": ()}, "--inner-steps must be at least 1"),
        ({"max_rounds": 4, "faults": ("crash",)}, "need --rounds >= 6"),
    ],
)
def test_bad_swarm_input_gets_a_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SwarmSpec(**kwargs).validate()  # type: ignore[arg-type]
