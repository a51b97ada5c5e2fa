"""Membership changes in the round protocol (docs/protocol.md, "Membership"): joins,
leaves and evictions, agreed in a round's proposal and applied at the boundary after it.

The protocol side of :mod:`swarmlm.p2p.membership` (whose pure rules decide who may join
and when a joiner counts as live): receiving join requests, acks and leave requests;
acknowledging live joiners; voting to evict; the changes a leader proposes and every member
checks; the membership that follows a decision. Also the status exchange by which a node
about to join finds a running swarm (:func:`discover`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from swarmlm.p2p.certificates import precheck_signers
from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.membership import (
    AdmissionPolicy,
    JoinTable,
    check_join_change,
    joiner_is_live,
    mint_pow,
)
from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.p2p.node_api import ProtocolNode
from swarmlm.p2p.round_state import ProtocolCore, _Round, log

EVICT_VOTE_ROUNDS = 16  # an eviction vote older than this many rounds no longer counts


class MembershipChanges(ProtocolCore):
    """Join requests and acks, leaves, eviction votes, and the changes of a proposal."""

    def _init_membership(self) -> None:
        # joiners and the members' acks of their liveness (swarmlm.p2p.membership)
        self.join_requests = JoinTable(self.cfg.max_join_requests, self.cfg.join_request_ttl)
        self.admission = AdmissionPolicy.from_config(self.cfg)
        self._connected_since: dict[str, float] = {
            p: self.node.now() for p in self.node.connections
        }
        self._join_nonce: bytes | None = None
        self._minting = False
        self._joining = False  # we asked to join and are not a member yet
        self._join_sent = 0.0
        self.leave_requests: dict[str, dict[str, Any]] = {}
        self.evict_votes: dict[str, dict[str, SignedMessage]] = {}  # target -> voter -> vote
        self._status_sent: dict[str, float] = {}

    # -- public API ----------------------------------------------------------------------
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
        self._join_sent = self.node.now()
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

    def request_join_if_needed(self) -> bool:
        """Repeat our join request while we are not a member of the next round (a request
        can be lost, or left out of a full proposal); True once we are a member."""
        members = self._members.get(self.last_decided + 1) or []
        if self.node.node_id in members:
            return True
        self.request_join()
        return False

    def request_leave(self) -> None:
        members = self._members.get(self.last_decided + 1) or []
        self._send(self.node.sign("leave", {}), members)

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

    def join_acks(self, peer: str) -> int:
        """Acks we hold that would admit ``peer`` in the next round (``q`` are needed)."""
        r = self.last_decided + 1
        return len(self.join_requests.fresh_acks(peer, self._members.get(r) or [], r))

    # -- inbound -------------------------------------------------------------------------
    def _on_membership_request(self, msg: SignedMessage) -> None:
        """``join`` (from a would-be member), ``join_ack`` (a member vouches that a joiner is
        live) and ``leave`` (from a member). Requests of keys the admission policy refuses,
        and acks from non-members, count against their sender."""
        members = self._members.get(self.last_decided + 1) or []
        now = self.node.now()
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

    def _on_evict(self, msg: SignedMessage) -> None:
        """A member's vote to evict another member (see :meth:`vote_evict`); kept, newest
        per voter, until a proposal removes the target or the vote expires."""
        members = self._members.get(self.last_decided + 1) or []
        if msg.sender in members and msg.body["peer"] in members:
            self.evict_votes.setdefault(msg.body["peer"], {})[msg.sender] = msg
        else:
            self.stats["dropped_evict"] += 1

    def _on_status_req(self, msg: SignedMessage, peer: str) -> None:
        """Tell a (prospective) joiner where the swarm is: our last decided round and the
        membership of the next one. At most one answer per peer and second."""
        now = self.node.now()
        if now - self._status_sent.get(peer, -1e9) < 1.0:
            return
        if len(self._status_sent) >= self.cfg.max_peers:
            self._status_sent.clear()
        self._status_sent[peer] = now
        members = self._members.get(self.last_decided + 1) or []
        self.node.send(peer, self.node.sign("status", {"members": members}, self.last_decided))

    def _join_on_link_up(self, peer: str) -> None:
        """As a joiner, repeat our request on each new link."""
        if self._joining and (self._join_nonce is not None or self.admission.kind != "pow"):
            self._send(self._join_request(), [peer])  # every member must hear us to vouch

    # -- acknowledging live joiners ------------------------------------------------------
    def _ack_joiners(self) -> None:
        """As a member, sign ``join_ack`` (for our last decided round) for each pending
        joiner we hold a live connection to, once per round; send it to every member, since
        any of them may lead next. At most 8 joiners a round, longest waiting first."""
        me, r = self.node.node_id, self.last_decided
        members = self._members.get(r + 1) or []
        if me not in members or self.cfg.max_joins_per_round == 0:
            return
        now = self.node.now()
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
                elif self.node.now() - self._join_sent >= max(1.0, self.cfg.heartbeat_interval):
                    self.request_join()

    # -- changes in a proposal -----------------------------------------------------------
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

    def _members_after(self, st: _Round, changes: list[dict[str, Any]]) -> list[str]:
        """``M_{r+1}``: the members of round ``st`` with its decided ``changes`` applied. The
        requests and votes those changes settle are forgotten."""
        nxt = set(st.members)
        for ch in changes:
            if ch["op"] == "join":
                nxt.add(ch["peer"])
            else:
                nxt.discard(ch["peer"])
            self.join_requests.pop(ch["peer"], None)
            self.leave_requests.pop(ch["peer"], None)
            self.evict_votes.pop(ch["peer"], None)
        return sorted(nxt)


async def discover(node: ProtocolNode, timeout: float) -> tuple[int, list[str]] | None:
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
    deadline = node.now() + timeout
    asked = 0.0
    try:
        while node.now() < deadline:
            if node.now() - asked >= 1.0:
                asked = node.now()
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
