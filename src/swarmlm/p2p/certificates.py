"""Typed round-protocol messages and their validation, as pure functions.

Nothing here touches a node, a socket or a clock: every function takes the facts it needs
(the round's members, its quorum size, the leader of each view) and either returns a typed
value or raises :class:`~swarmlm.p2p.errors.MessageRejectedError`. A handler that lets the
error propagate makes the transport charge the peer that sent the message (its score falls
by ``PENALTIES[reason]``), so a malformed but *signed* message always costs its sender.

Validation order (docs/protocol.md, "Validation order and penalties"): cheap structural
checks first (types, ranges, lengths, list sizes, duplicate and non-member signers read from
the unverified envelopes), Ed25519 signatures last. Verifying a signature is the costly step
(~0.1 ms each), so a certificate padded with thousands of votes is refused after reading at
most ``len(members) + 1`` list lengths and envelopes, never after verifying them.

The module also holds the bounded structure the protocol keeps messages in until they can
be processed: :class:`FutureBuffer` (messages for rounds not yet open). Per-peer request
rate limits are :class:`swarmlm.p2p.limits.RateLimiter`, applied by the transport.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.identity import canonical_encode
from swarmlm.p2p.messages import SignedMessage, open_signed

HASH_SIZE = 32  # proposal hashes (SHA-256) and payload digests
MAX_VIEW = 1 << 20  # no honest round goes through a million views; bounds 2**view timers
MAX_VIEW_AHEAD = 64  # a VIEWCHANGE further ahead of our view is refused

Leader = Callable[[int], str]
"""The leader of the round being checked, as a function of the view."""
ProposalHasher = Callable[[SignedMessage], bytes]


class Phase(enum.StrEnum):
    """The two voting phases of a view; the values are the wire kinds."""

    PREPARE = "prepare"
    COMMIT = "commit"


def members_hash(members: Iterable[str]) -> bytes:
    """``m`` of a round: SHA-256 of the canonical encoding of its sorted, distinct members.

    Why a proposal carries it (and ``h`` covers it): a certificate then names the
    membership that decided it, so a node far behind can check a *later* round's
    certificate against the membership it knows. If any member joined or left in between,
    ``m`` differs and the certificate is not used (docs/protocol.md, "Catching up at any
    distance"); without ``m`` a responder could hide a membership change."""
    return hashlib.sha256(canonical_encode(sorted(set(members)))).digest()


def proposal_hash(round: int, entries: list[Any], changes: list[Any], m: bytes) -> bytes:
    """``h`` of a proposal: independent of the view, so a re-proposal keeps its hash."""
    return hashlib.sha256(
        canonical_encode({"r": round, "e": entries, "c": changes, "m": m})
    ).digest()


def hash_of_proposal(msg: SignedMessage) -> bytes:
    b = msg.body
    return proposal_hash(msg.round, b["entries"], b["changes"], b["m"])


def _invalid(detail: str) -> MessageRejectedError:
    return MessageRejectedError("invalid", detail)


# -- typed messages ------------------------------------------------------------------------
@dataclass(frozen=True)
class Vote:
    """A verified PREPARE or COMMIT for ``(round, view, h)``."""

    phase: Phase
    round: int
    view: int
    h: bytes
    sender: str
    msg: SignedMessage


@dataclass(frozen=True)
class Proposal:
    """A verified proposal. ``entries`` are ``[peer, signed contrib]`` pairs (signatures of
    the contributions are checked by the protocol, which also records their payloads)."""

    round: int
    view: int
    leader: str
    entries: list[Any]
    changes: list[Any]
    justify: list[Any]
    h: bytes
    msg: SignedMessage


@dataclass(frozen=True)
class DecisionCertificate:
    """A proposal plus ``>= q`` COMMITs for it from distinct members: the round decided it."""

    proposal: Proposal
    commits: list[Vote]


@dataclass(frozen=True)
class EquivocationProof:
    """Two different signed messages of one peer for the same slot."""

    offender: str
    a: SignedMessage
    b: SignedMessage

    def to_wire(self) -> dict[str, Any]:
        return {"a": self.a.to_wire(), "b": self.b.to_wire()}


# -- structural checks of signed messages (no signature is verified here) ------------------
def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_view(kind: str, who: str, view: object) -> None:
    if not _is_int(view) or not 0 <= view <= MAX_VIEW:  # type: ignore[operator]
        raise _invalid(f"{kind} from {who}: view {view!r} outside 0..{MAX_VIEW}")


def _is_signed_shape(wire: object) -> bool:
    return (
        isinstance(wire, dict)
        and isinstance(wire.get("m"), bytes)
        and isinstance(wire.get("s"), bytes)
        and len(wire["s"]) == 64
    )


def check_body(msg: SignedMessage) -> None:
    """Kind-specific checks of a verified round message beyond the type schema of
    :data:`swarmlm.p2p.messages.SCHEMAS`: ranges, lengths and nested shapes. Raises
    ``invalid`` so the sender is charged; other kinds pass unchanged."""
    b, kind, who = msg.body, msg.kind, msg.sender[:12]
    if kind in ("prepare", "commit"):
        _check_view(kind, who, b["view"])
        if len(b["h"]) != HASH_SIZE:
            raise _invalid(f"{kind} from {who}: 'h' has {len(b['h'])} bytes, not {HASH_SIZE}")
    elif kind == "propose":
        # only the view and m here: list contents are checked after their lengths are
        # bounded by the round's membership (check_entries_shape, precheck_signers)
        _check_view(kind, who, b["view"])
        if len(b["m"]) != HASH_SIZE:
            raise _invalid(f"propose from {who}: 'm' has {len(b['m'])} bytes, not {HASH_SIZE}")
    elif kind == "viewchange":
        _check_view(kind, who, b["view"])
        if b["view"] == 0:
            raise _invalid(f"viewchange from {who} to view 0")
        prep = b["prepared"]
        if prep is not None and not (
            set(prep) == {"proposal", "votes"}
            and _is_signed_shape(prep["proposal"])
            and isinstance(prep["votes"], list)
        ):
            raise _invalid(f"viewchange from {who}: prepared certificate malformed")
    elif kind == "decided":
        if not _is_signed_shape(b["proposal"]):
            raise _invalid(f"decided from {who}: proposal is not a signed message")
    elif kind == "contrib" and (len(b["digest"]) != HASH_SIZE or b["size"] < 0):
        raise _invalid(f"contrib from {who}: bad digest length or negative size")


def check_entries_shape(entries: list[Any], who: str) -> list[str]:
    """Peers named by a proposal's ``[peer, signed contrib]`` entries, which must be sorted
    and distinct (checked before the contributions' signatures). Call after bounding
    ``len(entries)``."""
    peers = []
    for e in entries:
        if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)):
            raise _invalid(f"proposal from {who}: malformed entry (not [peer, contribution])")
        if not _is_signed_shape(e[1]) or peek_signer(e[1]) != e[0]:
            raise _invalid(f"proposal from {who}: bad contribution of {e[0][:12]}")
        peers.append(e[0])
    if peers != sorted(set(peers)):
        raise _invalid(f"proposal from {who}: entries unsorted/dup")
    return peers


def peek_signer(wire: object) -> str | None:
    """The claimed sender of a signed message WITHOUT verifying it (None if unreadable).

    Only to refuse a set of signed messages cheaply (duplicates, non-members) before any
    signature is checked; a signer read here is verified later or the set is refused."""
    if not _is_signed_shape(wire):
        return None
    try:
        m = msgpack.unpackb(wire["m"], raw=False, strict_map_key=True)  # type: ignore[index]
    except Exception:
        return None
    sender = m.get("from") if isinstance(m, dict) else None
    return sender if isinstance(sender, str) else None


def precheck_signers(wires: object, members: Iterable[str], what: str) -> list[str]:
    """Claimed signers of a set of signed messages each member may sign once (votes of a
    certificate, eviction votes, view-change justifications), checked BEFORE any signature:
    a non-list, more entries than members, an unreadable entry, a duplicate signer or a
    non-member refuses the whole set. Costs O(len(members)) whatever the set's size."""
    allowed = set(members)
    if not isinstance(wires, list):
        raise _invalid(f"{what}: not a list")
    if len(wires) > len(allowed):
        raise _invalid(f"{what}: {len(wires)} signatures for {len(allowed)} members")
    signers: list[str] = []
    seen: set[str] = set()
    for w in wires:
        s = peek_signer(w)
        if s is None:
            raise _invalid(f"{what}: an entry is not a readable signed message")
        if s in seen:
            raise _invalid(f"{what}: {s[:12]} signed twice")
        if s not in allowed:
            raise _invalid(f"{what}: {s[:12]} is not a member")
        seen.add(s)
        signers.append(s)
    return signers


def check_members_hash(proposal: SignedMessage, members: Iterable[str], what: str) -> None:
    """A proposal names the membership of its round (``m``): refuse it for any other."""
    if proposal.body["m"] != members_hash(members):
        raise _invalid(f"{what}: the proposal of {proposal.sender[:12]} names another membership")


# -- typed parsing of verified messages ----------------------------------------------------
def parse_proposal(
    msg: SignedMessage, round: int, leader: Leader, phash: ProposalHasher = hash_of_proposal
) -> Proposal:
    """A proposal of ``round`` signed by the leader of its view (contents unchecked)."""
    if msg.kind != "propose" or msg.round != round:
        raise _invalid(f"{msg.kind} of round {msg.round} is not a proposal for round {round}")
    check_body(msg)
    view = int(msg.body["view"])
    if msg.sender != leader(view):
        raise _invalid(f"proposal from non-leader {msg.sender[:12]}, view {view}")
    b = msg.body
    return Proposal(
        round, view, msg.sender, b["entries"], b["changes"], b["justify"], phash(msg), msg
    )


def parse_vote(msg: SignedMessage) -> Vote:
    if msg.kind not in ("prepare", "commit"):
        raise _invalid(f"{msg.kind} from {msg.sender[:12]} is not a vote")
    check_body(msg)
    b = msg.body
    return Vote(Phase(msg.kind), msg.round, int(b["view"]), b["h"], msg.sender, msg)


def _signed_set(wires: object, members: list[str], q: int, what: str) -> list[Any]:
    """A set of ``q..n`` signed messages from distinct members, before any signature."""
    precheck_signers(wires, members, what)
    assert isinstance(wires, list)
    if len(wires) < q:
        raise _invalid(f"{what}: too few votes ({len(wires)} < quorum {q})")
    return wires


def _votes_for(
    wires: list[Any], phase: Phase, prop: Proposal, what: str, any_view: bool = False
) -> list[Vote]:
    """Verify each vote (the costly step, at most ``n`` of them) and require it to be for
    exactly ``prop``'s slot: an honest certificate never carries another vote.

    ``any_view``: the votes may be of a later view than the proposal, all of one view (a
    decision in view 1 on the re-proposal of view 0's entries has the same ``h``)."""
    votes = []
    view = prop.view
    for i, w in enumerate(wires):
        v = parse_vote(open_signed(w))
        if any_view and i == 0 and v.view >= prop.view:
            view = v.view
        if (v.phase, v.round, v.view, v.h) != (phase, prop.round, view, prop.h):
            raise _invalid(f"{what}: the vote of {v.sender[:12]} is for another slot")
        votes.append(v)
    return votes


def check_decision_certificate(
    cert: object,
    members: list[str],
    round: int,
    leader: Leader,
    q: int,
    phash: ProposalHasher = hash_of_proposal,
) -> DecisionCertificate:
    """``{"proposal", "commits"}`` (a ``decided`` body): ``>= q`` COMMITs from distinct
    members for the leader's proposal. Structure and signers are checked first."""
    if not isinstance(cert, dict) or set(cert) != {"proposal", "commits"}:
        raise _invalid("decision certificate malformed")
    wires = _signed_set(cert["commits"], members, q, "decision certificate")
    prop = parse_proposal(open_signed(cert["proposal"]), round, leader, phash)
    check_members_hash(prop.msg, members, "decision certificate")
    commits = _votes_for(wires, Phase.COMMIT, prop, "decision certificate", any_view=True)
    return DecisionCertificate(prop, commits)


def verify_equivocation_proof(
    proof: object, phash: ProposalHasher = hash_of_proposal
) -> EquivocationProof | None:
    """An :class:`EquivocationProof` if ``proof`` (``{"a", "b"}``) holds two conflicting
    signed messages of one peer for one slot: contributions to one round with different
    digests, votes of one phase and view with different ``h``, or proposals of one view
    with different contents. None for anything else (including bad signatures).

    What the round protocol accepts, exactly: any two validly signed messages that
    conflict so; their bodies are not range-checked again (:func:`check_body`)."""
    try:
        a, b = open_signed(proof["a"]), open_signed(proof["b"])  # type: ignore[index]
    except (MessageRejectedError, KeyError, TypeError):
        return None
    if a.sender != b.sender or a.kind != b.kind or a.round != b.round or a.raw == b.raw:
        return None
    if a.kind == "contrib":
        differ = a.body["digest"] != b.body["digest"]
    elif a.kind in ("prepare", "commit"):
        differ = a.body["view"] == b.body["view"] and a.body["h"] != b.body["h"]
    elif a.kind == "propose":
        differ = a.body["view"] == b.body["view"] and phash(a) != phash(b)
    else:
        differ = False
    return EquivocationProof(a.sender, a, b) if differ else None


# -- bounded structures for messages that cannot be processed yet --------------------------
class Admit(enum.Enum):
    """What :meth:`FutureBuffer.add` did with a message."""

    BUFFERED = "buffered"
    DUPLICATE = "duplicate"  # the same content from the same peer is already held
    PEER_FULL = "peer_full"  # the peer used its share: it floods
    FULL = "full"  # the global cap is reached


class FutureBuffer:
    """Messages for rounds that are not open yet, bounded per peer and per round, per peer
    overall and globally, without duplicates (same peer, kind and body: a re-signed resend
    counts once). Pure: no clock, no node."""

    def __init__(self, per_peer_round: int, per_peer: int, total: int) -> None:
        self.per_peer_round = per_peer_round
        self.per_peer = per_peer
        self.total = total
        self._by_round: dict[int, list[tuple[SignedMessage, str]]] = {}
        self._keys: dict[int, set[bytes]] = {}
        self._count: dict[tuple[str, int], int] = {}  # (peer, round) -> held
        self._per_peer: dict[str, int] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def rounds(self) -> list[int]:
        return sorted(self._by_round)

    def held_by(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    @staticmethod
    def _key(msg: SignedMessage, peer: str) -> bytes:
        return hashlib.sha256(canonical_encode([peer, msg.kind, msg.body])).digest()

    def add(self, r: int, msg: SignedMessage, peer: str) -> Admit:
        key = self._key(msg, peer)
        keys = self._keys.get(r)
        if keys is not None and key in keys:
            return Admit.DUPLICATE
        if self._count.get((peer, r), 0) >= self.per_peer_round:
            return Admit.PEER_FULL
        if self._per_peer.get(peer, 0) >= self.per_peer:
            return Admit.PEER_FULL
        if self._n >= self.total:
            return Admit.FULL
        self._by_round.setdefault(r, []).append((msg, peer))
        self._keys.setdefault(r, set()).add(key)
        self._count[(peer, r)] = self._count.get((peer, r), 0) + 1
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._n += 1
        return Admit.BUFFERED

    def pop(self, r: int) -> list[tuple[SignedMessage, str]]:
        """Remove and return round ``r``'s messages in arrival order."""
        items = self._by_round.pop(r, [])
        self._keys.pop(r, None)
        for _, peer in items:
            self._count.pop((peer, r), None)
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]
        self._n -= len(items)
        return items

    def drop_through(self, r: int) -> int:
        """Forget rounds ``<= r`` (decided or skipped by catch-up); returns how many."""
        return sum(len(self.pop(k)) for k in [k for k in self._by_round if k <= r])
