"""A lightweight round member: membership and votes, no training compute.

A voter joins the round protocol like a training peer and, each round, contributes a tiny
abstain entry (:func:`swarmlm.swarm.contribution.encode_abstain`) so that it counts toward
the quorum, then PREPAREs and COMMITs like anyone else. Cheap machines so add to the
protocol's fault tolerance (``f = (n - 1) // 3`` grows with ``n``) and keep rounds deciding
when training peers crash, without holding the model.

Why the voter waits before abstaining: a leader proposes once it holds ``q`` payloads (plus
a short grace for the rest). Abstaining at once would let a round reach quorum with voters
and the fastest trainers and close before the slower trainers finish, wasting their local
phase every round. So a voter abstains once every non-voter member has contributed, or
once a straggler allowance has passed since the first contribution it saw (half the last
round's duration, at least 2 s): a crashed trainer delays a round by that much, not forever.

A voter still holds every payload of a proposal before it votes (that is what makes its
PREPARE mean "the data is available"), so it downloads contributions; it keeps only
``p2p.keep_rounds`` rounds of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.consensus import Decision, RoundProtocol
from swarmlm.p2p.errors import ConsensusError
from swarmlm.p2p.transport import P2PNode
from swarmlm.swarm.abstain import encode_abstain
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.membership import find_swarm, form_genesis
from swarmlm.swarm.rawconfig import read_json_config, validation_lines

log = logging.getLogger(__name__)

MIN_STRAGGLER_S = 2.0


class VoterSwarmSettings(BaseModel):
    """The part of a swarm config's ``swarm`` section a voter uses (the rest is the
    trainers' business and is not validated here, so a voter never loads torch)."""

    model_config = ConfigDict(extra="ignore")

    rounds: int = Field(default=20, ge=1)
    expect_peers: int = Field(default=1, ge=1)
    genesis_timeout: float = Field(default=120.0, gt=0)
    round_timeout: float = Field(default=600.0, gt=0)


class VoterConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    swarm: VoterSwarmSettings = Field(default_factory=VoterSwarmSettings)
    p2p: P2PConfig = Field(default_factory=P2PConfig)


def load_voter_config(path: Path, overrides: list[str] | None = None) -> VoterConfig:
    raw = read_json_config(path, overrides)
    try:
        return VoterConfig.model_validate(raw)
    except ValidationError as exc:
        raise SwarmError(f"{path}: invalid swarm config\n" + validation_lines(exc)) from exc


class VoterNode:
    """Follow and vote in rounds until ``swarm.rounds`` (or ``stop``)."""

    def __init__(
        self,
        cfg: VoterConfig,
        p2p: P2PNode,
        *,
        is_voter: Callable[[str], bool],
        peer_filter: Callable[[str], bool] | None = None,
        events: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``is_voter(peer)``: whether a member is itself a voter (it contributes no update,
        so we do not wait for it); ``peer_filter``: genesis candidates, as for trainers."""
        self.cfg = cfg
        self.node = p2p
        self.is_voter = is_voter
        self.peer_filter = peer_filter
        self.events = events or (lambda ev: None)
        self.proto: RoundProtocol | None = None
        self.rounds = 0
        self._last_round_s = 0.0

    def _emit(self, event: str, **fields: Any) -> None:
        self.events({"event": event, "time": round(time.time(), 3), **fields})

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Vote until the last round; returns the number of rounds seen decided."""
        stop = stop or asyncio.Event()
        work = asyncio.create_task(self._vote())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([work, stopper], return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()
            self._emit("done", rounds=self.rounds, resyncs=0)
        finally:
            for t in (work, stopper):
                t.cancel()
            if self.proto is not None:
                self.proto.close()
        return self.rounds

    async def _vote(self) -> None:
        sw = self.cfg.swarm
        me = self.node.node_id
        found = await find_swarm(self.node, sw.genesis_timeout)
        if found is not None:
            start, members = found[0] + 1, found[1]
        else:
            start = 1
            members = await form_genesis(
                self.node, sw.expect_peers, sw.genesis_timeout, self.peer_filter
            )
        proto = self.proto = RoundProtocol(self.node, members, start_round=start)
        self._emit("genesis", members=members, val_loss=None, round=start - 1)
        r = start
        while r <= sw.rounds:
            if proto.last_decided >= r:  # decided while we waited: move to the next open one
                r = proto.last_decided + 1
                continue
            known = proto.members(r) or proto.members(proto.last_decided + 1) or []
            t0 = time.monotonic()
            if me not in known:
                proto.request_join_if_needed()
                decision = await self._await(proto.decision(r, sw.round_timeout), r)
            else:
                await self._wait_for_trainers(proto, r, known)
                if r in proto.decisions:
                    decision = proto.decisions[r]
                else:
                    payload = encode_abstain(r, me)
                    decision = await self._await(
                        proto.contribute(r, payload, timeout=sw.round_timeout), r
                    )
            self._last_round_s = time.monotonic() - t0
            self.rounds = r
            self._report(decision)
            if me in decision.members and me not in decision.members_next:
                log.warning("round %d removed us from the membership; stopping", r)
                return
            r += 1

    async def _await(self, fut: Any, r: int) -> Decision:
        try:
            decision: Decision = await fut
        except ConsensusError as exc:
            raise SwarmError(
                f"round {r} did not decide within swarm.round_timeout="
                f"{self.cfg.swarm.round_timeout:.0f} s: {exc}"
            ) from exc
        return decision

    async def _wait_for_trainers(self, proto: RoundProtocol, r: int, members: list[str]) -> None:
        me = self.node.node_id
        trainers = {m for m in members if m != me and not self.is_voter(m)}
        first_seen: float | None = None
        allowance = max(MIN_STRAGGLER_S, 0.5 * self._last_round_s)
        deadline = time.monotonic() + self.cfg.swarm.round_timeout
        while time.monotonic() < deadline and r not in proto.decisions:
            seen = proto.contributors(r)
            if trainers <= seen:
                return
            if seen and first_seen is None:
                first_seen = time.monotonic()
            if first_seen is not None and time.monotonic() - first_seen > allowance:
                log.info("round %d: abstaining without %d late trainer(s)", r, len(trainers - seen))
                return
            await asyncio.sleep(0.05)

    def _report(self, d: Decision) -> None:
        self._emit(
            "round",
            round=d.round,
            view=d.view,
            entries=len(d.entries),
            members=len(d.members),
            members_next=len(d.members_next),
            val_loss=None,
            voter=True,
        )
