"""Admission of new members: who may join, and the proof that a joiner is live.

Issue 17 #6: an outsider with three keys asked to join and left; the next proposal added all
three, the quorum grew with them, and with them gone the swarm halted. A joiner now counts
toward ``n`` only once it has *proved it is live and connected*:

* it sends ``join{nonce}`` to the members it is connected to (``nonce`` is a proof of work
  under the ``pow`` policy, empty otherwise), and repeats it until admitted;
* a member that holds a live authenticated connection to it (up ``join_min_connected``
  seconds, by default one ``dead_timeout``; a frame within the last three heartbeats) signs
  ``join_ack{peer}`` for its last decided round and sends it to the members, again each
  round while that holds;
* a leader proposes ``{"op": "join", "peer", "req", "acks"}`` with ``q`` acks of distinct
  members of the round, each for one of the last :data:`JOIN_ACK_ROUNDS` rounds; every
  member re-checks them and the admission policy before voting (:func:`check_join_change`);
* at most ``max_joins_per_round`` joins per proposal, applied at the round boundary;
* **full house**: a proposal may carry a join only if it has an entry from every member of
  the round. A joiner that stays live through its admission and then leaves (which no
  liveness proof can tell from an honest crash) leaves the next rounds one entry short, so
  no further join is admitted until it is removed: at most one unproven member at a time,
  whatever the number of keys an attacker holds. The cost: while any member is down or
  late, nobody joins.

Everything here is pure (time is passed in); the round protocol's
:class:`~swarmlm.p2p.membership_changes.MembershipChanges` does the I/O. The admission
settings (policy, allowlist, pow bits, joins per round) are part of the swarm's rules:
members that disagree on them refuse each other's proposals.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.messages import SignedMessage, open_signed

if TYPE_CHECKING:
    from swarmlm.p2p.config import P2PConfig

JOIN_ACK_ROUNDS = 4  # an ack signed at round a counts for rounds a+1 .. a+JOIN_ACK_ROUNDS
MAX_NONCE = 32  # bytes; a longer nonce is refused before hashing
POW_DOMAIN = b"swarmlm/join-pow/v1"
Policy = Literal["open", "allowlist", "pow"]
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _invalid(detail: str) -> MessageRejectedError:
    return MessageRejectedError("invalid", detail)


# -- proof of work ---------------------------------------------------------------------------
def pow_digest(public_key: bytes, nonce: bytes) -> bytes:
    """``SHA-256(POW_DOMAIN || public key || nonce)``. It is bound to the key alone (not to a
    round or a time), so a joiner mints one nonce per identity and reuses it for every
    request: the cost lands on making identities, not on asking again."""
    return hashlib.sha256(POW_DOMAIN + public_key + nonce).digest()


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte:
            return bits + 8 - byte.bit_length()
        bits += 8
    return bits


def pow_ok(public_key: bytes, nonce: bytes, bits: int) -> bool:
    """One hash: cheap for the members that check it."""
    return len(nonce) <= MAX_NONCE and leading_zero_bits(pow_digest(public_key, nonce)) >= bits


def mint_pow(public_key: bytes, bits: int) -> bytes:
    """The first 8-byte counter nonce meeting ``bits``: about ``2**bits`` hashes (20 bits:
    a median of 1.6 s here, 0.4-3.4 s in six tries). CPU-bound: call it off the event loop
    (``asyncio.to_thread``)."""
    prefix = hashlib.sha256(POW_DOMAIN + public_key)
    for i in itertools.count():
        nonce = i.to_bytes(8, "big")
        h = prefix.copy()
        h.update(nonce)
        if leading_zero_bits(h.digest()) >= bits:
            return nonce
    raise AssertionError("unreachable")


# -- admission policy ------------------------------------------------------------------------
def read_allowlist(path: Path) -> list[str]:
    """Node ids or public keys (64 hex chars), one per line; ``#`` starts a comment.
    Raises ValueError naming the file and line of anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"join_allowlist_file {path}: cannot read it ({exc})") from None
    keys = []
    for no, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip().lower()
        if not item:
            continue
        if not _HEX64.match(item):
            raise ValueError(
                f"join_allowlist_file {path} line {no}: {item[:20]!r} is not a node id or "
                "public key (64 hex characters)"
            )
        keys.append(item)
    return keys


@dataclass(frozen=True)
class AdmissionPolicy:
    """Which keys may join. ``open``: any key that proves liveness; ``allowlist``: only the
    listed node ids / public keys (hex); ``pow``: keys whose request carries a nonce with
    ``pow_bits`` leading zero bits (:func:`pow_ok`)."""

    kind: Policy = "open"
    allowed: frozenset[str] = frozenset()
    pow_bits: int = 0

    @classmethod
    def from_config(cls, cfg: P2PConfig) -> AdmissionPolicy:
        allowed = {k.lower() for k in cfg.join_allowlist}
        if cfg.join_allowlist_file is not None:
            allowed.update(read_allowlist(cfg.join_allowlist_file))
        return cls(cfg.join_policy, frozenset(allowed), cfg.join_pow_bits)

    def refusal(self, req: SignedMessage) -> str | None:
        """Why the signed ``join`` request ``req`` is not admissible, or None."""
        who = req.sender[:12]
        if self.kind == "allowlist":
            if req.sender not in self.allowed and req.public_key.hex() not in self.allowed:
                return f"join of {who}: key not on the allowlist"
        elif self.kind == "pow" and not pow_ok(req.public_key, req.body["nonce"], self.pow_bits):
            return f"join of {who}: no valid proof of work ({self.pow_bits} bits)"
        return None


# -- what a member checks in a proposal ------------------------------------------------------
def ack_counts(ack: SignedMessage, peer: str, members: list[str], round: int) -> bool:
    """A ``join_ack`` counts toward admitting ``peer`` in ``round``: from a member of the
    round, for this peer, signed for one of the last :data:`JOIN_ACK_ROUNDS` rounds."""
    return (
        ack.kind == "join_ack"
        and ack.body["peer"] == peer
        and ack.sender in members
        and round - JOIN_ACK_ROUNDS <= ack.round < round
    )


def check_join_change(
    change: dict[str, Any],
    members: list[str],
    round: int,
    q: int,
    policy: AdmissionPolicy | None = None,
) -> str:
    """Validate a ``join`` change of a proposal for ``round`` (members ``members``, quorum
    ``q``); returns the joiner's id or raises MessageRejectedError (``invalid``).

    ``policy``: also require the admission policy to admit the request. The round protocol
    passes None: each member applies its own policy when it *acknowledges* a joiner, and
    the ``q`` acks (at least ``f + 1`` of them honest) carry that vetting into the proposal.
    Re-checking a local policy here would make a proposal's validity depend on each
    member's settings, so members configured differently would split on it and lose a
    view change per round while the join is pending (issue 17 review).

    Cheap checks first: the ack list may hold at most ``len(members)`` items, so a padded
    list costs no signature checks."""
    if set(change) != {"op", "peer", "req", "acks"} or change["op"] != "join":
        raise _invalid("join change must have exactly op, peer, req, acks")
    peer, acks = change["peer"], change["acks"]
    if not isinstance(peer, str) or peer in members:
        raise _invalid("join change for a member or a malformed peer")
    if not isinstance(acks, list) or not q <= len(acks) <= len(members):
        raise _invalid(f"join of {peer[:12]}: {_len(acks)} acks (need {q}..{len(members)})")
    req = open_signed(change["req"])
    if req.kind != "join" or req.sender != peer:
        raise _invalid(f"join of {peer[:12]}: not its own signed join request")
    why = policy.refusal(req) if policy is not None else None
    if why is not None:
        raise _invalid(why)
    voters = set()
    for wire in acks:
        ack = open_signed(wire)
        if not ack_counts(ack, peer, members, round) or ack.sender in voters:
            raise _invalid(f"join of {peer[:12]}: ack from {ack.sender[:12]} does not count")
        voters.add(ack.sender)
    return peer


def _len(x: object) -> int | str:
    return len(x) if isinstance(x, list) else type(x).__name__


def joiner_is_live(
    connected_since: float | None,
    last_contact: float | None,
    now: float,
    min_connected: float,
    max_silence: float,
) -> bool:
    """What a member must see before it acknowledges a joiner: a connection up for at least
    ``min_connected`` seconds and a frame (heartbeat or message) within ``max_silence``."""
    return (
        connected_since is not None
        and last_contact is not None
        and now - connected_since >= min_connected
        and now - last_contact <= max_silence
    )


# -- the join table --------------------------------------------------------------------------
@dataclass
class Candidate:
    """A would-be member: its newest signed request and the members' acks for it."""

    request: SignedMessage | None = None
    first_seen: float = 0.0
    last_seen: float = 0.0
    acks: dict[str, SignedMessage] = field(default_factory=dict)  # member -> newest ack
    acked_at: int = -1  # the last round we acknowledged it for (one ack per round)


class JoinTable:
    """Pending joiners, bounded (``max_requests``; the least recently refreshed goes first)
    and expiring (``ttl`` seconds after its last request or ack). A joiner repeats its
    request every round, so an honest one stays while a vanished one is forgotten."""

    def __init__(self, max_requests: int, ttl: float) -> None:
        self.max_requests = max_requests
        self.ttl = ttl
        self._c: OrderedDict[str, Candidate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._c)

    def __contains__(self, peer: object) -> bool:
        return peer in self._c

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._c))

    def get(self, peer: str) -> Candidate | None:
        return self._c.get(peer)

    def pop(self, peer: str, default: Any = None) -> Candidate | Any:
        return self._c.pop(peer, default)

    def _touch(self, peer: str, now: float) -> Candidate:
        c = self._c.get(peer)
        if c is None:
            self.prune(now)
            while len(self._c) >= self.max_requests:
                self._c.popitem(last=False)
            c = self._c[peer] = Candidate(first_seen=now)
        c.last_seen = now
        self._c.move_to_end(peer)
        return c

    def add_request(self, req: SignedMessage, now: float) -> Candidate:
        c = self._touch(req.sender, now)
        c.request = req
        return c

    def add_ack(self, ack: SignedMessage, now: float) -> None:
        """Keep each member's newest ack. An ack may arrive before the request itself, but
        an ack for a joiner we do not know never pushes a known one out of a full table (a
        faulty member could otherwise flush honest joiners with acks for invented ones)."""
        if ack.body["peer"] not in self._c:
            self.prune(now)
            if len(self._c) >= self.max_requests:
                return
        c = self._touch(ack.body["peer"], now)
        old = c.acks.get(ack.sender)
        if old is None or ack.round >= old.round:
            c.acks[ack.sender] = ack

    def prune(self, now: float) -> None:
        for peer in [p for p, c in self._c.items() if now - c.last_seen > self.ttl]:
            del self._c[peer]

    def fresh_acks(self, peer: str, members: list[str], round: int) -> list[SignedMessage]:
        c = self._c.get(peer)
        if c is None:
            return []
        return [a for a in c.acks.values() if ack_counts(a, peer, members, round)]

    def admissible(
        self, members: list[str], round: int, q: int, limit: int
    ) -> list[tuple[str, SignedMessage, list[SignedMessage]]]:
        """Up to ``limit`` joiners (longest waiting first) with a request and ``q`` counting
        acks for ``round``: ``(peer, request, q acks)``."""
        out: list[tuple[str, SignedMessage, list[SignedMessage]]] = []
        for peer, c in sorted(self._c.items(), key=lambda kv: (kv[1].first_seen, kv[0])):
            if len(out) >= limit:
                break
            acks = self.fresh_acks(peer, members, round)
            if c.request is not None and peer not in members and len(acks) >= q:
                out.append((peer, c.request, sorted(acks, key=lambda a: a.sender)[:q]))
        return out
