"""What a node is doing right now, in one line a person can read.

A node on a busy machine can spend minutes before its first decided round (building the
model, waiting for the other members, evaluating, 50 inner steps). With nothing on screen
that looks like a hang, so ``swarmlm node`` polls :func:`activity` about once a second and
prints a line whenever the phase changes, and during a local phase a progress bar of the
inner steps (see :class:`ActivityPrinter`). Reading the runtime's state here, instead of
publishing more events from the trainer, keeps the training loop free of display code; it
only reads attributes (the trainer's step counter, the round protocol's last decided
round), never locks, so it cannot slow a round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BAR_WIDTH = 20
PROGRESS_EVERY_S = 5.0  # a bar line at most this often (a log file stays readable)


@dataclass(frozen=True)
class Activity:
    """One reading: ``phase`` names what the node does, ``text`` says it in words;
    ``step``/``steps`` are the local phase's inner steps when training a round."""

    phase: str
    text: str
    round: int | None = None
    step: int | None = None
    steps: int | None = None


def _members_connected(runtime: Any) -> int:
    p2p = runtime.p2p
    if p2p is None:
        return 1
    return 1 + sum(1 for peer in list(p2p.connections) if runtime.is_round_member(peer))


def activity(runtime: Any, round_base: dict[int, int]) -> Activity | None:
    """The node's current activity, or None when it runs no rounds (annotation nodes).

    ``round_base`` (caller-owned, round -> trainer step when the round's local phase was
    first seen) lets the inner-step count be read from the trainer's global step counter.
    """
    state = runtime.training()["state"]
    if state == "off":
        return None
    if state in ("failed", "finished", "stopped"):
        return Activity(state, f"training {state}")
    member = runtime.swarm
    cfg = runtime.swarm_cfg
    worker = getattr(member, "worker", None)
    proto = getattr(member, "proto", None)
    voter = state == "voting" or runtime.cfg.type == "lightweight"
    if member is None or (worker is None and not voter):
        compiling = bool(getattr(getattr(cfg, "train", None), "compile", False))
        return Activity(
            "loading",
            "compiling the model (torch.compile) and loading the data"
            if compiling
            else "building the model and loading the data",
        )
    if proto is None:
        expect = int(cfg.swarm.expect_peers) if cfg is not None else 1
        have = _members_connected(runtime)
        if have < expect:
            return Activity(
                "waiting",
                f"waiting for peers: {have} of {expect} round members connected "
                f"(swarm.expect_peers={expect})",
            )
        return Activity("joining", f"forming the membership with {have} round members")
    if state == "starting":
        return Activity("evaluating", "evaluating the initial model")
    decided = int(proto.last_decided)
    last = runtime.training().get("last_round") or {}
    reported = int(last.get("round", int(getattr(proto, "start_round", 1)) - 1))
    if decided > reported and not voter:
        # decided, not yet printed: the node applies the aggregate and evaluates first, and
        # "training round r + 1" here would appear above the "round r" line
        return Activity(
            "applying", f"round {decided} decided: applying it and evaluating", round=decided
        )
    r = decided + 1
    if voter:
        return Activity("voting", f"voting in round {r}", round=r)
    sw = cfg.swarm
    steps = 1 if sw.mode == "synchronous" else int(sw.inner_steps)
    trainer = getattr(worker, "trainer", None)
    now = int(getattr(trainer, "step", 0))
    base = round_base.setdefault(r, now)
    if now < base:  # the trainer's counter was reset by a state resync: restart the count
        base = round_base[r] = now
    done = min(now - base, steps)
    if done >= steps:
        return Activity(
            "deciding", f"round {r}: local phase done, waiting for the round's decision", round=r
        )
    return Activity("training", f"training round {r}", round=r, step=done, steps=steps)


def bar(done: int, total: int) -> str:
    filled = 0 if total <= 0 else int(BAR_WIDTH * done / total)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + f"] {done}/{total} inner steps"


class ActivityPrinter:
    """Turns readings into lines: one per phase change, plus a progress bar line during a
    local phase at most every :data:`PROGRESS_EVERY_S` seconds."""

    def __init__(self, print_line: Callable[[str], None]) -> None:
        self.print_line = print_line
        self.round_base: dict[int, int] = {}
        self._last_key: tuple[str, int | None] | None = None
        self._last_text: str | None = None
        self._last_bar = 0.0
        self._phase_started = time.monotonic()

    def poll(self, runtime: Any) -> None:
        act = activity(runtime, self.round_base)
        if act is None:
            return
        now = time.monotonic()
        key = (act.phase, act.round)
        if key != self._last_key or (act.phase != "training" and act.text != self._last_text):
            self._last_key, self._last_text = key, act.text
            self._phase_started = now
            self._last_bar = now
            line = act.text
            if act.phase == "training" and act.steps is not None:
                line += "  " + bar(act.step or 0, act.steps)
            self.print_line(line)
            # rounds long past need no base any more
            for old in [k for k in self.round_base if act.round and k < act.round - 1]:
                del self.round_base[old]
            return
        if (
            act.phase == "training"
            and act.steps is not None
            and now - self._last_bar >= (PROGRESS_EVERY_S)
        ):
            self._last_bar = now
            elapsed = now - self._phase_started
            self.print_line(f"{act.text}  {bar(act.step or 0, act.steps)}  {elapsed:.0f} s")
