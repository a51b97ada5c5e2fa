"""The deterministic simulator: the real round protocol under many fault schedules in
virtual time (issue 18). No timing assertions: every number here is virtual."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from swarmlm.p2p.node_api import ProtocolNode
from swarmlm.sim.byzantine import BEHAVIOURS
from swarmlm.sim.errors import ScheduleError, SimulatorDeadlockError
from swarmlm.sim.loop import VirtualTimeLoop
from swarmlm.sim.network import LinkModel, SimNetwork
from swarmlm.sim.node import SimNode
from swarmlm.sim.runner import (
    ALL_FAULTS,
    NETWORK_FAULTS,
    ScheduleSpec,
    _identity,
    run_schedule,
    sim_config,
)

# a short fault window and liveness bound keep a schedule to a fraction of a CPU second
FAST: dict[str, Any] = {"fault_window": 3.0, "liveness_bound": 30.0, "trace_messages": False}


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # Byzantine schedules log every dropped message
    yield
    logging.disable(logging.NOTSET)


def test_virtual_loop_runs_an_hour_of_sleeps_without_waiting_for_them() -> None:
    loop = VirtualTimeLoop()
    try:
        t0 = loop.time()
        order: list[str] = []

        async def sleeper(name: str, s: float) -> None:
            await asyncio.sleep(s)
            order.append(name)

        async def main() -> None:
            await asyncio.gather(sleeper("late", 3600), sleeper("early", 1.5))

        loop.run_until_complete(main())
        assert order == ["early", "late"]
        assert loop.time() - t0 == pytest.approx(3600)
    finally:
        loop.close()


def test_virtual_loop_reports_a_deadlock_instead_of_hanging() -> None:
    loop = VirtualTimeLoop()
    try:
        with pytest.raises(SimulatorDeadlockError):
            loop.run_until_complete(asyncio.Event().wait())
    finally:
        loop.close()


def test_sim_node_provides_what_the_protocol_needs_from_a_node() -> None:
    net = SimNetwork(1, LinkModel())
    node: ProtocolNode = SimNode(net, _identity(1, 0), sim_config(4), seed=1)  # mypy checks
    assert node.now() == net.loop.time()
    msg = node.sign("ping", {})
    assert msg.ts > 1e9  # a wall-clock stamp, from the virtual clock
    net.loop.close()


def test_same_seed_gives_the_same_trace_and_another_seed_another() -> None:
    spec = ScheduleSpec(peers=5, byzantine=1, faults=("crash", "partition", "equivocate"))
    a, b, c = run_schedule(3, spec), run_schedule(3, spec), run_schedule(4, spec)
    assert a.trace_digest == b.trace_digest
    assert a.trace_tail == b.trace_tail
    assert a.trace_digest != c.trace_digest


def sim_batch(
    peers: int, byzantine: int, faults: tuple[str, ...], seeds: range
) -> list[dict[str, Any]]:
    """Run schedules through ``swarmlm sim --json`` in a child with ``PYTHONHASHSEED=0``:
    set iteration order follows the hash seed, so this is what makes a seed name one trace
    whatever the test runner's own hash seed (the repro commands set it too)."""
    cmd = [sys.executable, "-m", "swarmlm.cli", "sim", "--json", "--peers", str(peers),
           "--byzantine", str(byzantine), "--faults", ",".join(faults) or "none",
           "--first-seed", str(seeds.start), "--seeds", str(len(seeds)),
           "--fault-window", "3", "--liveness-bound", "30"]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(seeds), out.stderr[-2000:]
    return rows


MIXES = [
    ("crash", "partition", "pause"),
    ("oneway", "loss", "duplicate", "reorder"),
    ("slowcpu", "skew", "crash"),
    ("equivocate", "split_propose", "withhold", "replay", "partition"),
    ("garbage", "pad_cert", "flood", "lie_catchup", "slow", "loss"),
]


@pytest.mark.parametrize("faults", MIXES, ids=["-".join(m[:2]) for m in MIXES])
def test_fault_schedules_stay_safe_bounded_and_exception_free(faults: tuple[str, ...]) -> None:
    """Six schedules per fault mix and size, n = 4 and 7 with f Byzantine members when
    the mix has Byzantine behaviours: safety, bounded tables, no unhandled exception and
    no simulator error on every one (liveness: the next tests)."""
    for n in (4, 7):
        byz = (n - 1) // 3 if set(faults) & set(BEHAVIOURS) else 0
        for row in sim_batch(n, byz, faults, range(6)):
            assert row["verdict"] in ("ok", "liveness"), row
            assert row["rounds"] > 0, row


def test_crash_partition_and_pause_schedules_are_live_after_the_faults_heal() -> None:
    for n in (4, 5, 7):
        for row in sim_batch(n, 0, ("crash", "partition", "pause"), range(1, 9)):
            assert row["verdict"] == "ok", row


# Failing seeds found by the simulator (issue 18): findings about the protocol, kept as
# expected failures with their seed until the liveness work (issue 10) fixes them. Each is
# reproduced by the repro command of its row (PYTHONHASHSEED=0).
KNOWN_LIVENESS_FAILURES: list[Any] = [
    # n = 4: a node crashed at 2.68 s and restarted at 4.11 s refused every certificate of
    # round 7 as "too few commits" and blacklisted all three honest peers: round 7 decided
    # in view 1 on the re-proposal of view 0's entries (same h), and the certificates paired
    # the view-0 proposal with view-1 commits. Fixed (producer and receivers); kept as a
    # regression test
    pytest.param(0, 4, 0, ("crash", "partition", "pause"), id="seed0-n4-restart-blacklists"),
]


@pytest.mark.parametrize(("seed", "n", "byzantine", "faults"), KNOWN_LIVENESS_FAILURES)
def test_known_liveness_failures_are_live_after_the_faults_heal(
    seed: int, n: int, byzantine: int, faults: tuple[str, ...]
) -> None:
    (row,) = sim_batch(n, byzantine, faults, range(seed, seed + 1))
    assert row["verdict"] == "ok", row


# Seeds that failed at the CLI's default windows (8 s of faults, 60 s to go on), run in
# process (PYTHONHASHSEED does not matter for the verdict of these).
KNOWN_LIVENESS_FAILURES_DEFAULT_WINDOWS: list[Any] = [
    # n = 7, two members sending garbage frames (blacklisted by the honest five, so all
    # five are needed for a quorum), one honest node crashed twice and restarted at round 4:
    # restarted, it did not know round 3's decision, so it rotated leaders over all members
    # while the others rotated over round 3's contributors; it refused every proposal of
    # the others' leaders as "from a non-leader" (charging them) and never prepared: four
    # prepares < q = 5 in every view, for good. It now asks for the previous round's
    # certificate and rotates as the others do.
    pytest.param(
        5002, 7, 2, ("crash", "partition", "pause", "withhold", "garbage"), id="seed5002-n7"
    ),
    # a simulator defect, not the protocol's: a node restarted behind a one-way cut got no
    # connection to those peers, and healing a one-way cut never dialled again (the TLS
    # node's reconnect loop does): it could not send, and five of seven were needed
    pytest.param(10181, 7, 2, ALL_FAULTS, id="seed10181-n7-oneway-restart"),
]


@pytest.mark.parametrize(
    ("seed", "n", "byzantine", "faults"), KNOWN_LIVENESS_FAILURES_DEFAULT_WINDOWS
)
def test_known_liveness_failures_at_default_windows(
    seed: int, n: int, byzantine: int, faults: tuple[str, ...]
) -> None:
    res = run_schedule(seed, ScheduleSpec(peers=n, byzantine=byzantine, faults=faults))
    assert res.verdict == "ok", res.report()


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(ScheduleError, match="unknown fault"):
        ScheduleSpec(faults=("crash", "meteor")).validate()
    with pytest.raises(ScheduleError, match="f >= n/3"):
        ScheduleSpec(peers=7, byzantine=3).validate()
    ScheduleSpec(peers=7, byzantine=3, require_liveness=False).validate()  # safety only: ok
    with pytest.raises(ScheduleError, match="payload size"):
        ScheduleSpec(payload_size=-1).validate()
    with pytest.raises(ScheduleError, match="peers"):
        ScheduleSpec(peers=0).validate()
    assert set(BEHAVIOURS).isdisjoint(NETWORK_FAULTS)


def test_a_simulator_defect_is_reported_as_such_not_as_a_protocol_bug(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # lose a message without accounting for it: the simulator's own check must catch it
    original = SimNetwork._handle
    calls = [0]

    def leaky(self: SimNetwork, src: str, dst: str, frame: dict[str, object]) -> None:
        calls[0] += 1
        if calls[0] == 10:
            self.stats.in_flight -= 1  # neither delivered nor dropped: vanished
            return
        original(self, src, dst, frame)

    monkeypatch.setattr(SimNetwork, "_handle", leaky)
    res = run_schedule(1, ScheduleSpec(peers=4, faults=(), **FAST))
    assert res.verdict == "simulator_error"
    assert "accounting" in (res.simulator_error or "")


# The second finding (an invalid message buffered for a future round escaped from
# _ensure_round when the round opened) is fixed; its regression test is
# tests/p2p/test_certificates.py::test_an_invalid_buffered_message_is_charged_when_its_round_opens.


def test_late_votes_are_not_answered_with_the_certificate_so_catch_up_traffic_stays_linear() -> (
    None
):
    """A COMMIT that arrives just after a node decided comes from a peer that committed and
    receives the same COMMITs; answering each with the certificate (O(n) bytes) made
    catch-up O(n^3) bytes a round (n = 30: 1,447 certificates sent in 5 clean rounds;
    n = 100: 1.86 MB a peer a round). Now those are not answered."""
    n, rounds = 30, 5
    res = run_schedule(
        1,
        ScheduleSpec(
            peers=n,
            faults=(),
            max_rounds=rounds,
            fault_window=0.0,
            liveness_bound=600.0,
            trace_messages=False,
        ),
    )
    assert res.verdict == "ok"
    decided = res.messages_by_kind.get("decided", 0)
    assert decided <= res.messages_by_kind.get("decided_req", 0) + n, res.messages_by_kind
