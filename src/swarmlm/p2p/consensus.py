"""The BFT round protocol: every honest peer decides the same set of contributions per round.

Summary (the full protocol, its messages and invariants are in docs/protocol.md):

* Membership ``M_r`` (sorted node ids) is fixed for round ``r``; ``n = |M_r|``,
  ``f = (n - 1) // 3``, quorum ``q = n - f`` (>= 2f + 1).
* Each member signs ``contrib(r, digest, size)`` and pushes its payload to every member.
* The leader of ``(r, view)`` is ``M_r[(r + view) % n]``. It proposes entries (one signed
  contribution per member, at least ``q`` of them, all payloads held) plus membership
  changes for ``r + 1``. ``h`` = hash of (round, entries, changes), independent of view.
* A member PREPAREs ``(r, view, h)`` once it holds every payload of the proposal; with ``q``
  PREPAREs it is *prepared* and COMMITs; with ``q`` COMMITs it decides. ``q`` COMMITs plus
  the proposal form a decision certificate anyone can verify and use to catch up.
* On timeout (``round_timeout * 2**view``, capped) a member sends VIEWCHANGE(view + 1)
  carrying its highest prepared certificate. The next leader proposes, with ``q``
  VIEWCHANGEs as justification, the entries of the highest prepared certificate among them,
  or its own set when there is none. ``f + 1`` VIEWCHANGEs for a higher view pull a member
  into that view.
* Two different signed contributions, proposals or votes from one peer for the same round
  (and view) form an equivocation proof; proofs are gossiped and the next proposal removes
  the offender from ``M_{r+1}``.
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

from swarmlm.p2p.certificates import (
    Admit,
    FutureBuffer,
    check_body,
    check_decision_certificate,
    check_entries_shape,
    check_members_hash,
    hash_of_proposal,
    members_hash,
    peek_signer,
    precheck_signers,
)
from swarmlm.p2p.errors import ConsensusError, MessageRejectedError, TransportError
from swarmlm.p2p.membership import (
    AdmissionPolicy,
    JoinTable,
    check_join_change,
    joiner_is_live,
    mint_pow,
)
from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.votelog import VoteLog, VoteLogError, same_meaning
from swarmlm.p2p.wire import DIGEST_SIZE, Payload, digest_of

log = logging.getLogger(__name__)

VOTE_KINDS = ("prepare", "commit")
ROUND_KINDS = ("contrib", "propose", "prepare", "commit", "viewchange", "decided_req", "decided")
MAX_VIEW_TIMEOUT_FACTOR = 8
LOOKAHEAD_ROUNDS = 4
MAX_BUFFERED = 20_000
MAX_WAITING = 256  # peers waiting for one round's certificate
FUTURE_PER_PEER_ROUND = 16  # a member sends a handful of messages per round and view
FUTURE_PER_PEER = 32
MAX_ANSWERED = 1024
KEEP_DECISIONS = 256  # decision certificates kept for catch-up, per round
MAX_EPOCH_ENDS = 1024  # certificates of membership-changing decisions kept beyond that
MAX_REQUESTED = 256  # throttle entries of our own decided_req
EVICT_VOTE_ROUNDS = 16  # an eviction vote older than this many rounds no longer counts


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


class RoundProtocol:
    """One node's side of the round protocol, on top of a started :class:`P2PNode`.

    Public API (what the swarm trainer uses):
      * ``await contribute(r, payload) -> Decision``: sign and push our payload for round
        ``r``, wait until ``r`` decides (raises ConsensusError after ``timeout``).
      * ``await decision(r)``: wait for round ``r`` without contributing.
      * ``await fetch(digest) -> bytes``: a decided payload, from any member that has it.
      * ``request_join()`` / ``request_leave()``: membership changes, applied at the
        boundary after the round whose decision includes them.
      * ``members(r)``: the agreed membership of round ``r`` once known.
    All methods run on the node's loop; hashing of large payloads happens in a thread.
    """

    def __init__(
        self,
        node: P2PNode,
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
        # joiners and the members' acks of their liveness (swarmlm.p2p.membership)
        self.join_requests = JoinTable(self.cfg.max_join_requests, self.cfg.join_request_ttl)
        self.admission = AdmissionPolicy.from_config(self.cfg)
        self._connected_since: dict[str, float] = {p: time.monotonic() for p in node.connections}
        self._join_nonce: bytes | None = None
        self._minting = False
        self._joining = False  # we asked to join and are not a member yet
        self._join_sent = 0.0
        self.leave_requests: dict[str, dict[str, Any]] = {}
        self.evict_votes: dict[str, dict[str, SignedMessage]] = {}  # target -> voter -> vote
        self.stats: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=1000)
        self._answered: dict[tuple[str, int], float] = {}
        # highest round each peer is known to have decided (or to be about to: it committed)
        self.peer_round: dict[str, int] = {}
        # our decided_req throttle: (round, peer) -> when; peer "" = the ask of every member
        self._requested: dict[tuple[int, str], float] = {}
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
        for kind in (*ROUND_KINDS, "equivocation", "join", "join_ack", "leave", "evict"):
            node.on(kind, self._on_message)
        node.connect_listeners.append(self._on_link_up)
        node.disconnect_listeners.append(self._on_link_down)
        node.on("status_req", self._on_status_req)
        self._status_sent: dict[str, float] = {}
        node.blobs.on_put.append(self._on_blob)
        node.on_peer_connected = self._on_peer_connected
        self._ensure_round(start_round)
        self._spawn(self._membership_loop())

    # -- public API ----------------------------------------------------------------------
    def members(self, round: int) -> list[str] | None:
        return self._members.get(round)

    async def contribute(
        self, round: int, payload: bytes, timeout: float | None = None
    ) -> Decision:
        if round in self.decisions:
            return self.decisions[round]
        if round < self.last_decided:
            raise ConsensusError(
                f"round {round} is older than the decided round {self.last_decided}"
            )
        timeout = timeout if timeout is not None else self._default_timeout()
        deadline = time.monotonic() + timeout
        await self._wait_for(lambda: round in self.rounds or round <= self.last_decided, deadline)
        if round <= self.last_decided:
            return await self.decision(round, max(deadline - time.monotonic(), 0.0))
        st = self.rounds[round]
        me = self.node.node_id
        if me in st.members and not st.started:
            st.started = True
            if len(payload) > 1 << 20:
                digest = await asyncio.to_thread(digest_of, payload)
            else:
                digest = digest_of(payload)
            self.node.blobs.put(digest, payload)
            self._round_payloads.setdefault(round, set()).add(digest)
            signed = self._sign_slot("contrib", {"digest": digest, "size": len(payload)}, round)
            if signed is None:
                return await self.decision(round, max(deadline - time.monotonic(), 0.0))
            msg = signed
            st.contribs[me] = msg
            st.active.set()
            self._send(msg, st.members)
            if msg.body["digest"] == digest:  # else: our pre-restart contribution stands
                self._push_payload(st, digest, payload)
            self._progress(st)
        return await self.decision(round, max(deadline - time.monotonic(), 0.0))

    async def decision(self, round: int, timeout: float | None = None) -> Decision:
        """Round ``round``'s decision once made here. A round this node moved past without
        deciding it (it caught up on a later certificate, or the round was pruned) gives a
        Decision with ``skipped=True``, no entries and an empty certificate at once: the
        application syncs its state instead of applying it."""
        timeout = timeout if timeout is not None else self._default_timeout()
        deadline = time.monotonic() + timeout
        await self._wait_for(
            lambda: round in self.decisions or round <= self.last_decided, deadline
        )
        if round in self.decisions:
            return self.decisions[round]
        members = self._members.get(round) or next(
            (m for first, last, m in self._jumps if first <= round <= last), []
        )
        return Decision(round, -1, [], members, members, [], {}, skipped=True)

    async def fetch(self, digest: bytes, timeout: float | None = None) -> Payload:
        peers = self._members.get(self.last_decided + 1) or []
        return await self.node.fetch(digest, peers, timeout)

    def contributors(self, round: int) -> set[str]:
        """Members whose signed contribution to ``round`` we hold (a voter waits for them)."""
        st = self.rounds.get(round)
        return set(st.contribs) if st is not None else set()

    def request_join(self) -> None:
        """Ask the members we are connected to to add us at the next round boundary. They
        acknowledge us once our connection to them has been up ``join_min_connected``; a
        leader admits us with a quorum of those acks. Under the ``pow`` policy the first
        call mints the proof of work off the loop and sends once it is ready."""
        self._joining = True
        # an observer hears no votes and would ask for the round's decision only after
        # round_timeout; by then the members may have pruned its payloads (keep_rounds)
        self._request_decided(self.last_decided + 1, None)
        if self.admission.kind == "pow" and self._join_nonce is None:
            self._spawn(self._mint_and_join())
            return
        self._join_sent = time.monotonic()
        self._send(self._join_request(), list(self.node.connections))

    def _join_request(self) -> SignedMessage:
        return self.node.sign("join", {"nonce": self._join_nonce or b""})

    async def _mint_and_join(self) -> None:
        if self._join_nonce is not None or self._minting:
            return
        self._minting = True
        try:
            pk, bits = self.node.identity.public_key_bytes, self.admission.pow_bits
            self._join_nonce = await asyncio.to_thread(mint_pow, pk, bits)
        finally:
            self._minting = False
        self.request_join()

    def vote_evict(self, peer: str) -> None:
        """Vote to remove member ``peer`` (the application's reason, e.g. its reputation fell
        below a threshold). ``q`` signed votes from members justify a ``remove`` change that
        every member can verify, so no single peer can evict anyone. Call it again each round
        while the reason holds: votes expire after ``EVICT_VOTE_ROUNDS`` rounds."""
        members = self._members.get(self.last_decided + 1) or []
        if peer not in members or self.node.node_id not in members:
            return
        msg = self.node.sign("evict", {"peer": peer}, self.last_decided)
        self.evict_votes.setdefault(peer, {})[msg.sender] = msg
        self._send(msg, members)

    def request_leave(self) -> None:
        members = self._members.get(self.last_decided + 1) or []
        self._send(self.node.sign("leave", {}), members)

    def request_join_if_needed(self) -> bool:
        """Repeat our join request while we are not a member of the next round (a request
        can be lost, or left out of a full proposal); True once we are a member."""
        members = self._members.get(self.last_decided + 1) or []
        if self.node.node_id in members:
            return True
        self.request_join()
        return False

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(ValueError):
            self.node.connect_listeners.remove(self._on_link_up)
        with contextlib.suppress(ValueError):
            self.node.disconnect_listeners.remove(self._on_link_down)
        if self.vote_log is not None:
            with contextlib.suppress(VoteLogError):
                self.vote_log.close()  # nothing signed after this can be sent

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "last_decided": self.last_decided,
            "members": len(self._members.get(self.last_decided + 1) or []),
            "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            "latency_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1)
            if lat
            else None,
            "equivocators": sorted(p[:12] for p in self.proofs),
            **dict(self.stats),
        }

    # -- helpers -------------------------------------------------------------------------
    def _default_timeout(self) -> float:
        return self.cfg.round_timeout * 40

    async def _wait_for(self, cond: Any, deadline: float) -> None:
        while not cond():
            left = deadline - time.monotonic()
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

    def _push_payload(self, st: _Round, digest: bytes, payload: bytes) -> None:
        for peer in st.members:
            if peer != self.node.node_id:
                self._spawn(self._push_one(peer, digest, payload))

    async def _push_one(self, peer: str, digest: bytes, payload: Payload) -> None:
        with contextlib.suppress(TransportError, TimeoutError):
            await self.node.send_blob(peer, digest, payload)

    def _ensure_round(self, r: int) -> _Round | None:
        if r in self.rounds:
            return self.rounds[r]
        members = self._members.get(r)
        if members is None or r <= self.last_decided:
            return None
        st = _Round(r, members, threshold=self.cfg.consensus_threshold)
        prev = self.decisions.get(r - 1)
        if prev is not None:
            st.live = frozenset(e.peer for e in prev.entries)
        self._restore_lock(st)
        self.rounds[r] = st
        self._spawn(self._timer(st))
        st.waiting.update(self._early_reqs.pop(r, set()))
        for msg, peer in self.future.pop(r):
            self._handle(msg, peer)
        self._changed.set()
        return st

    # -- inbound -------------------------------------------------------------------------
    def _on_message(self, msg: SignedMessage, peer: str) -> None:
        if msg.kind == "equivocation":
            self._on_equivocation(msg)
        elif msg.kind in ("join", "leave", "join_ack"):
            self._on_membership_request(msg)
        elif msg.kind == "evict":
            members = self._members.get(self.last_decided + 1) or []
            if msg.sender in members and msg.body["peer"] in members:
                self.evict_votes.setdefault(msg.body["peer"], {})[msg.sender] = msg
            else:
                self.stats["dropped_evict"] += 1
        else:
            self._handle(msg, peer)

    def _handle(self, msg: SignedMessage, peer: str) -> None:
        # ranges, lengths and nested shapes first, whatever the round: a malformed but
        # signed message costs its sender even when it would be buffered or ignored (#11)
        check_body(msg)
        r = msg.round
        if msg.kind == "decided":
            self._on_decided(msg, peer)
            return
        if msg.sender in (self._members.get(r) or ()):
            self._note_progress(msg.sender, r if msg.kind == "commit" else r - 1)
        if r <= self.last_decided:
            # a late contribution or vote, or a request: the sender missed the decision
            # (decided here, or pruned: then a later certificate may still serve it)
            self._answer_decided(peer, r)
            return
        st = self.rounds.get(r)
        if st is None:
            members = self._members.get(r - 1) or self._members.get(self.last_decided + 1) or []
            if msg.sender in members:
                self.highest_seen = max(self.highest_seen, r)
            if not self.last_decided < r <= self.last_decided + LOOKAHEAD_ROUNDS:
                # a round that will never open here (pruned, 0, or far ahead): nothing to keep
                self.stats["dropped_future"] += 1
            elif msg.kind == "decided_req":
                # never in the buffer: a small per-round set of who asked, moved to the
                # round's waiting list when it opens
                waiting = self._early_reqs.setdefault(r, set())
                if len(waiting) < MAX_WAITING:
                    waiting.add(peer)
            else:
                admit = self.future.add(r, msg, peer)
                self.stats[f"future_{admit.value}"] += 1
                if admit is Admit.PEER_FULL:
                    self._charge_flood(peer, f"{peer[:12]} over its future-round share")
                elif admit is Admit.BUFFERED and msg.kind == "contrib" and msg.sender in members:
                    # its payload follows right behind; accept it before the round opens
                    self.node.blobs.expect(msg.body["digest"])
                    self._round_payloads.setdefault(r, set()).add(msg.body["digest"])
            if r > self.last_decided + 1:
                self._request_decided(self.last_decided + 1, [peer])
            return
        if msg.kind == "decided_req":
            # members and observers (joiners) alike get the certificate once we have it
            if len(st.waiting) < MAX_WAITING:
                st.waiting.add(peer)
            return
        if msg.sender not in st.members:
            self.stats["dropped_nonmember"] += 1
            return
        self.highest_seen = max(self.highest_seen, r)
        handler = {
            "contrib": self._on_contrib,
            "propose": self._on_propose,
            "prepare": self._on_vote,
            "commit": self._on_vote,
            "viewchange": self._on_viewchange,
        }[msg.kind]
        handler(st, msg, peer)
        self._progress(st)

    @property
    def n_buffered(self) -> int:
        """Messages held for rounds that are not open yet."""
        return len(self.future)

    def _charge_flood(self, peer: str, why: str) -> None:
        """Penalise a peer that exceeds its share of a bounded table, at most once a second
        (a modest, steady charge: an honest burst at a round boundary costs little)."""
        now = time.monotonic()
        if now - self._flood_charged.get(peer, -1e9) < 1.0:
            return
        if len(self._flood_charged) >= self.cfg.max_peers:
            self._flood_charged.clear()
        self._flood_charged[peer] = now
        self.stats["flood_charges"] += 1
        log.info("flood: %s", why)
        self.node.scores.penalize(peer, "flood")

    def _on_contrib(self, st: _Round, msg: SignedMessage, peer: str) -> None:
        digest, size = msg.body["digest"], msg.body["size"]
        if len(digest) != DIGEST_SIZE or not 0 <= size <= self.cfg.max_blob:
            raise MessageRejectedError("invalid", f"contrib from {peer[:12]}: bad digest or size")
        old = st.contribs.get(msg.sender)
        if old is not None:
            if old.body["digest"] != digest:
                self._record_equivocation(old, msg)
            return
        st.contribs[msg.sender] = msg
        st.active.set()
        self.node.blobs.expect(digest)
        self._round_payloads.setdefault(st.round, set()).add(digest)
        if self.node.blobs.refused.pop(digest, 0) is None:
            # its payload raced ahead of this announcement (or of our protocol start) and was
            # refused: the sender will not push it again, so ask for it now
            self.stats["pulls_after_refusal"] += 1
            self._spawn(self._fetch_one(st, digest, [msg.sender]))

    async def _fetch_one(self, st: _Round, digest: bytes, peers: list[str]) -> None:
        with contextlib.suppress(TransportError):
            await self.node.fetch(digest, _distinct([*peers, *st.members]), self.cfg.fetch_timeout)

    def _on_vote(self, st: _Round, msg: SignedMessage, peer: str) -> None:
        view, h = msg.body["view"], msg.body["h"]
        key = (msg.kind, view, msg.sender)
        old = st.seen_votes.get(key)
        if old is not None:
            if old.body["h"] != h:
                self._record_equivocation(old, msg)
            return
        st.seen_votes[key] = msg
        st.votes.setdefault((msg.kind, view, h), {})[msg.sender] = msg

    def _on_propose(self, st: _Round, msg: SignedMessage, peer: str) -> None:
        view = msg.body["view"]
        old = st.proposals.get(view)
        if old is not None:
            if self._phash(old) != self._phash(msg):
                self._record_equivocation(old, msg)
            return
        if view < st.view:
            return
        self._check_proposal(st, msg)
        st.proposals[view] = msg
        if view > st.view:
            self._enter_view(st, view, announce=False)

    def _on_viewchange(self, st: _Round, msg: SignedMessage, peer: str) -> None:
        view = msg.body["view"]
        if view <= 0 or view > st.view + 64:
            raise MessageRejectedError("invalid", f"viewchange to view {view} from {peer[:12]}")
        prepared = msg.body["prepared"]
        if prepared is not None:
            self._check_prepared_cert(st, prepared)
        st.viewchanges.setdefault(view, {})[msg.sender] = msg
        higher = {v for v, vcs in st.viewchanges.items() if v > st.view and len(vcs) > st.n - st.q}
        if higher:
            self._enter_view(st, min(higher), announce=True)

    def _on_blob(self, digest: bytes) -> None:
        for st in list(self.rounds.values()):
            if st.decided is None:
                self._progress(st)

    # -- validation ----------------------------------------------------------------------
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

    def _check_proposal(self, st: _Round, msg: SignedMessage) -> None:
        """Raise MessageRejectedError unless ``msg`` is a valid proposal for ``st``."""
        b, view = msg.body, msg.body["view"]
        who = msg.sender[:12]
        if view < 0 or msg.sender != self._leader(st, view):
            raise MessageRejectedError("invalid", f"proposal from non-leader {who}, view {view}")
        check_members_hash(msg, st.members, f"proposal from {who}")
        entries = b["entries"]
        if not st.q <= len(entries) <= st.n:
            raise MessageRejectedError("invalid", f"proposal from {who} has {len(entries)} entries")
        check_entries_shape(entries, who)  # before any contribution's signature
        peers = []
        for e in entries:
            if not isinstance(e, list) or len(e) != 2:
                raise MessageRejectedError("invalid", f"proposal from {who}: malformed entry")
            c = open_signed(e[1])
            if c.kind != "contrib" or c.round != st.round or c.sender != e[0]:
                raise MessageRejectedError("invalid", f"proposal from {who}: bad contribution")
            if c.sender not in st.members:
                raise MessageRejectedError("invalid", f"proposal from {who}: non-member entry")
            mine = st.contribs.get(c.sender)
            if mine is not None and mine.body["digest"] != c.body["digest"]:
                self._record_equivocation(mine, c)  # it told the leader something else
            elif mine is None:
                st.contribs[c.sender] = c
                st.active.set()
                self.node.blobs.expect(c.body["digest"])
                self._round_payloads.setdefault(st.round, set()).add(c.body["digest"])
            peers.append(c.sender)
        if peers != sorted(set(peers)):
            raise MessageRejectedError("invalid", f"proposal from {who}: entries unsorted/dup")
        self._check_changes(st, b["changes"], who, len(entries))
        if view == 0:
            if b["justify"]:
                raise MessageRejectedError("invalid", f"view-0 proposal from {who} has justify")
            return
        senders: set[str] = set()
        best: dict[str, Any] | None = None
        best_view = -1
        precheck_signers(b["justify"], st.members, f"justification of view {view}")
        for w in b["justify"]:
            vc = open_signed(w)
            if vc.kind != "viewchange" or vc.round != st.round or vc.body["view"] != view:
                raise MessageRejectedError("invalid", f"proposal from {who}: bad justification")
            if vc.sender not in st.members:
                raise MessageRejectedError("invalid", f"proposal from {who}: non-member vc")
            senders.add(vc.sender)
            prep = vc.body["prepared"]
            if prep is not None:
                pv = self._check_prepared_cert(st, prep)
                if pv > best_view:
                    best, best_view = prep, pv
        if len(senders) < st.q:
            raise MessageRejectedError("invalid", f"proposal from {who}: {len(senders)} vcs < q")
        if best is not None:
            want = self._phash(open_signed(best["proposal"]))
            if self._phash(msg) != want:
                raise MessageRejectedError(
                    "invalid", f"proposal from {who} ignores the highest prepared certificate"
                )

    def _check_prepared_cert(self, st: _Round, cert: dict[str, Any]) -> int:
        """Validate {proposal, votes}; returns the view it prepared in."""
        try:
            # who signed, checked before any signature: a certificate padded with duplicate,
            # surplus or non-member votes costs its sender, not our CPU (issue 17 #7)
            precheck_signers(cert["votes"], st.members, "prepared certificate")
            prop = open_signed(cert["proposal"])
            votes = [open_signed(v) for v in cert["votes"]]
        except (KeyError, TypeError):
            raise MessageRejectedError("invalid", "prepared certificate malformed") from None
        if prop.kind != "propose" or prop.round != st.round:
            raise MessageRejectedError("invalid", "prepared certificate without a proposal")
        check_members_hash(prop, st.members, "prepared certificate")
        view = prop.body["view"]
        if not self._certified_leader_ok(st, view, prop.sender):
            raise MessageRejectedError("invalid", "prepared certificate from a non-leader")
        h = self._phash(prop)
        self._cross_check_votes(st, votes)
        voters = {
            v.sender
            for v in votes
            if v.kind == "prepare"
            and v.round == st.round
            and v.body["view"] == view
            and v.body["h"] == h
            and v.sender in st.members
        }
        if len(voters) < st.q:
            raise MessageRejectedError("invalid", f"prepared certificate has {len(voters)} votes")
        return int(view)

    def _check_changes(
        self, st: _Round, changes: list[Any], who: str, n_entries: int | None = None
    ) -> None:
        seen: set[str] = set()
        joins = 0
        for ch in changes:
            if not isinstance(ch, dict) or ch.get("op") not in ("remove", "join", "leave"):
                raise MessageRejectedError("invalid", f"proposal from {who}: bad change")
            peer = ch.get("peer")
            if not isinstance(peer, str) or peer in seen:
                raise MessageRejectedError("invalid", f"proposal from {who}: bad change peer")
            seen.add(peer)
            if ch["op"] == "remove":
                if peer not in st.members:
                    raise MessageRejectedError("invalid", f"proposal from {who}: bad removal")
                if "votes" in ch:
                    if self._evict_voters(st, peer, ch["votes"]) < st.q:
                        raise MessageRejectedError("invalid", f"proposal from {who}: few votes")
                elif self._verify_proof(ch.get("proof")) != peer:
                    raise MessageRejectedError("invalid", f"proposal from {who}: bad proof")
            elif ch["op"] == "join":
                joins += 1
                if joins > self.cfg.max_joins_per_round:
                    raise MessageRejectedError("invalid", f"proposal from {who}: too many joins")
                if n_entries is not None and n_entries < st.n:
                    raise MessageRejectedError(
                        "invalid", f"proposal from {who}: a join without every member's entry"
                    )
                try:
                    # the policy was applied by the q members that acked (never here)
                    check_join_change(ch, st.members, st.round, st.q)
                except MessageRejectedError as exc:
                    detail = f"proposal from {who}: {exc.detail}"
                    raise MessageRejectedError("invalid", detail) from None
            else:
                req = open_signed(ch.get("req"))
                if req.kind != ch["op"] or req.sender != peer:
                    raise MessageRejectedError("invalid", f"proposal from {who}: bad request")
                if peer not in st.members:
                    raise MessageRejectedError("invalid", f"proposal from {who}: no-op change")
        if [c["peer"] for c in changes] != sorted(seen):
            raise MessageRejectedError("invalid", f"proposal from {who}: changes unsorted")

    def _evict_voters(self, st: _Round, peer: str, votes: Any) -> int:
        """Distinct members of round ``st`` whose recent signed votes evict ``peer``."""
        if not isinstance(votes, list) or len(votes) > st.n:
            return 0
        try:  # duplicate or non-member voters: refused before any signature check
            precheck_signers(votes, st.members, f"removal of {peer[:12]}")
        except MessageRejectedError:
            return 0
        voters = set()
        for wire in votes:
            v = open_signed(wire)
            if v.kind == "evict" and v.body["peer"] == peer and self._counts_for(st, v):
                voters.add(v.sender)
        return len(voters)

    @staticmethod
    def _counts_for(st: _Round, vote: SignedMessage) -> bool:
        """An eviction vote counts in round ``st``: from a member, and recent."""
        return vote.sender in st.members and st.round - EVICT_VOTE_ROUNDS <= vote.round < st.round

    def _cross_check_votes(self, st: _Round, votes: list[SignedMessage]) -> None:
        """Votes relayed inside certificates can expose a peer that voted two ways."""
        for v in votes:
            if v.kind in VOTE_KINDS and v.round == st.round:
                mine = st.seen_votes.get((v.kind, v.body["view"], v.sender))
                if mine is not None and mine.body["h"] != v.body["h"]:
                    self._record_equivocation(mine, v)

    # -- equivocation --------------------------------------------------------------------
    def _verify_proof(self, proof: Any) -> str | None:
        """The offender's id if ``proof`` holds two conflicting signed messages, else None."""
        try:
            a, b = open_signed(proof["a"]), open_signed(proof["b"])
        except (MessageRejectedError, KeyError, TypeError):
            return None
        if a.sender != b.sender or a.kind != b.kind or a.round != b.round or a.raw == b.raw:
            return None
        if a.kind == "contrib":
            return a.sender if a.body["digest"] != b.body["digest"] else None
        if a.kind in VOTE_KINDS:
            same_view = a.body["view"] == b.body["view"]
            return a.sender if same_view and a.body["h"] != b.body["h"] else None
        if a.kind == "propose":
            same_view = a.body["view"] == b.body["view"]
            return a.sender if same_view and self._phash(a) != self._phash(b) else None
        return None

    def _knows(self, peer: str) -> bool:
        """A peer whose equivocation matters to us: a member of a round we track, or a
        peer we are connected to. Proofs against anyone else are not kept (issue 17 #8)."""
        return peer in self.node.connections or any(peer in m for m in self._members.values())

    def _record_equivocation(self, a: SignedMessage, b: SignedMessage) -> None:
        # one proof per offender, only for peers we know, at most max_peers of them
        if a.sender in self.proofs or not self._knows(a.sender):
            return
        if len(self.proofs) >= self.cfg.max_peers:
            self.stats["dropped_proofs"] += 1
            return
        proof = {"a": a.to_wire(), "b": b.to_wire()}
        if self._verify_proof(proof) != a.sender:
            return
        self.proofs[a.sender] = proof
        self.node.scores.penalize(a.sender, "equivocation")
        self.stats["equivocations"] += 1
        log.warning("peer %s equivocated in round %d (%s)", a.sender[:12], a.round, a.kind)
        members = self._members.get(self.last_decided + 1) or []
        self._send(self.node.sign("equivocation", proof), members)

    def _on_equivocation(self, msg: SignedMessage) -> None:
        claimed = peek_signer(msg.body.get("a")) if isinstance(msg.body, dict) else None
        if claimed is not None and (claimed in self.proofs or not self._knows(claimed)):
            # already proven, or a stranger: no signature checked, nothing stored
            self.stats["ignored_proofs"] += 1
            return
        offender = self._verify_proof(msg.body)
        if offender is None:
            raise MessageRejectedError("invalid", f"equivocation proof from {msg.sender[:12]}")
        if offender not in self.proofs:
            a, b = open_signed(msg.body["a"]), open_signed(msg.body["b"])
            self._record_equivocation(a, b)

    def _on_status_req(self, msg: SignedMessage, peer: str) -> None:
        """Tell a (prospective) joiner where the swarm is: our last decided round and the
        membership of the next one. At most one answer per peer and second."""
        now = time.monotonic()
        if now - self._status_sent.get(peer, -1e9) < 1.0:
            return
        if len(self._status_sent) >= self.cfg.max_peers:
            self._status_sent.clear()
        self._status_sent[peer] = now
        members = self._members.get(self.last_decided + 1) or []
        self.node.send(peer, self.node.sign("status", {"members": members}, self.last_decided))

    def _on_membership_request(self, msg: SignedMessage) -> None:
        """``join`` (from a would-be member), ``join_ack`` (a member vouches that a joiner is
        live) and ``leave`` (from a member). Requests of keys the admission policy refuses,
        and acks from non-members, count against their sender."""
        members = self._members.get(self.last_decided + 1) or []
        now = time.monotonic()
        if msg.kind == "leave":
            if msg.sender in members and len(self.leave_requests) < self.cfg.max_peers:
                self.leave_requests[msg.sender] = msg.to_wire()
            return
        if msg.kind == "join_ack":
            # not charged: a member behind or ahead of us sends acks we cannot place yet
            if msg.sender in members and msg.body["peer"] not in members:
                self.join_requests.add_ack(msg, now)
            else:
                self.stats["dropped_join_ack"] += 1
            return
        if msg.sender in members:
            return  # a member already (its request crossed the decision that added it)
        why = self.admission.refusal(msg)
        if why is not None:
            raise MessageRejectedError("invalid", why)
        if msg.sender not in self.join_requests:
            log.info("join request from %s", msg.sender[:12])
        self.join_requests.add_request(msg, now)
        self._ack_joiners()

    # -- membership: acknowledging live joiners ------------------------------------------
    def _on_link_up(self, peer: str) -> None:
        self._connected_since.setdefault(peer, time.monotonic())
        # A member (re)connecting while our round has been open longer than a timeout (we
        # were paused, partitioned or restarted) or after we saw later rounds: ask it for
        # the round now, on the new connection; earlier asks may have gone out on the dead
        # one (a resumed node lost ~1 s, 4 rounds, so: issue 17 #2).
        r = self.last_decided + 1
        st = self.rounds.get(r)
        if peer in (self._members.get(r) or ()) and (
            self.highest_seen > r
            or (st is not None and time.monotonic() - st.t0 > self.cfg.round_timeout)
        ):
            self._request_decided(r, [peer], force=True)
        if self._joining and (self._join_nonce is not None or self.admission.kind != "pow"):
            self._send(self._join_request(), [peer])  # every member must hear us to vouch

    def _on_link_down(self, peer: str) -> None:
        self._connected_since.pop(peer, None)

    def join_acks(self, peer: str) -> int:
        """Acks we hold that would admit ``peer`` in the next round (``q`` are needed)."""
        r = self.last_decided + 1
        return len(self.join_requests.fresh_acks(peer, self._members.get(r) or [], r))

    def _ack_joiners(self) -> None:
        """As a member, sign ``join_ack`` (for our last decided round) for each pending
        joiner we hold a live connection to, once per round; send it to every member, since
        any of them may lead next. At most 8 joiners a round, longest waiting first."""
        me, r = self.node.node_id, self.last_decided
        members = self._members.get(r + 1) or []
        if me not in members or self.cfg.max_joins_per_round == 0:
            return
        now = time.monotonic()
        self.join_requests.prune(now)
        cfg = self.cfg
        min_up = cfg.join_min_connected
        if min_up is None:  # one failure-detection period survived
            min_up = cfg.dead_timeout
        silence = min(cfg.dead_timeout, 3 * cfg.heartbeat_interval)
        pending = [
            (c.first_seen, peer, c)
            for peer in self.join_requests
            if (c := self.join_requests.get(peer)) is not None
            and c.request is not None
            and c.acked_at < r
            and peer not in members
        ]
        acked = 0
        for _, peer, c in sorted(pending, key=lambda x: (x[0], x[1])):
            info = self.node.peers.get(peer)
            live = peer in self.node.connections and joiner_is_live(
                self._connected_since.get(peer),
                info.last_contact if info is not None else None,
                now,
                min_up,
                silence,
            )
            if not live:
                continue
            if c.acked_at < 0:
                log.info("acknowledging joiner %s (live for %.1f s)", peer[:12],
                         now - self._connected_since.get(peer, now))  # fmt: skip
            c.acked_at = r
            ack = self.node.sign("join_ack", {"peer": peer}, r)
            self.join_requests.add_ack(ack, now)
            self._send(ack, members)
            self.stats["join_acks_sent"] += 1
            acked += 1
            if acked >= 8:
                break

    async def _membership_loop(self) -> None:
        """Acks must follow liveness: a joiner whose connection just became old enough, or
        a new round (acks count for JOIN_ACK_ROUNDS rounds), gets a fresh one."""
        period = min(self.cfg.heartbeat_interval, 0.25)
        while True:
            await asyncio.sleep(period)
            if len(self.join_requests):
                self._ack_joiners()
            if self._joining:
                # as a joiner, repeat the request about once a second whatever the
                # application does meanwhile (the swarm may be busy fetching its state)
                if self.node.node_id in (self._members.get(self.last_decided + 1) or ()):
                    self._joining = False
                elif time.monotonic() - self._join_sent >= max(1.0, self.cfg.heartbeat_interval):
                    self.request_join()

    # -- progress ------------------------------------------------------------------------
    def _held(self, st: _Round) -> list[str]:
        return [
            p
            for p, c in st.contribs.items()
            if c.body["digest"] in self.node.blobs and p not in self.proofs
        ]

    def _changes_for(self, st: _Round) -> list[dict[str, Any]]:
        changes: list[dict[str, Any]] = []
        for peer, proof in self.proofs.items():
            if peer in st.members:
                changes.append({"op": "remove", "peer": peer, "proof": proof})
        for peer, by in self.evict_votes.items():
            fresh = [v.to_wire() for v in by.values() if self._counts_for(st, v)]
            if peer in st.members and peer not in self.proofs and len(fresh) >= st.q:
                changes.append({"op": "remove", "peer": peer, "votes": fresh[: st.q]})
        # joiners with a quorum of fresh acks, at most max_joins_per_round, and only ones
        # still connected to us: a joiner that vanished since its acks is not worth a member
        # and only while every member contributes (full_house_for_joins in membership.py)
        full = len(self._held(st)) == st.n
        limit = self.cfg.max_joins_per_round if full else 0
        for peer, join, acks in self.join_requests.admissible(st.members, st.round, st.q, limit):
            if peer not in self.proofs and peer in self.node.connections:
                wires = [a.to_wire() for a in acks]
                changes.append({"op": "join", "peer": peer, "req": join.to_wire(), "acks": wires})
        for peer, req in self.leave_requests.items():
            if peer in st.members and peer not in self.proofs:
                changes.append({"op": "leave", "peer": peer, "req": req})
        # keep at least q members after removals so the swarm can still decide
        changes.sort(key=lambda c: c["peer"])
        return changes[: max(0, st.n - 1)]

    def _progress(self, st: _Round) -> None:
        if st.decided is not None:
            return
        if self.node.node_id not in st.members:
            self._check_commits(st)  # observers (e.g. joiners) decide from commit quorums
            return
        self._maybe_propose(st)
        prop = st.proposals.get(st.view)
        if prop is not None and ("prepare", st.view) not in st.sent:
            missing = [e for e in self._entries(prop) if e.digest not in self.node.blobs]
            if missing:
                self._fetch_missing(st, prop)
            else:
                self._vote(st, "prepare", st.view, self._phash(prop))
        if prop is not None and ("commit", st.view) not in st.sent:
            h = self._phash(prop)
            votes = st.votes.get(("prepare", st.view, h), {})
            if ("prepare", st.view) in st.sent and len(votes) >= st.q:
                st.prepared = {
                    "proposal": prop.to_wire(),
                    "votes": [v.to_wire() for v in list(votes.values())[: st.q]],
                }
                st.prepared_view = st.view
                self._vote(st, "commit", st.view, h)
        self._check_commits(st)

    def _check_commits(self, st: _Round) -> None:
        for (kind, view, h), votes in list(st.votes.items()):
            if kind == "commit" and len(votes) >= st.q:
                self._try_decide(st, view, h, votes)
                break

    def _vote(self, st: _Round, kind: str, view: int, h: bytes) -> None:
        log.debug(
            "round %d view %d: %s after %.3f s", st.round, view, kind, time.monotonic() - st.t0
        )
        st.sent.add((kind, view))
        signed = self._sign_slot(
            kind, {"view": view, "h": h}, st.round, view, st.prepared if kind == "commit" else None
        )
        if signed is None:
            return
        msg, h = signed, signed.body["h"]
        st.seen_votes[(kind, view, msg.sender)] = msg
        st.votes.setdefault((kind, view, h), {})[msg.sender] = msg
        self._send(msg, st.members)

    def _maybe_propose(self, st: _Round) -> None:
        me = self.node.node_id
        view = st.view
        if self._leader(st, view) != me or view in st.proposals:
            return
        if ("propose", view) in st.sent:
            return
        justify: list[Any] = []
        entries_from: dict[str, Any] | None = None
        if view > 0:
            vcs = st.viewchanges.get(view, {})
            if len(vcs) < st.q:
                return
            justify = [m.to_wire() for m in list(vcs.values())[: st.q]]
            best_view = -1
            for m in list(vcs.values())[: st.q]:
                prep = m.body["prepared"]
                if prep is not None:
                    pv = open_signed(prep["proposal"]).body["view"]
                    if pv > best_view:
                        entries_from, best_view = prep, pv
        if entries_from is not None:
            old = open_signed(entries_from["proposal"])
            entries, changes = old.body["entries"], old.body["changes"]
        else:
            held = self._held(st)
            # after a timeout, pull payloads that were announced but never arrived (in view 0
            # they are normally still queued behind other transfers: pulling would duplicate)
            if view > 0 and len(held) < len(st.contribs) and not st.pulling:
                st.pulling = True
                self._spawn(self._pull_payloads(st))
            if len(held) < st.q:
                return
            if view == 0 and len(held) < st.n:
                now = time.monotonic()
                if st.quorum_at is None:
                    st.quorum_at = now
                    self._spawn(self._poke_later(st, self.cfg.proposal_grace))
                if now - st.quorum_at < self.cfg.proposal_grace:
                    return
            entries = [[p, st.contribs[p].to_wire()] for p in sorted(held)]
            changes = self._changes_for(st)
        st.sent.add(("propose", view))
        body = {"view": view, "entries": entries, "changes": changes, "justify": justify,
                "m": members_hash(st.members)}  # fmt: skip
        signed = self._sign_slot("propose", body, st.round, view)
        if signed is None:
            return
        msg = signed
        log.debug("round %d view %d: proposing %d entries", st.round, view, len(entries))
        st.proposals[view] = msg
        self._send(msg, st.members)

    async def _poke_later(self, st: _Round, delay: float) -> None:
        await asyncio.sleep(delay)
        self._progress(st)

    def _fetch_missing(self, st: _Round, prop: SignedMessage) -> None:
        if st.fetching:
            return
        st.fetching = True
        self._spawn(self._fetch_all(st, prop))

    async def _fetch_all(self, st: _Round, prop: SignedMessage) -> None:
        # Only a payload whose contribution reached us is being pushed to us: a peer catching
        # up from a decision certificate (a joiner, a healed minority) must pull at once.
        announced = {c.body["digest"] for c in st.contribs.values()}
        try:
            for e in self._entries(prop):
                digest = e.digest
                if digest in self.node.blobs:
                    continue
                self._round_payloads.setdefault(st.round, set()).add(digest)
                if digest in announced and await self._await_push(digest):
                    continue
                self.stats["pulls_to_decide"] += 1
                peers = _distinct([prop.sender, e.peer, *st.members])
                with contextlib.suppress(TransportError):
                    await self.node.fetch(digest, peers, self.cfg.fetch_timeout)
        finally:
            st.fetching = False
        self._progress(st)

    async def _await_push(self, digest: bytes) -> bool:
        """Give a payload its contributor pushes to every member the chance to land before
        pulling a second copy: up to ``proposal_grace``, and as long as it is streaming in
        (bounded by ``fetch_timeout``). On a loaded machine the decision often overtook the
        push, and the pull sent the payload twice (the swarm benchmark measured a third of a
        payload a peer a round). True when it arrived."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while digest not in self.node.blobs:
            streaming = self.node.receiving(digest)
            left = (self.cfg.fetch_timeout if streaming else self.cfg.proposal_grace) - (
                loop.time() - start
            )
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await self.node.blobs.wait(digest, min(left, 0.05))
        return True

    def _try_decide(self, st: _Round, view: int, h: bytes, commits: dict[str, Any]) -> None:
        prop = st.certified.get(h) or next(
            (p for p in st.proposals.values() if self._phash(p) == h), None
        )
        if prop is None:
            self._request_decided(st.round, list(commits))
            return
        missing = [e for e in self._entries(prop) if e.digest not in self.node.blobs]
        cert = {"proposal": prop.to_wire(), "commits": [c.to_wire() for c in commits.values()]}
        if missing and st.round + self.cfg.keep_rounds // 2 < self.highest_seen:
            # Far behind: the members have (or soon will have) pruned this round's payloads,
            # so waiting for them would strand us for good. The certificate alone decides
            # the round; the decision says its payloads were skipped (issue 17 #2).
            self.stats["rounds_skipped"] += 1
            self._decide(st, prop, view, cert, skipped=True)
            return
        if missing:
            self._fetch_missing(st, prop)
            return
        self._decide(st, prop, view, cert)

    def _decide(
        self,
        st: _Round,
        prop: SignedMessage,
        view: int,
        cert: dict[str, Any],
        skipped: bool = False,
    ) -> None:
        entries = list(self._entries(prop))
        changes = prop.body["changes"]
        nxt = set(st.members)
        for ch in changes:
            if ch["op"] == "join":
                nxt.add(ch["peer"])
            else:
                nxt.discard(ch["peer"])
            self.join_requests.pop(ch["peer"], None)
            self.leave_requests.pop(ch["peer"], None)
            self.evict_votes.pop(ch["peer"], None)
        latency = time.monotonic() - st.t0
        d = Decision(
            st.round, view, entries, st.members, sorted(nxt), changes, cert, latency, skipped
        )
        st.decided = d
        st.done.set()
        self.decisions[st.round] = d
        if changes:
            self.epoch_ends[st.round] = cert
            if len(self.epoch_ends) > MAX_EPOCH_ENDS:
                oldest = min(self.epoch_ends)
                del self.epoch_ends[oldest]
                self._epochs_from = oldest + 1
        self.latencies.append(latency)
        self.stats["rounds_decided"] += 1
        for listener in self.decided_listeners:
            try:
                listener(d)
            except Exception:
                log.exception("decision listener failed for round %d", st.round)
        self.stats["view_changes"] += view
        self.last_decided = max(self.last_decided, st.round)
        self._members[st.round + 1] = d.members_next
        del self.rounds[st.round]
        self._prune()
        log.info("round %d decided in view %d: %d entries", st.round, view, len(entries))
        for peer in st.waiting:
            self._answer_decided(peer, st.round)
        nxt_st = self._ensure_round(st.round + 1)
        observer = self.node.node_id not in d.members_next
        if self.highest_seen > st.round + 1 or nxt_st is None or observer:
            # observers hear no votes: ask now, members answer the moment they decide
            self._request_decided(st.round + 1, None)
        self._changed.set()

    def _prune(self) -> None:
        keep = self.last_decided - self.cfg.keep_rounds
        for r in [r for r in self._round_payloads if r <= keep]:
            self.node.blobs.forget(self._round_payloads.pop(r))
        old = self.last_decided - KEEP_DECISIONS
        for r in [r for r in self.decisions if r <= old]:
            del self.decisions[r]
        for r in [r for r in self._members if r <= old]:
            del self._members[r]
        self._answered = {k: t for k, t in self._answered.items() if k[1] > keep}
        self.future.drop_through(self.last_decided)
        for r in [r for r in self._early_reqs if r <= self.last_decided]:
            del self._early_reqs[r]

    def _enter_view(self, st: _Round, view: int, announce: bool) -> None:
        if view <= st.view:
            return
        st.view = view
        st.fetching = False
        self.stats["view_entries"] += 1
        if announce and ("viewchange", view) not in st.sent:
            st.sent.add(("viewchange", view))
            body = {"view": view, "prepared": st.prepared}
            vc = self._sign_slot("viewchange", body, st.round, view)
            if vc is not None:
                st.viewchanges.setdefault(view, {})[vc.sender] = vc
                self._send(vc, st.members)
        # the transport may have lost our contribution with a replaced connection: the new
        # leader gets it again (re-signed, same digest) and pulls the payload if it lacks it
        self._resend_contrib(st, [self._leader(st, view)])
        self._changed.set()

    @staticmethod
    def _leader(st: _Round, view: int) -> str:
        return leader_of(st.members, st.round, view, st.live)

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

    def _restore_lock(self, st: _Round) -> None:
        """After a restart, take back what we signed in this round before the crash: the
        highest view we entered and the prepared certificate our latest COMMIT carried.

        Why: the PBFT argument needs every honest member that committed to report its
        prepared certificate in its VIEWCHANGE; a restarted member that forgot it would
        send ``prepared = null`` and weaken the quorum intersection that keeps a decided
        value across view changes (issue 17 review)."""
        if self.vote_log is None:
            return
        for slot in self.vote_log.slots(st.round):
            if slot.kind == "commit" and slot.prepared is not None and slot.view > st.prepared_view:
                st.prepared, st.prepared_view = slot.prepared, slot.view
            if slot.kind in ("viewchange", "prepare", "commit", "propose"):
                st.view = max(st.view, slot.view)

    def _resend_contrib(self, st: _Round, peers: list[str]) -> None:
        mine = st.contribs.get(self.node.node_id)
        peers = [p for p in peers if p != self.node.node_id and p in st.members]
        if mine is not None and peers:
            self._send(self.node.sign("contrib", mine.body, st.round), peers)

    def _on_peer_connected(self, peer: str) -> None:
        """A (re)connected peer may have lost our contribution with the old connection."""
        st = self.rounds.get(self.last_decided + 1)
        if st is None or st.decided is not None or peer not in st.members:
            return
        self._resend_contrib(st, [peer])
        mine = st.contribs.get(self.node.node_id)
        payload = self.node.blobs.get(mine.body["digest"]) if mine is not None else None
        if mine is not None and payload is not None:
            self._spawn(self._push_one(peer, mine.body["digest"], payload))

    async def _pull_payloads(self, st: _Round) -> None:
        """Leader side: fetch payloads of known contributions that never arrived."""
        await asyncio.sleep(self.cfg.proposal_grace)
        try:
            for peer, c in list(st.contribs.items()):
                digest = c.body["digest"]
                if st.decided is not None or digest in self.node.blobs or peer in self.proofs:
                    continue
                if self.node.receiving(digest):
                    continue  # still streaming in: asking again would only duplicate it
                peers = _distinct([peer, *st.members])
                self.stats["pulls_to_propose"] += 1
                with contextlib.suppress(TransportError):
                    await self.node.fetch(digest, peers, self.cfg.fetch_timeout)
        finally:
            st.pulling = False
        self._progress(st)

    async def _timer(self, st: _Round) -> None:
        # View 0's clock starts with the round's first contribution. Before it no leader can
        # propose in any view, so a timeout would only rotate leaders while every member is
        # still computing (a swarm's local phase can take minutes); keep asking for the
        # decision meanwhile, in case the others decided without us.
        while st.open and not st.active.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (st.done, st.active)]
            try:
                await asyncio.wait(
                    waits, timeout=self.cfg.round_timeout, return_when="FIRST_COMPLETED"
                )
            finally:
                for w in waits:
                    w.cancel()
            if st.open and not st.active.is_set():
                self._request_decided(st.round, None)
        while st.open:
            factor = min(2**st.view, MAX_VIEW_TIMEOUT_FACTOR)
            view = st.view
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.done.wait(), self.cfg.round_timeout * factor)
            if not st.open:
                return
            if st.view == view and self.node.node_id in st.members:
                log.info("round %d view %d timed out", st.round, view)
                self._enter_view(st, view + 1, announce=True)
                self._progress(st)
            elif self.node.node_id not in st.members:
                st.view += 1  # observers only back off
            self._request_decided(st.round, None)

    # -- catch-up ------------------------------------------------------------------------
    def _note_progress(self, peer: str, r: int) -> None:
        if r > self.peer_round.get(peer, 0) and (
            peer in self.peer_round or len(self.peer_round) < self.cfg.max_peers
        ):
            self.peer_round[peer] = r

    def all_reached(self, r: int) -> bool:
        """True once every member of round ``r`` is known to have decided it (it committed,
        asked for a later round, or received our certificate): nobody still needs us for it."""
        members = self._members.get(r) or []
        me = self.node.node_id
        return all(p == me or self.peer_round.get(p, 0) >= r for p in members)

    def _request_decided(self, r: int, peers: list[str] | None, force: bool = False) -> None:
        """Ask ``peers`` (None: every member) for round ``r``'s decision.

        Throttled per round and peer (the broadcast ask apart): a peer that cannot answer
        (it left before that round) must not hold back asks of the others (a catch-up across
        a leave stalled ~1 s so), and an ask that went out on a connection that was already
        dead (a node resumed after SIGSTOP writes to sockets its peers closed) must not hold
        back the ask on the new one for a second (``force``, from :meth:`_on_link_up`)."""
        now = time.monotonic()
        gap = min(self.cfg.round_timeout, 1.0)
        keys = [(r, "")] if peers is None else [(r, p) for p in _distinct(peers)]
        due = [k for k in keys if force or now - self._requested.get(k, 0.0) >= gap]
        if not due:
            return
        for k in due:
            self._requested[k] = now
        if len(self._requested) > MAX_REQUESTED:
            for k in sorted(self._requested, key=self._requested.__getitem__)[: MAX_REQUESTED // 2]:
                del self._requested[k]
        if peers is None:
            targets = self._members.get(r) or self._members.get(self.last_decided + 1) or []
        else:
            targets = [p for _, p in due]
        self._send(self.node.sign("decided_req", {}, r), targets)

    def _catchup_target(self, r: int) -> tuple[int, dict[str, Any]] | None:
        """The certificate to answer a ``decided_req`` for round ``r`` with, and its round.

        Round ``r`` itself while its payloads are still served (the asker can apply it).
        From further behind (more than ``keep_rounds / 2``, or ``r`` pruned here), the
        certificate of the last round of ``r``'s membership epoch, i.e. the first decision at
        or after ``r`` that changed the membership, or our newest when none did: the asker
        checks it against the membership it knows (``m``) and jumps there in one exchange,
        one membership change per exchange, however far behind it is (issue 17 #2).
        None when we have not decided ``r`` or cannot name that epoch's end."""
        if r > self.last_decided:
            return None
        far = r + self.cfg.keep_rounds // 2 < self.last_decided
        if r in self.decisions and (not far or r < self._epochs_from):
            return r, self.decisions[r].certificate
        if r < self._epochs_from:
            return None  # membership changes before what we keep: others may know them
        ends = [c for c in self.epoch_ends if c >= r]
        if ends:
            c = min(ends)
            return c, self.epoch_ends[c]
        newest = self.decisions.get(self.last_decided)
        return (newest.round, newest.certificate) if newest is not None else None

    def _answer_decided(self, peer: str, r: int) -> None:
        # at most one answer per peer and round per second: a lost answer is sent again when
        # the peer asks again, and a peer cannot make us sign in a loop
        now = time.monotonic()
        if now - self._answered.get((peer, r), -1e9) < 1.0:
            return
        target = self._catchup_target(r)
        if target is None:
            return
        if len(self._answered) >= MAX_ANSWERED:
            self._answered.clear()  # at worst one extra answer per peer and round
        self._answered[(peer, r)] = now
        self._note_progress(peer, r)
        cert_round, cert = target
        if cert_round != r:
            self.stats["catchup_jumps_served"] += 1
        self.node.send(peer, self.node.sign("decided", cert, cert_round))

    def _on_decided(self, msg: SignedMessage, peer: str) -> None:
        r = msg.round
        if r <= self.last_decided:
            return
        members = self._members.get(r)
        if members is None:
            if r > self.last_decided + 1 and not self._jump(msg, peer):
                self._request_decided(self.last_decided + 1, [peer])
            return
        st = self._ensure_round(r)
        if st is None:
            return
        prop = open_signed(msg.body["proposal"])
        if prop.kind != "propose" or prop.round != r:
            raise MessageRejectedError("invalid", f"decision from {peer[:12]} lacks a proposal")
        view, h = prop.body["view"], self._phash(prop)
        if not self._certified_leader_ok(st, view, prop.sender):
            raise MessageRejectedError("invalid", f"decision from {peer[:12]}: wrong leader")
        commits = {}
        precheck_signers(msg.body["commits"], members, f"decision from {peer[:12]}")
        relayed = [open_signed(w) for w in msg.body["commits"]]
        self._cross_check_votes(st, relayed)
        for c in relayed:
            if (c.kind == "commit" and c.round == r and c.body["view"] == view
                    and c.body["h"] == h and c.sender in members):  # fmt: skip
                commits[c.sender] = c
        if len(commits) < quorum(len(members), self.cfg.consensus_threshold):
            raise MessageRejectedError("invalid", f"decision from {peer[:12]}: too few commits")
        self.stats["caught_up_rounds"] += 1
        # The certified proposal wins over whatever the leader showed us for this view: a
        # leader that signed two proposals for one view (split proposal) is recorded, and we
        # decide the certified one, pulling its payloads from any holder (issue 17 #1).
        st.certified[h] = prop
        old = st.proposals.setdefault(view, prop)
        if old is not prop and self._phash(old) != h:
            self._record_equivocation(old, prop)
        for c in commits.values():
            st.votes.setdefault(("commit", view, h), {})[c.sender] = c
        self._try_decide(st, view, h, commits)

    def _jump(self, msg: SignedMessage, peer: str) -> bool:
        """Decide round ``msg.round``, later than the next one, from its certificate alone
        when it names the membership we know for the next round (its ``m``): no member
        joined or left in between, so that membership's quorum certifies it. The rounds in
        between are skipped (:meth:`decision` reports them ``skipped``). False when the
        certificate names another membership: a change happened in between, whose own
        certificate we must verify first (we ask for the next round again)."""
        members = self._members.get(self.last_decided + 1)
        prop = open_signed(msg.body["proposal"])
        if members is None or prop.kind != "propose" or prop.round != msg.round:
            raise MessageRejectedError("invalid", f"decision from {peer[:12]} lacks a proposal")
        if prop.body["m"] != members_hash(members):
            self.stats["catchup_other_membership"] += 1
            return False
        r, q = msg.round, quorum(len(members), self.cfg.consensus_threshold)
        # The previous round's decision (leader rotation) is unknown: the proposer must be a
        # member, and the q commits of that membership are what make the round unique.
        proposer = prop.sender if prop.sender in members else ""
        cert = check_decision_certificate(
            msg.body, members, r, lambda _view: proposer, q, self._phash
        )
        first = self.last_decided + 1
        log.info("caught up from round %d to %d on a certificate of our membership", first, r)
        self.stats["catchup_jumps"] += 1
        self._jumps.append((first, r - 1, list(members)))
        for rr in [rr for rr in self.rounds if rr < r]:
            st = self.rounds.pop(rr)
            st.abandoned = True
            st.done.set()
        self._members[r] = list(members)
        self._epochs_from = max(self._epochs_from, r)
        st = _Round(r, list(members), threshold=self.cfg.consensus_threshold)
        self.rounds[r] = st
        # every commit in it was verified for this slot: it is the certificate we pass on
        self._decide(st, prop, cert.proposal.view, dict(msg.body), skipped=True)
        return True


async def discover(node: P2PNode, timeout: float) -> tuple[int, list[str]] | None:
    """Where a running swarm is, for a node about to join it: ``(last decided round,
    members of the next round)``, or None when no swarm answers within ``timeout``.

    We ask every connected peer. A claimed membership ``M`` is believed only when more than
    ``f(M)`` of its own members report it, so up to ``f`` liars (or peers that are not
    members at all) cannot steer a joiner into a fake swarm. Agreeing reports may differ by
    a round or two; the highest one is returned.
    """
    replies: dict[str, tuple[int, tuple[str, ...]]] = {}

    def on_status(msg: SignedMessage, peer: str) -> None:
        members = msg.body["members"]
        if (
            msg.sender == peer
            and all(isinstance(m, str) for m in members)
            and len(members) <= node.config.max_peers
        ):
            replies[peer] = (msg.round, tuple(sorted(set(members))))

    node.on("status", on_status)
    deadline = time.monotonic() + timeout
    asked = 0.0
    try:
        while time.monotonic() < deadline:
            if time.monotonic() - asked >= 1.0:
                asked = time.monotonic()
                node.broadcast(node.sign("status_req", {}), list(node.connections))
            votes: dict[tuple[str, ...], list[int]] = {}
            for sender, (r, members) in replies.items():
                if sender in members:
                    votes.setdefault(members, []).append(r)
            for members, rounds in votes.items():
                if len(rounds) > (len(members) - 1) // 3:
                    return max(rounds), list(members)
            await asyncio.sleep(0.1)
    finally:
        node.handlers.pop("status", None)
    return None
