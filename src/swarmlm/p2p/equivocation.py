"""Equivocation (docs/protocol.md, "Equivocation"): two different signed contributions,
proposals or votes of one peer for one slot prove it faulty.

A node records such a proof (one per offender, only for peers it knows), penalises the
offender, gossips the proof to the members, and the next proposal removes the offender
(:meth:`~swarmlm.p2p.membership_changes.MembershipChanges._changes_for`). The proof itself
is checked by the pure :func:`swarmlm.p2p.certificates.verify_equivocation_proof`.
"""

from __future__ import annotations

from typing import Any

from swarmlm.p2p.certificates import peek_signer, verify_equivocation_proof
from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.p2p.round_state import ProtocolCore, _Round, log

VOTE_KINDS = ("prepare", "commit")


class Equivocation(ProtocolCore):
    """Detecting, verifying, recording and gossiping equivocation proofs."""

    def _verify_proof(self, proof: Any) -> str | None:
        """The offender's id if ``proof`` holds two conflicting signed messages, else None."""
        got = verify_equivocation_proof(proof, self._phash)
        return got.offender if got is not None else None

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

    def _cross_check_votes(self, st: _Round, votes: list[SignedMessage]) -> None:
        """Votes relayed inside certificates can expose a peer that voted two ways."""
        for v in votes:
            if v.kind in VOTE_KINDS and v.round == st.round:
                mine = st.seen_votes.get((v.kind, v.body["view"], v.sender))
                if mine is not None and mine.body["h"] != v.body["h"]:
                    self._record_equivocation(mine, v)
