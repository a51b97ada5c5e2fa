"""View change (docs/protocol.md, "View change"): when a round does not decide in time,
members move to the next view and its leader re-proposes what may have been decided.

The timer per round, entering a view (VIEWCHANGE with our highest prepared certificate),
following ``f + 1`` VIEWCHANGEs to a higher view, the checks of prepared certificates and
of a view-``v > 0`` proposal's justification, and the prepared lock a restarted member
takes back from its vote log.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from swarmlm.p2p.certificates import MAX_VIEW_AHEAD, check_members_hash, precheck_signers
from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.p2p.round_state import ProtocolCore, _Round, log

MAX_VIEW_TIMEOUT_FACTOR = 8


class ViewChange(ProtocolCore):
    """Timeouts, VIEWCHANGE, re-proposal after a view change, and their validation."""

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

    def _on_viewchange(self, st: _Round, msg: SignedMessage, peer: str) -> None:
        view = msg.body["view"]
        if view <= 0 or view > st.view + MAX_VIEW_AHEAD:
            raise MessageRejectedError("invalid", f"viewchange to view {view} from {peer[:12]}")
        prepared = msg.body["prepared"]
        if prepared is not None:
            self._check_prepared_cert(st, prepared)
        st.viewchanges.setdefault(view, {})[msg.sender] = msg
        higher = {v for v, vcs in st.viewchanges.items() if v > st.view and len(vcs) > st.n - st.q}
        if higher:
            self._enter_view(st, min(higher), announce=True)

    def _justification_for(
        self, st: _Round, view: int
    ) -> tuple[list[Any], dict[str, Any] | None] | None:
        """As the leader of view ``view > 0``: the ``q`` VIEWCHANGEs that justify our
        proposal and the highest prepared certificate they carry (its entries and changes
        are re-proposed, so ``h`` is unchanged), or None until we hold ``q`` of them."""
        vcs = st.viewchanges.get(view, {})
        if len(vcs) < st.q:
            return None
        justify = [m.to_wire() for m in list(vcs.values())[: st.q]]
        entries_from: dict[str, Any] | None = None
        best_view = -1
        for m in list(vcs.values())[: st.q]:
            prep = m.body["prepared"]
            if prep is not None:
                pv = open_signed(prep["proposal"]).body["view"]
                if pv > best_view:
                    entries_from, best_view = prep, pv
        return justify, entries_from

    def _check_justification(self, st: _Round, msg: SignedMessage) -> None:
        """Raise MessageRejectedError unless the view-``v > 0`` proposal ``msg`` carries ``q``
        distinct members' VIEWCHANGEs for exactly ``(r, v)``, each prepared certificate in
        them is valid, and it re-proposes the highest of those certificates."""
        b, view = msg.body, msg.body["view"]
        who = msg.sender[:12]
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
