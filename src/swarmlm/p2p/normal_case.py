"""The normal-case round (docs/protocol.md, "One round, normal case").

Each member signs its contribution and pushes the payload to every member; the leader
proposes the contributions it holds; members PREPARE once they hold every payload of the
proposal, COMMIT once prepared, and decide on ``q`` COMMITs. This mixin also moves the
payloads (push, pull when a push is lost or late) and prunes what is no longer needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from swarmlm.p2p.certificates import check_entries_shape, check_members_hash, members_hash
from swarmlm.p2p.errors import ConsensusError, MessageRejectedError, TransportError
from swarmlm.p2p.messages import UNSCORED, SignedMessage, open_signed
from swarmlm.p2p.round_state import Decision, Entry, ProtocolCore, _distinct, _Round, log
from swarmlm.p2p.wire import DIGEST_SIZE, Payload, digest_of

KEEP_DECISIONS = 256  # decision certificates kept for catch-up, per round
MAX_EPOCH_ENDS = 1024  # certificates of membership-changing decisions kept beyond that
FETCH_CONCURRENCY = 8  # missing payloads of one proposal pulled at a time


class NormalCase(ProtocolCore):
    """Contribute, propose, prepare, commit, decide; payload push and pull; pruning."""

    # -- public API ----------------------------------------------------------------------
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
        deadline = self.node.now() + timeout
        await self._wait_for(lambda: round in self.rounds or round <= self.last_decided, deadline)
        if round <= self.last_decided:
            return await self.decision(round, max(deadline - self.node.now(), 0.0))
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
                return await self.decision(round, max(deadline - self.node.now(), 0.0))
            msg = signed
            st.contribs[me] = msg
            st.active.set()
            self._send(msg, st.members)
            if msg.body["digest"] == digest:  # else: our pre-restart contribution stands
                self._push_payload(st, digest, payload)
            self._progress(st)
        return await self.decision(round, max(deadline - self.node.now(), 0.0))

    async def decision(self, round: int, timeout: float | None = None) -> Decision:
        """Round ``round``'s decision once made here. A round this node moved past without
        deciding it (it caught up on a later certificate, or the round was pruned) gives a
        Decision with ``skipped=True``, no entries and an empty certificate at once: the
        application syncs its state instead of applying it."""
        timeout = timeout if timeout is not None else self._default_timeout()
        deadline = self.node.now() + timeout
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

    # -- opening a round -----------------------------------------------------------------
    def _ensure_round(self, r: int) -> _Round | None:
        if r in self.rounds:
            return self.rounds[r]
        members = self._members.get(r)
        if members is None or r <= self.last_decided:
            return None
        st = _Round(r, members, t0=self.node.now(), threshold=self.cfg.consensus_threshold)
        prev = self.decisions.get(r - 1)
        if prev is not None:
            st.live = frozenset(e.peer for e in prev.entries)
        self._restore_lock(st)
        self.rounds[r] = st
        self._spawn(self._timer(st))
        st.waiting.update(self._early_reqs.pop(r, set()))
        for msg, peer in self.future.pop(r):
            try:
                self._handle(msg, peer)
            except MessageRejectedError as exc:
                # Fully checked only now that its round is open: charge its sender as the
                # transport would, and go on with the rest of the buffer. Raised out of here
                # it aborted the caller (_decide, before asking for the next round) and
                # dropped every message behind it (found by the simulator, issue 18).
                self.stats["buffered_rejected"] += 1
                if exc.reason not in UNSCORED:
                    self.node.scores.penalize(peer, exc.reason)
                log.info("buffered %s from %s refused: %s", msg.kind, peer[:12], exc.detail)
        self._changed.set()
        return st

    # -- inbound -------------------------------------------------------------------------
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
        if self._leader_unknown(st) and msg.sender != self._leader(st, view):
            # maybe the leader: kept (bounded) until the previous decision tells us
            if len(st.parked) < 2 * st.n:
                st.parked[(view, msg.sender)] = msg
            self._request_decided(st.round - 1, None)
            return
        self._check_proposal(st, msg)
        st.proposals[view] = msg
        if view > st.view:
            self._enter_view(st, view, announce=False)

    def _on_blob(self, digest: bytes) -> None:
        for st in list(self.rounds.values()):
            if st.decided is None:
                self._progress(st)

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

    # -- validation ----------------------------------------------------------------------
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
        # [peer, contribution] pairs, sorted, distinct: before any contribution's signature
        check_entries_shape(entries, who)
        for e in entries:
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
        self._check_changes(st, b["changes"], who, len(entries))
        if view == 0:
            if b["justify"]:
                raise MessageRejectedError("invalid", f"view-0 proposal from {who} has justify")
            return
        self._check_justification(st, msg)

    # -- progress ------------------------------------------------------------------------
    def _progress(self, st: _Round) -> None:
        if st.decided is not None:
            return
        if self.node.node_id not in st.members:
            self._check_commits(st)  # observers (e.g. joiners) decide from commit quorums
            return
        if self._leader_unknown(st):
            self._request_decided(st.round - 1, None)  # throttled: at most once a second
        else:
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
            "round %d view %d: %s after %.3f s", st.round, view, kind, self.node.now() - st.t0
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
            got = self._justification_for(st, view)
            if got is None:
                return
            justify, entries_from = got
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
                now = self.node.now()
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

    def _try_decide(self, st: _Round, view: int, h: bytes, commits: dict[str, Any]) -> None:
        # the proposal of the view that decided, so the certificate's proposal and commits
        # name one view (a re-proposal in view 1 has view 0's hash: the first match found
        # used to be view 0's, and receivers refused the certificate as "too few commits")
        own = st.proposals.get(view)
        prop = (own if own is not None and self._phash(own) == h else None) or (
            st.certified.get(h)
            or next((p for p in st.proposals.values() if self._phash(p) == h), None)
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
        nxt = self._members_after(st, changes)
        latency = self.node.now() - st.t0
        d = Decision(
            st.round, view, entries, st.members, nxt, changes, cert, latency, skipped,
            decided_at=self.node.now(),
        )  # fmt: skip
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

    # -- payloads ------------------------------------------------------------------------
    def _push_payload(self, st: _Round, digest: bytes, payload: bytes) -> None:
        for peer in st.members:
            if peer != self.node.node_id:
                self._spawn(self._push_one(peer, digest, payload))

    async def _push_one(self, peer: str, digest: bytes, payload: Payload) -> None:
        with contextlib.suppress(TransportError, TimeoutError):
            await self.node.send_blob(peer, digest, payload)

    def _resend_contrib(self, st: _Round, peers: list[str]) -> None:
        mine = st.contribs.get(self.node.node_id)
        peers = [p for p in peers if p != self.node.node_id and p in st.members]
        if mine is not None and peers:
            self._send(self.node.sign("contrib", mine.body, st.round), peers)

    async def _fetch_one(self, st: _Round, digest: bytes, peers: list[str]) -> None:
        with contextlib.suppress(TransportError):
            await self.node.fetch(digest, _distinct([*peers, *st.members]), self.cfg.fetch_timeout)

    def _fetch_missing(self, st: _Round, prop: SignedMessage) -> None:
        if st.fetching:
            return
        st.fetching = True
        self._spawn(self._fetch_all(st, prop))

    async def _fetch_all(self, st: _Round, prop: SignedMessage) -> None:
        # Only a payload whose contribution reached us is being pushed to us: a peer catching
        # up from a decision certificate (a joiner, a healed minority) must pull at once.
        # The payloads are fetched concurrently (at most FETCH_CONCURRENCY at a time): one
        # after the other, a node catching up at n = 7 spent 5-7 round trips per round on a
        # loaded machine, and the others decided 2-3 more rounds meanwhile (issue 17 #2).
        announced = {c.body["digest"] for c in st.contribs.values()}
        slots = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(e: Entry) -> None:
            digest = e.digest
            if digest in self.node.blobs:
                return
            self._round_payloads.setdefault(st.round, set()).add(digest)
            async with slots:
                if digest in announced and await self._await_push(digest):
                    return
                if digest in self.node.blobs:
                    return
                self.stats["pulls_to_decide"] += 1
                peers = _distinct([prop.sender, e.peer, *st.members])
                with contextlib.suppress(TransportError):
                    await self.node.fetch(digest, peers, self.cfg.fetch_timeout)

        try:
            await asyncio.gather(*(one(e) for e in self._entries(prop)))
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
