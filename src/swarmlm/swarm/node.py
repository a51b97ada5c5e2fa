"""A real swarm peer: one asyncio loop for networking, training and aggregation off the loop.

:class:`SwarmNode` joins the p2p swarm (:class:`swarmlm.p2p.transport.P2PNode`), forms the
genesis membership, then per round ``r``:

1. runs the worker's local phase in a thread (inner AdamW steps / one gradient);
2. compresses and contributes it through :class:`swarmlm.p2p.consensus.RoundProtocol`;
3. once ``r`` is decided, applies the decided payloads in a thread (every honest peer gets
   bitwise-identical state); if the decided contributions were computed from a state that
   is not ours, fetches that state blob by its agreed digest from the members (verified
   chunks), loads it and applies the round again;
4. publishes its new state blob in the node's blob store under its digest, so a lagging
   peer can fetch it, and reports the round (JSON line in ``<out_dir>/swarm_rounds.jsonl``).

Rounds continue with whoever contributed: a crashed peer's entry is simply absent from the
decided set (the protocol decides with ``n - f`` members).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from swarmlm.p2p.consensus import Decision, RoundProtocol
from swarmlm.p2p.errors import ConsensusError, TransportError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.node_api import ProtocolNode
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.votelog import VoteLog
from swarmlm.privacy.accountant import PrivacyBudgetExhaustedError
from swarmlm.swarm.config import SwarmRunConfig
from swarmlm.swarm.engine import RoundReport
from swarmlm.swarm.errors import (
    EvictedError,
    OutOfSyncError,
    RoundClosedError,
    StateSyncError,
    SwarmError,
)
from swarmlm.swarm.membership import find_swarm, form_genesis
from swarmlm.swarm.worker import SwarmWorker
from swarmlm.train.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

KEEP_STATE_BLOBS = 3  # our recent state blobs stay fetchable for lagging peers


_P = ParamSpec("_P")
_T = TypeVar("_T")


class BlockingRunner(Protocol):
    """Runs one blocking worker call (torch compute, disk) for the event loop. The default,
    ``asyncio.to_thread``, keeps the loop serving messages meanwhile; the deterministic
    simulator runs it inline and charges the node virtual CPU time instead (a thread would
    make the schedule depend on the host)."""

    def __call__(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Awaitable[_T]: ...


class SwarmTransport(ProtocolNode, Protocol):
    """What SwarmNode needs of its node beyond the round protocol's interface: its own
    lifecycle (when it owns the node) and the counters it reports per round. The TLS
    :class:`P2PNode` and the simulator's node both satisfy it."""

    @property
    def bytes_sent(self) -> int: ...
    @property
    def bytes_sent_by_kind(self) -> Mapping[str, int]: ...
    @property
    def counters(self) -> Mapping[str, int]: ...
    @property
    def port(self) -> int: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass
class _Pending:
    """A contributed round whose decision has not been applied yet."""

    round: int
    task: asyncio.Task[Decision]
    payload: bytes
    compute_s: float


@dataclass
class SwarmResult:
    rounds: int = 0
    last_loss: float | None = None
    resyncs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def resume_point(
    resumed: tuple[int, list[str]],
    found: tuple[int, list[str]] | None,
    keep_rounds: int,
) -> tuple[int, list[str]]:
    """The first round, and its members, for a peer resumed from its checkpoint at round
    ``resumed[0]`` when the running swarm reports ``found`` (last decided round, members).

    Within ``keep_rounds // 2`` rounds of the swarm it replays the decisions it missed. Further
    behind, the members may have dropped those rounds' payloads (they keep ``keep_rounds``),
    and a decision cannot be applied without them: the peer would wait for ever (the
    integrated-network test once hung on round 52 so). It then starts at the swarm's head and
    fetches the agreed state there, as a joiner does.
    """
    if found is not None and found[0] - resumed[0] > keep_rounds // 2:
        return found[0] + 1, found[1]
    return resumed[0] + 1, resumed[1]


class SwarmNode:
    """One peer. ``events`` receives one dict per notable event (ready, genesis, round, done)."""

    def __init__(
        self,
        cfg: SwarmRunConfig,
        identity: NodeIdentity,
        out_dir: Path,
        *,
        events: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
        p2p: SwarmTransport | None = None,
        peer_filter: Callable[[str], bool] | None = None,
        run_blocking: BlockingRunner = asyncio.to_thread,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``p2p``: a node owned (started and stopped) by the caller, shared with other
        components; ``peer_filter``: which connected peers may be genesis members (an
        integrated node also connects to annotation-only nodes, which hold no rounds).
        ``run_blocking`` runs every blocking worker call, ``clock`` times phases and
        deadlines, ``wall_clock`` stamps events: the defaults are the host's (a thread, the
        monotonic and wall clocks); the simulator passes inline calls and virtual time."""
        self.resume = resume
        self.cfg = cfg
        self.identity = identity
        self.out_dir = out_dir
        self.events = events or (lambda ev: None)
        self._owns_node = p2p is None
        node: SwarmTransport = P2PNode(identity, cfg.p2p) if p2p is None else p2p
        self.node = node
        self._run = run_blocking
        self._clock = clock
        self._wall_clock = wall_clock
        self.peer_filter = peer_filter
        self.proto: RoundProtocol | None = None
        self.worker: SwarmWorker | None = None
        self._state_blobs: list[bytes] = []
        self._checkpointed = 0  # last round saved
        self._stopping = False
        self.result = SwarmResult()

    def _emit(self, event: str, **fields: Any) -> None:
        ev = {"event": event, "time": round(self._wall_clock(), 3), **fields}
        if event == "round":
            self.result.history.append(ev)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with (self.out_dir / "swarm_rounds.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(ev) + "\n")
        self.events(ev)

    async def run(self, stop: asyncio.Event | None = None) -> SwarmResult:
        """Train ``swarm.rounds`` rounds (or until ``stop`` is set); always stops the node."""
        stop = stop or asyncio.Event()
        if not self.resume and latest_checkpoint(self.out_dir) is not None:
            raise SwarmError(
                f"{self.out_dir} already holds checkpoints: pass --resume to continue that "
                "peer, or use another --out-dir"
            )
        self.worker = await self._run(
            SwarmWorker, self.cfg, self.identity.node_id, out_dir=self.out_dir
        )
        if self._owns_node:
            await self.node.start()
        self._emit(
            "ready",
            id=self.identity.node_id,
            port=self.node.port,
            shard=self.worker.shard,
            objective=self.cfg.swarm.objective,  # what this run trains, for the dashboard
        )
        stop_task = asyncio.create_task(stop.wait())
        try:
            work = asyncio.create_task(self._train())
            await asyncio.wait([work, stop_task], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                log.info("stop requested: abandoning the local phase, checkpointing")
                self._stopping = True  # polled between inner steps: the phase ends now
                if self.worker is not None:
                    self.worker.request_stop()  # and an evaluation between batches
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                await self._final_checkpoint()
            else:
                work.result()  # re-raise a training failure
                # Stay reachable briefly: slower peers may still fetch payloads or our state.
                await asyncio.wait([stop_task], timeout=min(self.cfg.p2p.round_timeout, 5.0))
            self._emit("done", rounds=self.result.rounds, resyncs=self.result.resyncs)
        finally:
            stop_task.cancel()
            if self.proto is not None:
                self.proto.close()
            if self._owns_node:
                await self.node.stop()
            await self._run(self.worker.close)
        return self.result

    async def _train(self) -> None:
        assert self.worker is not None
        sw = self.cfg.swarm
        resumed = await self._run(self.worker.resume_latest) if self.resume else None
        if resumed is not None:
            start, members = resumed[0] + 1, resumed[1]
            self._checkpointed = resumed[0]
            # a returning member: connect to anyone, then catch up from decisions
            await self._genesis(2, sw.genesis_timeout)
            found = await self._find_swarm(sw.genesis_timeout)
            start, members = resume_point(resumed, found, self.node.config.keep_rounds)
            if start != resumed[0] + 1:
                log.info(
                    "resumed round %d, the swarm is at %d: syncing its state",
                    resumed[0],
                    start - 1,
                )
        else:
            found = await self._find_swarm(sw.genesis_timeout)
            if found is not None:  # a swarm is running (or formed its genesis with us in it)
                start, members = found[0] + 1, found[1]
                if self.identity.node_id not in members:
                    log.info("joining the running swarm at round %d", start)
            else:
                start, members = 1, await self._genesis(sw.expect_peers, sw.genesis_timeout)
        # every slot this node signs, kept across restarts so a restarted node never signs a
        # different one (issue 17 #10); a fresh (not --resume) run starts a new log
        votes_path = self.out_dir / "votes.log"
        if not self.resume and votes_path.exists():
            votes_path.replace(votes_path.with_name("votes.log.prev"))
        votes = VoteLog(votes_path)
        self.proto = RoundProtocol(self.node, members, start_round=start, vote_log=votes)
        await self._run(self.worker.engine.state_digest)
        self._publish_state()
        initial = await self._run(self.worker.evaluate)
        self._emit("genesis", members=members, val_loss=initial, round=start - 1)
        await self._rounds(start)

    async def _rounds(self, start: int) -> None:
        """Rounds ``start..rounds``. Without overlap each round completes (decision, apply)
        before the next local phase; with overlap the next local phase runs first, so round
        r's communication overlaps round r + 1's compute and r + 1's update, computed from
        the state before r, is applied one round late."""
        assert self.worker is not None
        assert self.proto is not None
        if self.cfg.swarm.aggregation_layout == "partitioned":  # issue 19: swarm/partitioned.py
            from swarmlm.swarm.partitioned import PartitionedRounds

            await PartitionedRounds(self).run(start)
            return
        worker, proto, sw = self.worker, self.proto, self.cfg.swarm
        pending: _Pending | None = None
        try:
            for r in range(start, sw.rounds + 1):
                # (with overlap, round r - 1 may be undecided: the latest known membership)
                known = proto.members(r) or proto.members(proto.last_decided + 1) or ()
                joining = self.identity.node_id not in known
                if joining:
                    proto.request_join_if_needed()
                if pending is None and worker.engine.round < r - 1 and proto.last_decided > r:
                    continue  # our state must be fetched anyway: fetch the freshest one
                if joining or proto.highest_seen > r or r in proto.decisions:
                    # joining, or catching up after a restart: follow the swarm's decisions
                    # (the first one we apply resynchronises our state from the members)
                    if not await self._follow(r, pending):
                        return
                    pending = None
                    continue
                base = await self._run(worker.engine.state_digest)
                t0 = self._clock()
                try:
                    update = await self._run(
                        worker.local_phase, None, functools.partial(self._abandon, r)
                    )
                except RoundClosedError as exc:
                    # decided without us (we started late): follow it, be on time for r + 1
                    log.info("round %d: %s", r, exc)
                    if not await self._follow(r, pending):
                        return
                    pending = None
                    continue
                except PrivacyBudgetExhaustedError as exc:  # privacy.on_budget_spent = stop
                    log.warning("round %d: %s; this peer stops contributing", r, exc)
                    self._emit("privacy_budget_spent", round=r, reason=str(exc))
                    if pending is not None:
                        await self._complete(pending)
                    return
                t_compute = self._clock() - t0
                if pending is not None and not await self._complete(pending):
                    return
                payload = await self._run(worker.contribution, r, update, base)
                pending = _Pending(
                    r, asyncio.create_task(self._decide(r, payload)), payload, t_compute
                )
                if not sw.overlap:
                    done, pending = pending, None
                    if not await self._complete(done):
                        return
            if pending is not None:
                await self._complete(pending)
        finally:
            if pending is not None and not pending.task.done():
                pending.task.cancel()

    async def _follow(self, r: int, pending: _Pending | None) -> bool:
        """Complete ``pending``, then apply round ``r`` as decided without a contribution of
        ours. False when we are no longer a member."""
        assert self.proto is not None
        if pending is not None and not await self._complete(pending):
            return False
        task = asyncio.create_task(self.proto.decision(r, self.cfg.swarm.round_timeout))
        try:
            return await self._complete(_Pending(r, task, b"", 0.0))
        except StateSyncError as exc:
            if self.proto.last_decided <= r:
                raise
            # the members moved on and dropped that state: a later round names a fresh one
            log.warning("%s; syncing from a later round", exc)
            return True

    async def _find_swarm(self, timeout: float) -> tuple[int, list[str]] | None:
        """A running swarm's (last decided round, next members), asked of the first peers we
        reach; None at a fresh start, when no peer has a round protocol yet."""
        return await find_swarm(self.node, timeout)

    async def _genesis(self, expect: int, timeout: float) -> list[str]:
        return await form_genesis(self.node, expect, timeout, self.peer_filter)

    async def _complete(self, pending: _Pending) -> bool:
        """Wait for round ``pending.round``'s decision, apply it (resynchronising if needed),
        publish, evaluate, checkpoint and report. False when we are no longer a member."""
        assert self.worker is not None
        assert self.proto is not None
        worker, proto, r = self.worker, self.proto, pending.round
        t_wait = self._clock()
        try:
            decision = await pending.task
        except BaseException:
            pending.task.cancel()
            raise
        t_decided = self._clock()
        me = self.identity.node_id
        if decision.skipped:
            # we fell far behind and the protocol decided this round from its certificate
            # alone (members pruned its payloads, issue 17 #2): nothing to apply; the next
            # round we apply finds our state behind and fetches the agreed one (_resync)
            # instead of waiting swarm.round_timeout for payloads nobody serves any more
            log.info("round %d decided while we were far behind: state sync follows", r)
            self._emit("round_skipped", round=r)
            return not (me in decision.members and me not in decision.members_next)
        entries = []
        for e in decision.entries:
            data = await proto.fetch(e.digest, timeout=self.cfg.p2p.fetch_timeout)
            entries.append((e.peer, bytes(data)))
        resynced = False
        try:
            report = await self._run(worker.apply, r, entries, decision.members)
        except OutOfSyncError as exc:
            await self._resync(exc, decision.members)
            report = await self._run(worker.apply, r, entries, decision.members)
            resynced = True
        params_hash, _ = await self._run(
            lambda: (worker.params_sha256(), worker.engine.state_digest())
        )
        self._publish_state()
        self._explain_absence(report)
        self._vote_evictions(decision)
        t_applied = self._clock()
        loss = None
        if r % self.cfg.swarm.eval_every == 0 or r == self.cfg.swarm.rounds:
            loss = await self._run(worker.evaluate)
            self.result.last_loss = loss
        t_evaluated = self._clock()
        self.result.rounds = r
        if r % self.cfg.swarm.checkpoint_every == 0 or r == self.cfg.swarm.rounds:
            path = await self._run(worker.save_checkpoint, decision.members_next)
            self._checkpointed = r
            self._emit("checkpoint", round=r, path=str(path))
        t_saved = self._clock()
        self._emit(
            "round",
            round=r,
            params_sha256=params_hash,
            state=worker.engine.state_digest().hex(),
            val_loss=loss,
            train_loss=worker.last_loss,
            resynced=resynced,
            caught_up=not pending.payload,
            view=decision.view,
            members_next=len(decision.members_next),
            compute_s=round(pending.compute_s, 3),
            wait_s=round(t_decided - t_wait, 3),
            apply_s=round(t_applied - t_decided, 3),
            eval_s=round(t_evaluated - t_applied, 3),
            checkpoint_s=round(t_saved - t_evaluated, 3),
            bytes_sent=self.node.bytes_sent,
            blob_bytes_sent=self.node.bytes_sent_by_kind["blob"],
            fetch_bytes_served=self.node.counters["fetch_bytes_served"],
            pulls={k: v for k, v in self.proto.stats.items() if k.startswith("pulls_")},
            payload_bytes=len(pending.payload),
            privacy=worker.privacy_report(),  # this peer's (epsilon, delta) so far (issue 25)
            **_report_fields(report),
        )
        if me in decision.members and me not in decision.members_next:
            self._removed(decision)
            return False
        return True

    def _removed(self, decision: Decision) -> None:
        """We left the membership at round ``decision.round``. A voluntary leave stops the
        node quietly; an eviction raises :class:`EvictedError` saying why (the CLI exits
        non-zero with it), so an operator does not take a silent stop for a finished run."""
        assert self.worker is not None
        me, r = self.identity.node_id, decision.round
        change = next(
            (
                ch
                for ch in decision.changes
                if isinstance(ch, dict) and ch.get("peer") == me and ch.get("op") == "remove"
            ),
            None,
        )
        if change is None:
            log.warning("round %d removed us from the membership; stopping", r)
            return
        if "proof" in change:
            how = "an equivocation proof (two conflicting messages signed by us)"
        else:
            votes = change.get("votes")
            how = f"{len(votes) if isinstance(votes, list) else 'a quorum of'} members' votes"
        why = self.worker.engine.eviction_reason(me)
        reason = f"removed by {how}" + (f"; {why}" if why else "")
        self._emit("evicted", round=r, reason=reason)
        raise EvictedError(r, reason)

    def _abandon(self, r: int) -> bool:
        """Polled by the local phase: stop when round ``r`` closed without us, or on stop."""
        assert self.proto is not None
        return self._stopping or r in self.proto.decisions

    async def _final_checkpoint(self) -> None:
        """On a requested stop: checkpoint the last applied round unless already saved. The
        abandoned local phase is lost by design (its round goes on without us); an apply
        that was running finishes first (the worker's lock), so the state saved is a
        consensus state, never a half-applied one."""
        assert self.worker is not None
        worker = self.worker
        r = await self._run(lambda: worker.engine.round)
        if self.proto is None or r <= self._checkpointed or r == 0:
            return
        members = self.proto.members(r + 1) or self.proto.members(self.proto.last_decided + 1)
        path = await self._run(worker.save_checkpoint, list(members or []))
        self._checkpointed = r
        self._emit("checkpoint", round=r, path=str(path))

    def _explain_absence(self, report: RoundReport) -> None:
        """Refine the engine's "absent" (a member without an entry) with what only this node
        sees: a member we are connected to was alive but late (its contribution missed the
        decided set: a slow peer, or one that started its round late); one we are not
        connected to is down or unreachable. Local, for the log and the dashboard."""
        links, me = self.node.connections, self.identity.node_id
        for peer, why in list(report.left_out.items()):
            if why != "absent":
                continue
            if peer == me:
                report.left_out[peer] = (
                    "late: this node (its local phase missed the round, or it was catching up)"
                )
            elif peer in links:
                report.left_out[peer] = "late: connected, but no entry in the decided set"
            else:
                report.left_out[peer] = "absent: not connected"
        if report.left_out:
            log.info(
                "round %d left out %s",
                report.round,
                "; ".join(f"{p[:12]}: {why}" for p, why in sorted(report.left_out.items())),
            )

    def _vote_evictions(self, decision: Decision) -> None:
        """Reputation and evidence are consensus state (every in-sync peer computes the same
        scores and keeps the same evidence), so the members vote the same peers out: below
        ``evict_below``, or with ``evict_evidence`` pieces of evidence within the window;
        ``q`` votes make the protocol remove them."""
        assert self.worker is not None
        assert self.proto is not None
        me = self.identity.node_id
        if me not in decision.members_next:
            return
        engine = self.worker.engine
        for peer in decision.members_next:
            why = engine.eviction_reason(peer) if peer != me else None
            if why is not None:
                log.warning("voting to evict %s: %s", peer[:12], why)
                self.proto.vote_evict(peer)

    async def _decide(self, r: int, payload: bytes) -> Decision:
        assert self.proto is not None
        deadline = self._clock() + self.cfg.swarm.round_timeout
        while True:
            left = deadline - self._clock()
            if left <= 0:
                raise SwarmError(
                    f"round {r} did not decide within swarm.round_timeout="
                    f"{self.cfg.swarm.round_timeout:.0f} s"
                )
            try:
                return await self.proto.contribute(r, payload, timeout=min(left, 60.0))
            except ConsensusError:
                log.info("round %d: still undecided, waiting", r)

    async def _resync(self, exc: OutOfSyncError, members: list[str]) -> None:
        """Fetch the agreed state blob (verified against its digest by the transport), asking
        the peers that announced it first, and load it."""
        assert self.worker is not None
        me = self.identity.node_id
        holders = [p for p in exc.holders if p != me]
        order = holders + [p for p in members if p != me and p not in holders]
        log.warning("round %d: fetching the agreed state %s", exc.round, exc.digest.hex()[:12])
        deadline = self._clock() + 3 * self.cfg.p2p.fetch_timeout
        blob = None
        while blob is None and self._clock() < deadline:
            for peer in order:
                left = deadline - self._clock()
                if left <= 0:
                    break
                try:
                    blob = await self.node.fetch(
                        exc.digest, [peer], min(self.cfg.p2p.fetch_timeout, left)
                    )
                    break
                except TransportError:
                    continue
            else:
                await asyncio.sleep(0.2)
        if blob is None:
            raise StateSyncError(
                f"round {exc.round}: no member served the agreed state {exc.digest.hex()[:12]}"
            )
        await self._run(self.worker.load_state, bytes(blob), exc.digest)
        self.result.resyncs += 1

    def _publish_state(self) -> None:
        """Make our current state fetchable by digest; forget older ones (bounded memory)."""
        assert self.worker is not None
        engine = self.worker.engine
        digest = engine.state_digest()
        if digest not in self.node.blobs:
            self.node.blobs.put(digest, engine.state_blob())
            self._state_blobs.append(digest)
        while len(self._state_blobs) > KEEP_STATE_BLOBS:
            self.node.blobs.forget({self._state_blobs.pop(0)})


def _report_fields(report: RoundReport) -> dict[str, Any]:
    return {
        "entries": report.entries,
        "accepted": len(report.accepted),
        "stale": [p[:12] for p in report.stale],
        "invalid": {p[:12]: why for p, why in report.invalid.items()},
        "excluded": [p[:12] for p in report.excluded],
        "absent": [p[:12] for p in report.absent],
        "flagged": [p[:12] for p in report.flagged],
        "voters": [p[:12] for p in report.voters],
        "aggregate_norm": report.aggregate_norm,
        # verified objectives (ppo, grpo): rollouts recomputed per contributor, and the
        # evidence against each rejected one (its payload digest is in the certificate)
        "verified": {p[:12]: n for p, n in report.verified.items()},
        "rejected": {p: ev for p, ev in report.rejected.items()},
        # who is not in the aggregate and why (absent, late, stale, invalid, rejected,
        # excluded by reputation or by the reputation filter), and each accepted peer's
        # weight (samples covered, capped at the median; absent when all are equal)
        "filtered": [p[:12] for p in report.filtered],
        "replayed": [p[:12] for p in report.replayed],
        "evidence": {p[:12]: kind for p, kind in report.evidence.items()},
        "left_out": {p[:12]: why for p, why in report.left_out.items()},
        "weights": {p[:12]: w for p, w in report.weights.items()},
        "samples": {p[:12]: s for p, (s, _) in report.throughput.items()},
    }
