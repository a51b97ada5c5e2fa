"""The BFT round protocol: every honest peer decides the same set of contributions per round.

Summary (the full protocol, its messages and invariants are in docs/protocol.md):

* Membership ``M_r`` (sorted node ids) is fixed for round ``r``; ``n = |M_r|``,
  ``f = (n - 1) // 3``, quorum ``q = n - f`` (>= 2f + 1).
* Each member signs ``contrib(r, digest, size)`` and pushes its payload to every member.
* The leader of ``(r, view)`` is ``L[(r + view) % len(L)]``, ``L`` = the members with an
  entry in round ``r - 1``'s decision (all of ``M_r`` when unknown). It proposes entries
  (one signed contribution per member, at least ``q`` of them, all payloads held) plus
  membership changes for ``r + 1``, naming ``M_r`` by its hash ``m``. ``h`` = hash of
  (round, entries, changes, m), independent of the view.
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

Where each concern lives (one mixin per module, composed here into :class:`RoundProtocol`):

* ``round_state.py``: ``Entry``, ``Decision``, the per-round state, ``quorum``,
  ``leader_of``; ``ProtocolCore``, the shared state and helpers (signing through the vote
  log) every part builds on;
* ``normal_case.py``: contribute, propose, PREPARE/COMMIT, decide, payload push and pull,
  pruning;
* ``view_change.py``: timers, VIEWCHANGE, re-proposal, prepared certificates and
  justifications, the prepared lock after a restart;
* ``catchup.py``: ``decided_req``/``decided``, jumps across pruned rounds, how far peers
  got (and the resume file of a restarted node);
* ``membership_changes.py``: join requests and acks, leaves, eviction votes, the changes of
  a proposal, ``discover``;
* ``equivocation.py``: proofs of equivocation, recorded, gossiped and acted on;
* this module: the inbound routing of every protocol message to its concern, and the
  public API.

Pure rules with no node behind them are in ``certificates.py`` (message and certificate
validation) and ``membership.py`` (admission policy, join acks).
"""

from __future__ import annotations

import contextlib
from typing import Any

from swarmlm.p2p.catchup import CatchUp
from swarmlm.p2p.certificates import Admit, check_body
from swarmlm.p2p.equivocation import Equivocation
from swarmlm.p2p.membership_changes import MembershipChanges, discover
from swarmlm.p2p.messages import SignedMessage
from swarmlm.p2p.node_api import ProtocolNode
from swarmlm.p2p.normal_case import NormalCase
from swarmlm.p2p.round_state import Decision, Entry, _Round, leader_of, log, quorum
from swarmlm.p2p.view_change import ViewChange
from swarmlm.p2p.votelog import VoteLog, VoteLogError

__all__ = [
    "Decision",
    "Entry",
    "RoundProtocol",
    "_Round",
    "discover",
    "leader_of",
    "quorum",
]

ROUND_KINDS = ("contrib", "propose", "prepare", "commit", "viewchange", "decided_req", "decided")
LOOKAHEAD_ROUNDS = 4
LATE_ANSWER_AFTER = 1.0  # s after our decision before a late COMMIT is answered with it
MAX_WAITING = 256  # peers waiting for one round's certificate


class RoundProtocol(NormalCase, ViewChange, CatchUp, MembershipChanges, Equivocation):
    """One node's side of the round protocol, on top of a started node: the TLS
    :class:`~swarmlm.p2p.transport.P2PNode` or the simulator's in-memory
    :class:`~swarmlm.sim.node.SimNode` (both satisfy
    :class:`~swarmlm.p2p.node_api.ProtocolNode`).

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
        node: ProtocolNode,
        genesis: list[str],
        start_round: int = 1,
        vote_log: VoteLog | None = None,
        resume_certificate: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(node, genesis, start_round, vote_log)
        self._init_membership()
        self._init_catchup()
        if resume_certificate is not None and start_round > 1:
            self._restore_decision(start_round - 1, resume_certificate)
        for kind in (*ROUND_KINDS, "equivocation", "join", "join_ack", "leave", "evict"):
            node.on(kind, self._on_message)
        node.connect_listeners.append(self._on_link_up)
        node.disconnect_listeners.append(self._on_link_down)
        node.on("status_req", self._on_status_req)
        node.blobs.on_put.append(self._on_blob)
        node.on_peer_connected = self._on_peer_connected
        self._ensure_round(start_round)
        self._spawn(self._membership_loop())

    # -- public API (more in each concern: contribute, decision, request_join, ...) -------
    def members(self, round: int) -> list[str] | None:
        return self._members.get(round)

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

    # -- inbound: every protocol message to its concern ----------------------------------
    def _on_message(self, msg: SignedMessage, peer: str) -> None:
        if msg.kind == "equivocation":
            self._on_equivocation(msg)
        elif msg.kind in ("join", "leave", "join_ack"):
            self._on_membership_request(msg)
        elif msg.kind == "evict":
            self._on_evict(msg)
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
            # (decided here, or pruned: then a later certificate may still serve it). A COMMIT
            # within LATE_ANSWER_AFTER of our decision is from a peer that has committed and
            # receives the same COMMITs: answering each with the certificate (O(n) bytes) to
            # O(n^2) such senders a round cost most of the simulator's bytes and CPU at
            # n = 100 (1.86 MB a peer a round; n = 1,000 held 18 GB before its first
            # decision). Other late messages are answered: not answering late PREPAREs too
            # (0.33 MB) made stragglers of 1 MB payload rounds time out (a view change, round
            # 1.0 -> 1.56 s). A peer that is really stuck asks (decided_req) and is answered.
            d = self.decisions.get(r)
            if (
                msg.kind != "commit"
                or d is None
                or self.node.now() - d.decided_at >= LATE_ANSWER_AFTER
            ):
                self._answer_decided(peer, r)
            else:
                self.stats["late_not_answered"] += 1
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
        now = self.node.now()
        if now - self._flood_charged.get(peer, -1e9) < 1.0:
            return
        if len(self._flood_charged) >= self.cfg.max_peers:
            self._flood_charged.clear()
        self._flood_charged[peer] = now
        self.stats["flood_charges"] += 1
        log.info("flood: %s", why)
        self.node.scores.penalize(peer, "flood")

    # -- links going up and down ---------------------------------------------------------
    def _on_link_up(self, peer: str) -> None:
        self._connected_since.setdefault(peer, self.node.now())  # a joiner's liveness
        self._ask_reconnected(peer)
        self._join_on_link_up(peer)

    def _on_link_down(self, peer: str) -> None:
        self._connected_since.pop(peer, None)
