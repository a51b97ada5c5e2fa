"""Catching up: how a node that is behind the swarm gets back to its current round.

From its peers (:class:`CatchUp`, a part of :class:`~swarmlm.p2p.consensus.RoundProtocol`;
docs/protocol.md, "Catching up"): it asks for decisions (``decided_req``) when it times out,
sees later rounds or a member reconnects; a member answers with a decision certificate,
from far behind with the certificate of the end of the asker's membership epoch, which the
asker verifies against the membership it knows and jumps to (issue 17 #2). Members track
how far each peer got (``all_reached``).

From its own disk after a restart (issue 17 #2): a node persists, after each decision, the
last decided round, the membership of the next round and that round's decision certificate
under its node dir. Restarted from that dir it resumes at ``round + 1`` with that membership
instead of round 1, and catches up from the swarm's certificates (``RoundProtocol`` decides
far-behind rounds without their payloads, see ``Decision.skipped``). The file is our own
record, so it is trusted as our own memory; everything learnt later from peers is verified
as usual.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmlm.atomic import atomic_write_text
from swarmlm.p2p.certificates import (
    DecisionCertificate,
    check_decision_certificate,
    members_hash,
    precheck_signers,
)
from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.p2p.round_state import (
    PROTOCOL_LOGGER,
    Decision,
    ProtocolCore,
    _distinct,
    _Round,
    quorum,
)

log = logging.getLogger(__name__)  # the resume file
protocol_log = logging.getLogger(PROTOCOL_LOGGER)

MAX_ANSWERED = 1024
MAX_REQUESTED = 256  # throttle entries of our own decided_req


class CatchUp(ProtocolCore):
    """Asking for, answering and applying decision certificates; jumping rounds."""

    def _init_catchup(self) -> None:
        # highest round each peer is known to have decided (or to be about to: it committed)
        self.peer_round: dict[str, int] = {}
        # our decided_req throttle: (round, peer) -> when; peer "" = the ask of every member
        self._requested: dict[tuple[int, str], float] = {}

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
        now = self.node.now()
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

    def _ask_reconnected(self, peer: str) -> None:
        """A member (re)connecting while our round has been open longer than a timeout (we
        were paused, partitioned or restarted) or after we saw later rounds: ask it for the
        round now, on the new connection; earlier asks may have gone out on the dead one (a
        resumed node lost ~1 s, 4 rounds, so: issue 17 #2)."""
        r = self.last_decided + 1
        st = self.rounds.get(r)
        if peer in (self._members.get(r) or ()) and (
            self.highest_seen > r
            or (st is not None and self.node.now() - st.t0 > self.cfg.round_timeout)
        ):
            self._request_decided(r, [peer], force=True)

    def _catchup_target(self, r: int) -> tuple[int, dict[str, Any]] | None:
        """The certificate to answer a ``decided_req`` for round ``r`` with, and its round.

        Round ``r`` itself while every round from ``r`` to our newest still has its payloads
        served (at most ``keep_rounds`` behind): the asker walks them at network speed and
        can apply each (the rounds it is more than ``keep_rounds / 2`` behind, it decides
        from their certificates alone, ``skipped``). From further behind, or ``r`` pruned
        here, the
        certificate of the last round of ``r``'s membership epoch, i.e. the first decision at
        or after ``r`` that changed the membership, or our newest when none did: the asker
        checks it against the membership it knows (``m``) and jumps there in one exchange,
        one membership change per exchange, however far behind it is (issue 17 #2).
        None when we have not decided ``r`` or cannot name that epoch's end."""
        if r > self.last_decided:
            return None
        far = r + self.cfg.keep_rounds < self.last_decided
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
        now = self.node.now()
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
            nxt = self.rounds.get(r + 1)
            if nxt is not None and self._leader_unknown(nxt):
                self._learn_live(nxt, msg, peer)
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
        precheck_signers(msg.body["commits"], members, f"decision from {peer[:12]}")
        relayed = [open_signed(w) for w in msg.body["commits"]]
        self._cross_check_votes(st, relayed)
        # q COMMITs for h in one view decide h, whichever view's proposal shows its contents
        # (h does not depend on the view): a round decided in view 1 on the re-proposal of
        # view 0's entries may come with the view-0 proposal (issue 18 simulator finding)
        by_view: dict[int, dict[str, SignedMessage]] = {}
        for c in relayed:
            if c.kind == "commit" and c.round == r and c.body["h"] == h and c.sender in members:
                by_view.setdefault(c.body["view"], {})[c.sender] = c
        cview, commits = max(by_view.items(), key=lambda kv: len(kv[1]), default=(view, {}))
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
            st.votes.setdefault(("commit", cview, h), {})[c.sender] = c
        self._try_decide(st, cview, h, commits)

    def _restore_decision(self, r: int, cert: dict[str, Any]) -> None:
        """Our own decision of round ``r`` (the certificate persisted in the node dir), read
        back on a restart, trusted as our own memory: it gives the next round's leader
        rotation (without it a restarted node asks its peers, see :meth:`_learn_live`), and
        peers that missed round ``r`` can still get its certificate from us. Before this a
        restarted node had forgotten a round only it and a Byzantine member still held: the
        other honest members could never decide it (simulator seed 1492, n = 4)."""
        try:
            prop = open_signed(cert["proposal"])
            commits = [open_signed(w) for w in cert["commits"]]
            if prop.kind != "propose" or prop.round != r or not commits:
                raise MessageRejectedError("invalid", f"not a certificate of round {r}")
            view = commits[0].body["view"]
            entries = list(self._entries(prop))
            changes = prop.body["changes"]
        except (MessageRejectedError, KeyError, IndexError, TypeError) as exc:
            log.warning("not restoring the decision of round %d: %s", r, exc)
            return
        nxt = list(self._members.get(r + 1) or [])
        # M_r itself is not persisted; it equals M_{r+1} unless the round changed it, and
        # only the certificate (what peers are sent) is used of a restored decision
        self.decisions[r] = Decision(r, view, entries, nxt, nxt, changes, cert, skipped=True)
        if changes:
            self.epoch_ends[r] = cert

    def _learn_live(self, st: _Round, msg: SignedMessage, peer: str) -> None:
        """Learn the leader rotation of ``st`` (which we started at) from the certificate of
        the round before it: verified against ``st``'s membership, which signed it unless a
        member joined or left at that boundary (then it cannot be verified here and we keep
        waiting: the round's view changes still move on, see docs/protocol.md)."""
        got = self._certified_by(msg, self._members.get(msg.round) or st.members, peer)
        if got is None:
            self.stats["live_unverifiable"] += 1
            return
        cert = got[1]
        st.live = frozenset(e[0] for e in cert.proposal.entries)
        self.stats["live_learnt"] += 1
        protocol_log.info("round %d: leader rotation learnt from round %d", st.round, msg.round)
        parked, st.parked = st.parked, {}
        for (view, sender), prop in sorted(parked.items()):
            if view >= st.view and view not in st.proposals and sender == self._leader(st, view):
                try:
                    self._on_propose(st, prop, sender)
                except MessageRejectedError as exc:
                    self.node.scores.penalize(sender, exc.reason)
        self._progress(st)

    def _certified_by(
        self, msg: SignedMessage, members: list[str], peer: str
    ) -> tuple[SignedMessage, DecisionCertificate] | None:
        """The proposal and verified certificate of ``decided`` message ``msg``, checked
        against ``members`` without knowing the round's leader rotation (the previous
        decision): the proposer must be a member, and ``q`` commits of that membership are
        what make the round unique. None when the certificate names another membership
        (its ``m``): a change happened in between, which ``members`` cannot verify."""
        prop = open_signed(msg.body["proposal"])
        if prop.kind != "propose" or prop.round != msg.round:
            raise MessageRejectedError("invalid", f"decision from {peer[:12]} lacks a proposal")
        if prop.body["m"] != members_hash(members):
            return None
        proposer = prop.sender if prop.sender in members else ""
        q = quorum(len(members), self.cfg.consensus_threshold)
        cert = check_decision_certificate(
            msg.body, members, msg.round, lambda _view: proposer, q, self._phash
        )
        return prop, cert

    def _jump(self, msg: SignedMessage, peer: str) -> bool:
        """Decide round ``msg.round``, later than the next one, from its certificate alone
        when it names the membership we know for the next round (its ``m``): no member
        joined or left in between, so that membership's quorum certifies it. The rounds in
        between are skipped (:meth:`decision` reports them ``skipped``). False when the
        certificate names another membership: a change happened in between, whose own
        certificate we must verify first (we ask for the next round again)."""
        members = self._members.get(self.last_decided + 1)
        if members is None:
            raise MessageRejectedError("invalid", f"decision from {peer[:12]} lacks a proposal")
        got = self._certified_by(msg, members, peer)
        if got is None:
            self.stats["catchup_other_membership"] += 1
            return False
        prop, cert = got
        r = msg.round
        first = self.last_decided + 1
        protocol_log.info(
            "caught up from round %d to %d on a certificate of our membership", first, r
        )
        self.stats["catchup_jumps"] += 1
        self._jumps.append((first, r - 1, list(members)))
        for rr in [rr for rr in self.rounds if rr < r]:
            st = self.rounds.pop(rr)
            st.abandoned = True
            st.done.set()
        self._members[r] = list(members)
        self._epochs_from = max(self._epochs_from, r)
        st = _Round(r, list(members), t0=self.node.now(), threshold=self.cfg.consensus_threshold)
        self.rounds[r] = st
        # every commit in it was verified for this slot: it is the certificate we pass on
        self._decide(st, prop, cert.commits[0].view, dict(msg.body), skipped=True)
        return True


# -- resuming after a restart ------------------------------------------------------------
STATE_FILE = "p2p_round_state.json"


@dataclass(frozen=True)
class ResumeState:
    """The protocol's durable position: ``last_decided`` and the next round's members."""

    last_decided: int
    members_next: list[str]
    # that round's decision certificate (None in files written before it was kept)
    certificate: dict[str, Any] | None = None


def _hexify(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"hex": obj.hex()}
    if isinstance(obj, dict):
        return {k: _hexify(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_hexify(v) for v in obj]
    return obj


def save_resume_state(node_dir: Path, decision: Decision) -> None:
    """Atomically record ``decision`` as the last decided round (tmp + fsync + rename, so a
    crash leaves either the old or the new state, never a torn file)."""
    doc = {
        "last_decided": decision.round,
        "members_next": decision.members_next,
        "certificate": _hexify(decision.certificate),
    }
    atomic_write_text(node_dir / STATE_FILE, json.dumps(doc))


def _unhexify(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"hex"} and isinstance(obj["hex"], str):
            return bytes.fromhex(obj["hex"])
        return {k: _unhexify(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unhexify(v) for v in obj]
    return obj


def load_resume_state(node_dir: Path) -> ResumeState | None:
    """The persisted position, or None when there is none or it is unreadable (then the node
    starts as a new one; a bad file is logged with its path, not fatal)."""
    path = node_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        last, members = int(doc["last_decided"]), doc["members_next"]
        if last < 0 or not members or not all(isinstance(m, str) for m in members):
            raise ValueError("bad last_decided or members_next")
        cert = _unhexify(doc.get("certificate"))
        if cert is not None and not isinstance(cert, dict):
            raise ValueError("bad certificate")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable round state %s: %s", path, e)
        return None
    return ResumeState(last, sorted(set(members)), cert)
