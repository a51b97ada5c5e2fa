"""The closed RLHF loop's state machine: which phase each swarm round trains (pure logic).

A node with the loop enabled (``swarm.objective: "rlhf_loop"``, :mod:`swarmlm.rlhf.loop_objective`)
cycles through

``pretrain`` (language-model rounds) -> ``collect`` (the agreed policy's answers become
comparison tasks; rounds idle until enough consensus labels exist) -> ``reward``
(reward-model rounds on the consensus preferences) -> ``policy`` (PPO or GRPO rounds against
the agreed reward model) -> ``collect`` again (or ``pretrain`` with ``lm_rounds_per_cycle``).

Every peer must train the same phase in the same round, so the phase of round ``r`` is a
pure function of decided facts only: the round numbers and the label counts the decided
contributions of earlier rounds claimed (each contribution carries its sender's count of
consensus labels in its replica of the curation store; the round's count is the lower
median of the claims, which a minority of lying peers cannot move outside the honest
claims). No local clock and no local store read decides a transition, so two honest peers
that applied the same decisions are in the same phase.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from swarmlm.atomic import atomic_write_text
from swarmlm.config import StrictModel

log = logging.getLogger(__name__)

Phase = Literal["pretrain", "collect", "reward", "policy"]
PHASES: tuple[Phase, ...] = ("pretrain", "collect", "reward", "policy")
KEEP_STATES = 256  # rounds of loop state kept on disk (a resume needs its checkpoint's round)


class LoopThresholds(StrictModel):
    """When each phase ends; defaults that complete a cycle on the bundled corpus in minutes
    (the shipped tiny model, 50 inner steps a round, a handful of annotators)."""

    pretrain_rounds: int = Field(
        default=20, ge=0, description="language-model rounds before the first samples"
    )
    lm_rounds_per_cycle: int = Field(
        default=0, ge=0, description="language-model rounds at the start of every later cycle"
    )
    min_labels: int = Field(
        default=16,
        ge=1,
        description="new consensus preference pairs (since the last reward phase) before a "
        "reward-model phase starts; until then the loop waits in collect and says so",
    )
    reward_rounds: int = Field(default=4, ge=1, description="reward-model rounds per cycle")
    policy_rounds: int = Field(default=4, ge=1, description="PPO/GRPO rounds per cycle")


@dataclass(frozen=True)
class LoopState:
    """The loop after round ``round`` was decided; it decides what round ``round + 1`` trains.

    ``since``: the first round of ``phase``; ``labels``: the agreed consensus-label count at
    ``round`` (None before any peer claimed one); ``labels_used``: the agreed count when
    the last reward phase started (the next one needs ``min_labels`` more)."""

    round: int = 0
    phase: Phase = "pretrain"
    since: int = 1
    cycle: int = 0
    cycles_completed: int = 0
    labels: int | None = None
    labels_used: int = 0

    def rounds_in_phase(self) -> int:
        """Rounds of ``phase`` decided so far (including ``round``)."""
        return max(0, self.round - self.since + 1)

    def claim(self) -> dict[str, Any]:
        """What a contribution says about the state it trained under (compared between
        peers; adopted by a peer that lacks it, e.g. one that joined mid-loop)."""
        return {
            "round": self.round,
            "phase": self.phase,
            "since": self.since,
            "cycle": self.cycle,
            "cycles_completed": self.cycles_completed,
            "labels": self.labels,
            "labels_used": self.labels_used,
        }

    @classmethod
    def from_claim(cls, raw: dict[str, Any]) -> LoopState:
        """A claimed state; ValueError naming the field when it is not one."""
        phase = raw.get("phase")
        if phase not in PHASES:
            raise ValueError(f"loop state: phase {phase!r} is not one of {', '.join(PHASES)}")
        ints = {}
        for name in ("round", "since", "cycle", "cycles_completed", "labels_used"):
            v = raw.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"loop state: {name} must be an integer >= 0, got {v!r}")
            ints[name] = v
        labels = raw.get("labels")
        if labels is not None and (not isinstance(labels, int) or labels < 0):
            raise ValueError(f"loop state: labels must be an integer >= 0 or null, got {labels!r}")
        return cls(phase=phase, labels=labels, **ints)


def agreed_labels(claims: list[int | None]) -> int | None:
    """The round's label count: the lower median of the claimed counts (None: no claim).
    With at most ``f`` liars among ``2f + 1`` claims it lies between two honest claims."""
    counts = sorted(c for c in claims if c is not None)
    if not counts:
        return None
    return counts[(len(counts) - 1) // 2]


def advance(state: LoopState, t: LoopThresholds, round: int, claims: list[int | None]) -> LoopState:
    """The state after decided round ``round`` (= ``state.round + 1``) whose contributions
    claimed ``claims`` label counts."""
    if round != state.round + 1:
        raise ValueError(f"loop state of round {state.round} cannot advance to round {round}")
    labels = agreed_labels(claims)
    s = replace(state, round=round, labels=state.labels if labels is None else labels)
    done = s.rounds_in_phase()
    nxt = round + 1
    if s.phase == "pretrain":
        want = t.pretrain_rounds if s.cycle == 0 else t.lm_rounds_per_cycle
        if done >= want:
            return replace(s, phase="collect", since=nxt)
    elif s.phase == "collect":
        have = s.labels or 0
        if have - s.labels_used >= t.min_labels:
            return replace(s, phase="reward", since=nxt, labels_used=have)
    elif s.phase == "reward":
        if done >= t.reward_rounds:
            return replace(s, phase="policy", since=nxt)
    elif done >= t.policy_rounds:
        cycle = s.cycle + 1
        phase: Phase = "pretrain" if t.lm_rounds_per_cycle > 0 else "collect"
        return replace(s, phase=phase, since=nxt, cycle=cycle, cycles_completed=cycle)
    return s


def initial_state(t: LoopThresholds) -> LoopState:
    """Round 0: pretraining first, or straight to collecting with ``pretrain_rounds`` 0."""
    return LoopState() if t.pretrain_rounds > 0 else LoopState(phase="collect")


def waiting_reason(state: LoopState, t: LoopThresholds) -> str | None:
    """Why the loop is not training (collect phase), in words for the log and dashboard."""
    if state.phase != "collect":
        return None
    new = (state.labels or 0) - state.labels_used
    return (
        f"the reward model waits for consensus labels: {max(0, new)} of "
        f"rlhf_loop.min_labels={t.min_labels} new preference pairs"
    )


class LoopHistory:
    """The loop state of recent rounds and the claims that advance it, persisted atomically
    (``swarmlm.atomic``) so a restarted node resumes the phase of its checkpoint's round.

    ``claims[r]`` holds the label counts of round ``r``'s decided contributions; states are
    derived from them on demand (:meth:`state_after`), so the order in which the worker
    reports rounds (its own contribution, verification, catching up) does not matter."""

    def __init__(self, path: Path | None, thresholds: LoopThresholds) -> None:
        self.path = path
        self.t = thresholds
        self.states: dict[int, LoopState] = {0: initial_state(thresholds)}
        self.claims: dict[int, list[int | None]] = {}
        self.adopted: dict[int, LoopState] = {}
        if path is not None and path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            states = {int(k): LoopState.from_claim(v) for k, v in raw["states"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("%s: unreadable loop state (%s); starting from round 0's", path, exc)
            return
        self.states.update(states)
        log.info("loop state from %s: rounds %d..%d", path, min(states), max(states))

    def save(self) -> None:
        if self.path is None:
            return
        keep = sorted(self.states)[-KEEP_STATES:]
        body = {"states": {str(r): asdict(self.states[r]) for r in keep}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(body, indent=1) + "\n")

    def record(self, round: int, claim: int | None) -> None:
        """One decided contribution of ``round`` claimed ``claim`` labels."""
        self.claims.setdefault(round, []).append(claim)

    def adopt(self, state: LoopState) -> None:
        """The state after round ``state.round`` as the next round's decided contributions
        claim it; used only when this peer lacks the rounds that lead there (it joined, or
        resynchronised its parameters far ahead)."""
        self.adopted.setdefault(state.round, state)

    def state_after(self, round: int) -> LoopState:
        """The state after decided round ``round``, advancing from the newest one known."""
        if round in self.states:
            self.claims.pop(round, None)  # a replayed round (after a restart): known already
            return self.states[round]
        known = max((r for r in self.states if r < round), default=0)
        state = self.states[known]
        if known < round - 1 and round in self.adopted:
            log.info("rlhf loop: adopting the decided contributions' state after round %d", round)
            self.states[round] = self.adopted.pop(round)
            return self.states[round]
        for r in range(known + 1, round + 1):
            before = state
            state = advance(state, self.t, r, self.claims.pop(r, []))
            self.states[r] = state
            if state.phase != before.phase:
                log.info(
                    "rlhf loop: after round %d the phase is %s (cycle %d)",
                    r,
                    state.phase,
                    state.cycle,
                )
        for old in sorted(self.states)[:-KEEP_STATES]:
            del self.states[old]
        return state
