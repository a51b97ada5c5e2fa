"""What one node knows of the round protocol, shared by all of its parts.

The round protocol (:class:`swarmlm.p2p.consensus.RoundProtocol`) is one object per node,
composed of one mixin per concern (normal case, view change, catch-up, membership changes,
equivocation). This module holds what they share:

* the agreed data: :class:`Entry`, :class:`Decision`, the per-round state :class:`_Round`,
  and the rules every honest node computes identically: :func:`quorum`, :func:`leader_of`;
* :class:`ProtocolCore`, the base of every mixin: the node's protocol state (typed, so
  each mixin is checked against it), the helpers all of them use (send, spawn, wait,
  proposal hashing and parsing, signing through the vote log) and a stub for each call
  one concern makes into another, so a mixin names what it needs from the others
  without importing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from swarmlm.p2p.certificates import FutureBuffer, hash_of_proposal
from swarmlm.p2p.errors import ConsensusError
from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.p2p.node_api import ProtocolNode
from swarmlm.p2p.votelog import VoteLog, VoteLogError, same_meaning

# every part of the round protocol logs under one name, the one operators already filter on
PROTOCOL_LOGGER = "swarmlm.p2p.consensus"
log = logging.getLogger(PROTOCOL_LOGGER)

MAX_BUFFERED = 20_000
FUTURE_PER_PEER_ROUND = 16  # a member sends a handful of messages per round and view
FUTURE_PER_PEER = 32


def quorum(n: int, threshold: float = 2 / 3) -> int:
    """Votes needed among ``n`` members: ``n - f`` with ``f = (n - 1) // 3`` faults, raised
    to ``ceil(threshold * n)`` (at most ``n``) when ``P2PConfig.consensus_threshold`` asks for
    more. Never below ``n - f``: two quorums must share an honest member (``2q - n > f``)."""
    safe = n - (n - 1) // 3
    return max(safe, min(n, math.ceil(threshold * n - 1e-9)))


def _distinct(peers: list[str]) -> list[str]:
    """``peers`` in order without repeats: a peer listed twice would be sent the same
    signed fetch twice, and the second copy looks like a replay to it (issue 17 #3)."""
    return list(dict.fromkeys(peers))


def leader_of(
    members: list[str], round: int, view: int, live: Collection[str] | None = None
) -> str:
    """The leader of ``(round, view)``: rotation over the members that have an entry in the
    previous round's decision (``live``), or over all members when ``live`` is None (the
    previous decision is unknown) or names none of them.

    Why (issue 17 #12): a crashed member contributes nothing, so it is absent from every
    decision after its crash and never leads again until it contributes; a crash costs at
    most one view change (the round it was due in, if it had still contributed to the round
    before). The rule reads only the previous decision, which every honest node (and a node
    catching up from certificates) holds identically: no extra agreed state, no recursion.
    A live member whose entry missed the previous proposal is skipped for one round only.
    """
    pool = members if live is None else [m for m in members if m in live]
    if not pool:
        pool = members
    return pool[(round + view) % len(pool)]


@dataclass(frozen=True)
class Entry:
    """One decided contribution: who contributed which payload (by SHA-256 digest)."""

    peer: str
    digest: bytes
    size: int


@dataclass
class Decision:
    """What round ``round`` decided; identical on every honest peer.

    ``entries`` is sorted by peer id; ``members`` is ``M_round`` and ``members_next`` is
    ``M_{round+1}``. ``certificate`` (proposal + q commits) lets others verify it.
    """

    round: int
    view: int
    entries: list[Entry]
    members: list[str]
    members_next: list[str]
    changes: list[dict[str, Any]]
    certificate: dict[str, Any]
    latency_s: float = 0.0
    # decided from its certificate without its payloads: the node was so far behind that the
    # members had likely forgotten them (keep_rounds); the application must sync its state
    # from the swarm instead of applying this round (issue 17 #2)
    skipped: bool = False
    # when this node decided it (its monotonic clock); 0 for one restored after a restart
    decided_at: float = 0.0

    @property
    def digests(self) -> list[bytes]:
        return [e.digest for e in self.entries]


@dataclass
class _Round:
    round: int
    members: list[str]
    t0: float = field(default_factory=time.monotonic)
    view: int = 0
    started: bool = False
    # contributors of the previous round's decision (leader rotation), None if unknown
    live: frozenset[str] | None = None
    contribs: dict[str, SignedMessage] = field(default_factory=dict)
    proposals: dict[int, SignedMessage] = field(default_factory=dict)
    # proposals named by a valid decision certificate, by hash: authoritative even when the
    # leader showed us a different (equivocating) proposal for the same view first
    certified: dict[bytes, SignedMessage] = field(default_factory=dict)
    votes: dict[tuple[str, int, bytes], dict[str, SignedMessage]] = field(default_factory=dict)
    sent: set[tuple[str, int]] = field(default_factory=set)
    prepared: dict[str, Any] | None = None
    prepared_view: int = -1
    viewchanges: dict[int, dict[str, SignedMessage]] = field(default_factory=dict)
    seen_votes: dict[tuple[str, int, str], SignedMessage] = field(default_factory=dict)
    quorum_at: float | None = None
    fetching: bool = False
    pulling: bool = False
    waiting: set[str] = field(default_factory=set)  # asked us for the decision before we had it
    # proposals that arrived while the leader rotation was unknown (we started at this
    # round without the previous decision), by (view, sender); re-checked once it is known
    parked: dict[tuple[int, str], SignedMessage] = field(default_factory=dict)
    decided: Decision | None = None
    abandoned: bool = False  # we caught up past it on a later certificate (never decided here)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    active: asyncio.Event = field(default_factory=asyncio.Event)  # a contribution arrived
    threshold: float = 2 / 3  # P2PConfig.consensus_threshold

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def open(self) -> bool:
        return self.decided is None and not self.abandoned

    @property
    def q(self) -> int:
        return quorum(self.n, self.threshold)


class ProtocolCore:
    """The state and helpers every part of :class:`~swarmlm.p2p.consensus.RoundProtocol`
    uses. State a single concern owns is set by that concern's ``_init_*`` method."""

    def __init__(
        self,
        node: ProtocolNode,
        genesis: list[str],
        start_round: int = 1,
        vote_log: VoteLog | None = None,
    ) -> None:
        if node.node_id not in genesis and genesis:
            log.info("node %s starts outside the genesis membership", node.identity.short_id)
        self.node = node
        self.cfg = node.config
        self.start_round = start_round
        self._members: dict[int, list[str]] = {start_round: sorted(set(genesis))}
        self.decisions: dict[int, Decision] = {}
        self.last_decided = start_round - 1
        self.rounds: dict[int, _Round] = {}
        # messages for rounds not open yet, bounded per peer and round, per peer and overall,
        # without duplicates; requests are kept apart in a small per-round set (issue 17 #5)
        self.future = FutureBuffer(FUTURE_PER_PEER_ROUND, FUTURE_PER_PEER, MAX_BUFFERED)
        self._early_reqs: dict[int, set[str]] = {}
        self._flood_charged: dict[str, float] = {}
        self.highest_seen = 0
        self.proofs: dict[str, dict[str, Any]] = {}
        # every slot we sign is made durable here before it is sent (issue 17 #10)
        self.vote_log = vote_log
        self.stats: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=1000)
        self._answered: dict[tuple[str, int], float] = {}
        # certificates of the decisions that changed the membership (round -> certificate),
        # complete from round _epochs_from on: what a node any distance behind needs to
        # verify its way forward, one membership change per exchange (_catchup_target)
        self.epoch_ends: dict[int, dict[str, Any]] = {}
        self._epochs_from = start_round
        # rounds we caught up past without deciding them: (first, last, their membership)
        self._jumps: deque[tuple[int, int, list[str]]] = deque(maxlen=64)
        self._round_payloads: dict[int, set[bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        # called with each Decision as it is made (e.g. to persist the resume point)
        self.decided_listeners: list[Callable[[Decision], None]] = []
        self._hash_cache: dict[bytes, bytes] = {}
        self._entry_cache: dict[bytes, list[Entry]] = {}

    # -- helpers -------------------------------------------------------------------------
    def _default_timeout(self) -> float:
        return self.cfg.round_timeout * 40

    async def _wait_for(self, cond: Any, deadline: float) -> None:
        while not cond():
            left = deadline - self.node.now()
            if left <= 0:
                raise ConsensusError("round did not decide before the timeout")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, msg: SignedMessage, peers: list[str]) -> None:
        """Every outgoing protocol message goes through here (Byzantine tests override it)."""
        self.node.broadcast(msg, [p for p in peers if p != self.node.node_id])

    def _phash(self, proposal: SignedMessage) -> bytes:
        h = self._hash_cache.get(proposal.sig)
        if h is None:
            h = hash_of_proposal(proposal)
            self._cache_put(self._hash_cache, proposal.sig, h)
        return h

    def _entries(self, proposal: SignedMessage) -> list[Entry]:
        """Entries of an already validated proposal, parsed once (signatures are costly)."""
        got = self._entry_cache.get(proposal.sig)
        if got is None:
            got = []
            for e in proposal.body["entries"]:
                c = open_signed(e[1])
                got.append(Entry(c.sender, c.body["digest"], c.body["size"]))
            self._cache_put(self._entry_cache, proposal.sig, got)
        return got

    @staticmethod
    def _cache_put(cache: dict[bytes, Any], key: bytes, value: Any) -> None:
        if len(cache) >= 256:
            cache.pop(next(iter(cache)))
        cache[key] = value

    def _held(self, st: _Round) -> list[str]:
        return [
            p
            for p, c in st.contribs.items()
            if c.body["digest"] in self.node.blobs and p not in self.proofs
        ]

    @staticmethod
    def _leader(st: _Round, view: int) -> str:
        return leader_of(st.members, st.round, view, st.live)

    def _leader_unknown(self, st: _Round) -> bool:
        """True while we cannot tell this round's leaders: we started (or restarted) at it,
        after round 1, without the previous round's decision, whose contributors the
        rotation runs over. Rotating over all members instead, a restarted node followed
        other leaders than its peers, refused their proposals and, when it was needed for a
        quorum, stopped the swarm for good (simulator seed 5002, issue 17). Until it knows,
        it asks for that decision (:meth:`CatchUp._learn_live`), neither proposes nor
        refuses proposals as "from a non-leader"."""
        return st.live is None and st.round > 1 and st.round - 1 not in self.decisions

    def _certified_leader_ok(self, st: _Round, view: int, sender: str) -> bool:
        """A proposal inside a quorum certificate: from the leader when we know the previous
        decision; from any member when we do not (a node that started at this round): its
        quorum of signatures, not the leader's identity, is what makes it unique."""
        if st.live is None and st.round - 1 not in self.decisions:
            return sender in st.members
        return sender == self._leader(st, view)

    def _sign_slot(
        self,
        kind: str,
        body: dict[str, Any],
        round: int,
        view: int = 0,
        prepared: dict[str, Any] | None = None,
    ) -> SignedMessage | None:
        """Sign ``body`` for the slot (kind, round, view), durably logged before it is sent.

        Why: a node restarted without its protocol state could sign a second, different
        message for a slot it signed before the crash, which honest peers prove as
        equivocation (issue 17 #10). With a vote log, a slot signed before is signed again
        with the *stored* body (a fresh sequence number, so the receivers' replay guard does
        not drop it as a replay of the pre-crash copy they may have missed; the same body is
        not equivocation); when the new body means something else it is logged and counted
        (``votelog_reused``) and the stored one is used. A round pruned from the log
        (unknown) is never signed in (None).
        """
        vl = self.vote_log
        if vl is None:
            return self.node.sign(kind, body, round)
        stored = vl.get(kind, round, view)
        if stored is not None:
            old = stored.message.body
            if not same_meaning(kind, old, body):
                self.stats["votelog_reused"] += 1
                log.warning(
                    "round %d view %d: %s differs from the one signed before a restart; "
                    "re-sending the stored one (never sign two for one slot)",
                    round,
                    view,
                    kind,
                )
            return self.node.sign(kind, old, round)
        if vl.forgotten(round):
            self.stats["votelog_refused"] += 1
            log.warning("round %d: below the vote log's floor; not signing a %s", round, kind)
            return None
        msg = self.node.sign(kind, body, round)
        try:
            vl.append(msg, view, prepared)  # fsync before the message can leave
            vl.maybe_prune(round)
        except VoteLogError as exc:
            self.stats["votelog_refused"] += 1
            log.error("not sending a %s in round %d: %s", kind, round, exc)
            return None
        return msg

    # -- provided by the concerns (consensus.RoundProtocol composes them) -----------------
    # inbound routing (consensus)
    def _handle(self, msg: SignedMessage, peer: str) -> None:
        raise NotImplementedError

    # normal case (normal_case)
    def _ensure_round(self, r: int) -> _Round | None:
        raise NotImplementedError

    def _progress(self, st: _Round) -> None:
        raise NotImplementedError

    def _on_propose(self, st: _Round, msg: SignedMessage, peer: str) -> None:
        raise NotImplementedError

    def _try_decide(self, st: _Round, view: int, h: bytes, commits: dict[str, Any]) -> None:
        raise NotImplementedError

    def _decide(
        self,
        st: _Round,
        prop: SignedMessage,
        view: int,
        cert: dict[str, Any],
        skipped: bool = False,
    ) -> None:
        raise NotImplementedError

    def _resend_contrib(self, st: _Round, peers: list[str]) -> None:
        raise NotImplementedError

    # view change (view_change)
    async def _timer(self, st: _Round) -> None:
        raise NotImplementedError

    def _enter_view(self, st: _Round, view: int, announce: bool) -> None:
        raise NotImplementedError

    def _restore_lock(self, st: _Round) -> None:
        raise NotImplementedError

    def _justification_for(
        self, st: _Round, view: int
    ) -> tuple[list[Any], dict[str, Any] | None] | None:
        raise NotImplementedError

    def _check_justification(self, st: _Round, msg: SignedMessage) -> None:
        raise NotImplementedError

    # catch-up (catchup)
    def _request_decided(self, r: int, peers: list[str] | None, force: bool = False) -> None:
        raise NotImplementedError

    def _answer_decided(self, peer: str, r: int) -> None:
        raise NotImplementedError

    # membership changes (membership_changes)
    def _changes_for(self, st: _Round) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _check_changes(
        self, st: _Round, changes: list[Any], who: str, n_entries: int | None = None
    ) -> None:
        raise NotImplementedError

    def _members_after(self, st: _Round, changes: list[dict[str, Any]]) -> list[str]:
        raise NotImplementedError

    # equivocation (equivocation)
    def _record_equivocation(self, a: SignedMessage, b: SignedMessage) -> None:
        raise NotImplementedError

    def _cross_check_votes(self, st: _Round, votes: list[SignedMessage]) -> None:
        raise NotImplementedError

    def _verify_proof(self, proof: Any) -> str | None:
        raise NotImplementedError
