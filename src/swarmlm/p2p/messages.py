"""Signed protocol messages and the validation pipeline every inbound message goes through.

A message travels as the frame ``{"t": "msg", "m": <bytes>, "s": <64-byte signature>}``
where ``m`` is the canonical msgpack encoding (:func:`canonical_encode`) of::

    {"k": kind, "from": sender node id, "pk": sender public key (32 bytes),
     "seq": per-sender sequence number, "r": round (0 when not round-scoped),
     "ts": sender's unix time in seconds (float), "b": kind-specific body map}

The signature covers exactly the bytes ``m``, so receivers verify before decoding anything
else, and signed messages can be embedded verbatim in other messages (votes inside
certificates, two conflicting messages inside an equivocation proof) and re-verified by
anyone. ``from`` must equal ``node_id_from_public_key(pk)``.

Pipeline order (:meth:`MessageValidator.check`): blacklisted sender connection -> frame
shape -> signature -> sender/key binding -> body schema -> staleness -> replay. Each
rejection raises :class:`MessageRejectedError` with a stable ``reason`` token that the
caller counts and turns into a score penalty for the connection it came from.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.identity import (
    NodeIdentity,
    canonical_encode,
    node_id_from_public_key,
    verify_signature,
)

log = logging.getLogger(__name__)

# Body schemas: field name -> accepted python types after msgpack decoding. Extra fields are
# refused so that a signed message means exactly one thing.
_INT = (int,)
_BYTES = (bytes,)
_LIST = (list,)
_OPT_DICT = (dict, type(None))
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"addr": _LIST},
    "ping": {},
    "pong": {},
    "peer_record": {"addr": _LIST},
    "peers": {"records": _LIST},
    "contrib": {"digest": _BYTES, "size": _INT},
    "propose": {"view": _INT, "entries": _LIST, "changes": _LIST, "justify": _LIST, "m": _BYTES},
    "prepare": {"view": _INT, "h": _BYTES},
    "commit": {"view": _INT, "h": _BYTES},
    "viewchange": {"view": _INT, "prepared": _OPT_DICT},
    "decided_req": {},
    "decided": {"proposal": (dict,), "commits": _LIST},
    "fetch": {"digest": _BYTES},
    "nofetch": {"digest": _BYTES},
    "equivocation": {"a": (dict,), "b": (dict,)},
    # membership admission (swarmlm.p2p.membership): nonce = proof of work under the pow
    # policy (empty otherwise); a member's join_ack says it holds a live link to ``peer``
    "join": {"nonce": _BYTES},
    "join_ack": {"peer": (str,)},
    "leave": {},
    "evict": {"peer": (str,)},
    "status_req": {},
    "status": {"members": _LIST},
    # the integrated node's role announcement (swarmlm.node): which components a peer runs
    "node_info": {"name": (str,), "type": (str,), "web_port": _INT},
    # curation replication (swarmlm.node.replication checks list contents and sizes)
    "cur_records": {"records": _LIST},
    "cur_summary": {"summary": _BYTES, "total": _INT},
    "cur_digests_req": {"buckets": _LIST},
    "cur_digests": {"lists": _LIST},
    "cur_fetch": {"digests": _LIST},
    # partitioned aggregation (swarmlm.swarm.partitioned): an aggregator's signed output
    # digest for one part of round r, and the inputs it could not fetch
    "part_claim": {"part": _INT, "missing": _LIST, "output": _BYTES},
}


@dataclass(frozen=True)
class SignedMessage:
    """A verified message. ``raw``/``sig`` are kept so it can be embedded and re-checked."""

    kind: str
    sender: str
    public_key: bytes
    seq: int
    round: int
    ts: float
    body: dict[str, Any]
    raw: bytes
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        """The ``{"m", "s"}`` pair used both as a frame payload and when embedded."""
        return {"m": self.raw, "s": self.sig}


class MessageSigner:
    """Signs outgoing messages with a per-process, strictly increasing sequence number.

    The sequence starts at the current time in microseconds so that a restarted node does
    not reuse numbers its peers have already seen (which would look like replays).
    """

    def __init__(self, identity: NodeIdentity, clock: Callable[[], float] = time.time) -> None:
        # ``clock`` is the wall clock (s since the epoch) stamped on each message; the
        # deterministic simulator passes its skewed virtual one (docs/simulation.md)
        self.identity = identity
        self.clock = clock
        self._seq = itertools.count(int(clock() * 1_000_000))

    def sign(self, kind: str, body: dict[str, Any], round: int = 0) -> SignedMessage:
        seq, ts = next(self._seq), float(self.clock())
        m = {
            "k": kind,
            "from": self.identity.node_id,
            "pk": self.identity.public_key_bytes,
            "seq": seq,
            "r": round,
            "ts": ts,
            "b": body,
        }
        raw = canonical_encode(m)
        sig = self.identity.sign(raw)
        ident = self.identity
        return SignedMessage(
            kind, ident.node_id, ident.public_key_bytes, seq, round, ts, body, raw, sig
        )


def open_signed(wire: Any) -> SignedMessage:
    """Verify and decode an ``{"m", "s"}`` pair; raises MessageRejectedError on any defect.

    Used for direct messages and for messages embedded in others. Never raises anything
    but MessageRejectedError, whatever ``wire`` holds.
    """
    if not isinstance(wire, dict):
        raise MessageRejectedError("malformed", "signed message must be a map")
    raw, sig = wire.get("m"), wire.get("s")
    if not isinstance(raw, bytes) or not isinstance(sig, bytes):
        raise MessageRejectedError("malformed", "signed message needs bytes fields 'm' and 's'")
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception:
        raise MessageRejectedError("malformed", "message body is not valid msgpack") from None
    if not isinstance(m, dict):
        raise MessageRejectedError("malformed", "message body must be a map")
    kind, sender, pk = m.get("k"), m.get("from"), m.get("pk")
    seq, rnd, ts, body = m.get("seq"), m.get("r"), m.get("ts"), m.get("b")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise MessageRejectedError("malformed", f"unknown message kind {kind!r}")
    if not isinstance(sender, str) or not isinstance(pk, bytes) or len(pk) != 32:
        raise MessageRejectedError("malformed", f"{kind}: 'from' (str) / 'pk' (32 bytes) invalid")
    if not isinstance(seq, int) or not isinstance(rnd, int) or not isinstance(ts, float):
        raise MessageRejectedError("malformed", f"{kind}: 'seq', 'r' or 'ts' has the wrong type")
    if isinstance(seq, bool) or isinstance(rnd, bool) or rnd < 0:
        raise MessageRejectedError("malformed", f"{kind}: 'seq', 'r' or 'ts' has the wrong type")
    if not isinstance(body, dict):
        raise MessageRejectedError("malformed", f"{kind}: body 'b' must be a map")
    if set(m) != {"k", "from", "pk", "seq", "r", "ts", "b"}:
        raise MessageRejectedError("malformed", f"{kind}: unexpected envelope fields")
    if not verify_signature(pk, sig, raw):
        raise MessageRejectedError("forged", f"{kind} claiming {sender[:12]}: bad signature")
    if node_id_from_public_key(pk) != sender:
        raise MessageRejectedError("forged", f"{kind}: key does not match sender {sender[:12]}")
    schema = SCHEMAS[kind]
    if set(body) != set(schema):
        raise MessageRejectedError(
            "malformed",
            f"{kind} from {sender[:12]}: body fields {sorted(body)} != {sorted(schema)}",
        )
    for name, types in schema.items():
        if not isinstance(body[name], types) or (types == _INT and not _is_int(body[name])):
            raise MessageRejectedError(
                "malformed", f"{kind} from {sender[:12]}: field {name!r} has the wrong type"
            )
    return SignedMessage(kind, sender, pk, seq, rnd, ts, body, raw, sig)


def peek_envelope(wire: Any) -> tuple[str, str, int] | None:
    """(claimed kind, sender, seq) of a signed message WITHOUT verifying it, or None.

    Why: the cheap per-peer checks (request rate, an exact duplicate of a message we hold)
    should run before the costly signature check, so a flood over an authenticated
    connection is dropped for the price of a msgpack decode (issue 17 review). The claim is
    only used to drop; everything kept is verified afterwards."""
    try:
        # read the three fields and skip the rest (the body) without building it: a third
        # of a full decode for a multi-megabyte message
        u = msgpack.Unpacker(raw=False, strict_map_key=True)
        u.feed(wire["m"])
        got: dict[str, Any] = {}
        for _ in range(min(u.read_map_header(), 16)):
            key = u.unpack()
            if key in ("k", "from", "seq"):
                got[key] = u.unpack()
            else:
                u.skip()
        kind, sender, seq = got["k"], got["from"], got["seq"]
    except Exception:
        return None
    if isinstance(kind, str) and isinstance(sender, str) and _is_int(seq):
        return kind, sender, seq
    return None


def peek_sender_ts(wire: Any) -> tuple[str, float] | None:
    """(claimed sender, timestamp) of a signed message WITHOUT verifying it, or None.

    Only for deciding whether a message is worth verifying (e.g. a peer record we already
    hold a newer copy of); never trust the result for anything else.
    """
    try:
        m = msgpack.unpackb(wire["m"], raw=False, strict_map_key=True)
        sender, ts = m["from"], m["ts"]
    except Exception:
        return None
    if isinstance(sender, str) and isinstance(ts, float):
        return sender, ts
    return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Score penalties per rejection reason. Forgery and garbage are never honest mistakes.
PENALTIES: dict[str, float] = {
    "malformed": 5.0,
    "oversized": 10.0,
    "forged": 10.0,
    "replayed": 2.0,
    "stale": 1.0,
    "wrong_sender": 10.0,
    "equivocation": 100.0,
    "bad_blob": 5.0,
    "unsolicited_blob": 0.1,  # honest fetch/push races cause these; skipping them is cheap
    "invalid": 5.0,
    # charged at most once per second while a peer exceeds its request rate (transport):
    # -2/s against +0.1/s recovery bans a sustained flood after ~16 s, while a laggard's
    # catch-up burst beyond the bucket costs a few points at most
    "flood": 2.0,
}


# Drops that never cost score. An exact duplicate of a recent message can only come from
# its own signer (direct messages must be signed by the connection's peer) and harms no
# one: dropping it is enough; the transport charges a stream of them as a flood.
UNSCORED = frozenset({"blacklisted", "duplicate"})


@dataclass
class PeerScores:
    """Per-peer scores with time-limited blacklisting.

    Scores start at 0, fall by :data:`PENALTIES` per offence and recover by
    ``recovery_per_s`` toward 0. At or below ``blacklist_threshold`` the peer is
    blacklisted for ``blacklist_seconds`` (connections refused, messages dropped). The
    table is bounded by ``max_peers`` (least recently touched entries are forgotten first,
    except blacklisted ones).
    """

    blacklist_threshold: float = -30.0
    blacklist_seconds: float = 300.0
    recovery_per_s: float = 0.1
    max_peers: int = 4096
    _scores: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)
    _blacklist: dict[str, float] = field(default_factory=dict)
    offences: Counter[str] = field(default_factory=Counter)
    # monotonic seconds; the simulator passes its virtual clock
    clock: Callable[[], float] = field(default_factory=lambda: time.monotonic)

    def score(self, peer: str) -> float:
        now = self.clock()
        value, at = self._scores.get(peer, (0.0, now))
        return min(0.0, value + (now - at) * self.recovery_per_s)

    def penalize(self, peer: str, reason: str) -> None:
        now = self.clock()
        new = self.score(peer) - PENALTIES.get(reason, 1.0)
        self._scores[peer] = (new, now)
        self._scores.move_to_end(peer)
        self.offences[peer] += 1
        if new <= self.blacklist_threshold and peer not in self._blacklist:
            self._blacklist[peer] = now + self.blacklist_seconds
            log.warning("blacklisted peer %s for %.0f s (score %.1f)", peer[:12],
                        self.blacklist_seconds, new)  # fmt: skip
        while len(self._scores) > self.max_peers:
            self._scores.popitem(last=False)

    def is_blacklisted(self, peer: str) -> bool:
        until = self._blacklist.get(peer)
        if until is None:
            return False
        if self.clock() >= until:
            del self._blacklist[peer]
            self._scores.pop(peer, None)
            return False
        return True

    def blacklisted(self) -> list[str]:
        return [p for p in list(self._blacklist) if self.is_blacklisted(p)]


class ReplayGuard:
    """Remembers recently seen (sender, seq) pairs within a sliding window per sender.

    A message is a replay if its seq was seen before, or is more than ``window`` below the
    highest seq seen from that sender. Memory: at most ``max_senders`` * ``window`` ints.
    """

    def __init__(self, window: int = 4096, max_senders: int = 4096) -> None:
        self.window = window
        self.max_senders = max_senders
        self._seen: OrderedDict[str, tuple[int, set[int]]] = OrderedDict()

    def seen(self, sender: str, seq: int) -> bool:
        """True if ``seq`` of ``sender`` was recorded (within the window); records nothing,
        so it may be asked about an unverified claim."""
        entry = self._seen.get(sender)
        return entry is not None and seq in entry[1]

    def check_and_record(self, sender: str, seq: int) -> bool:
        """True if fresh (and records it); False if it is a replay."""
        return self.classify(sender, seq) == "fresh"

    def classify(self, sender: str, seq: int) -> Literal["fresh", "duplicate", "old"]:
        """``fresh`` (and records it), ``duplicate`` (this seq was seen, within the window:
        the same message again, e.g. an honest retry) or ``old`` (below the window: a replay
        of something long past, which no honest peer sends)."""
        top, seen = self._seen.get(sender, (-1, set()))
        if seq in seen:
            return "duplicate"
        if top >= 0 and seq <= top - self.window:
            return "old"
        seen.add(seq)
        if seq > top:
            top = seq
            if len(seen) > self.window:
                seen = {s for s in seen if s > top - self.window}
        self._seen[sender] = (top, seen)
        self._seen.move_to_end(sender)
        while len(self._seen) > self.max_senders:
            self._seen.popitem(last=False)
        return "fresh"


class MessageValidator:
    """The inbound pipeline: verify, check freshness and replay, count every drop.

    ``max_age`` (s) bounds how old a message's timestamp may be and ``max_skew`` (s) how far
    in the future. ``dropped`` counts rejections by reason; callers use :meth:`check`.
    """

    def __init__(
        self,
        scores: PeerScores | None = None,
        max_age: float = 120.0,
        max_skew: float = 30.0,
        clock: Callable[[], float] = time.time,
        opener: Callable[[Any], SignedMessage] | None = None,
    ) -> None:
        self.scores = scores or PeerScores()
        self.clock = clock  # wall clock the timestamps are checked against
        # decodes and verifies a frame (open_signed); the simulator passes one that decodes
        # each broadcast once for all its receivers (messages are never mutated)
        self.opener = opener or open_signed
        self.max_age = max_age
        self.max_skew = max_skew
        self.replay = ReplayGuard()
        self.dropped: Counter[str] = Counter()

    def reject(self, from_peer: str | None, reason: str, detail: str) -> None:
        """Count a drop and penalize the connection it came from (if authenticated)."""
        self.dropped[reason] += 1
        if from_peer is not None and reason not in UNSCORED:
            self.scores.penalize(from_peer, reason)
        log.info("dropped message from %s: %s: %s", (from_peer or "?")[:12], reason, detail)

    def check(self, frame: dict[str, Any], from_peer: str) -> SignedMessage:
        """Validate a ``msg`` frame received directly from ``from_peer``.

        Direct messages must be signed by the connection's own authenticated peer; relayed
        content travels embedded in bodies and is checked with :func:`open_signed`.
        Raises MessageRejectedError after counting and penalizing.
        """
        try:
            if self.scores.is_blacklisted(from_peer):
                raise MessageRejectedError("blacklisted", f"peer {from_peer[:12]} is blacklisted")
            claim = peek_envelope(frame)
            if (
                claim is not None
                and claim[1] == from_peer
                and self.replay.seen(from_peer, claim[2])
            ):
                # the same message again (an honest retry, or a flood of copies): dropped
                # before its signature is checked
                raise MessageRejectedError(
                    "duplicate", f"{claim[0]} seq {claim[2]} from {from_peer[:12]} again"
                )
            msg = self.opener(frame)
            if msg.sender != from_peer:
                raise MessageRejectedError(
                    "wrong_sender",
                    f"connection of {from_peer[:12]} sent a message signed by {msg.sender[:12]}",
                )
            now = self.clock()
            if msg.ts < now - self.max_age or msg.ts > now + self.max_skew:
                raise MessageRejectedError(
                    "stale",
                    f"{msg.kind} from {from_peer[:12]} timestamp off by {msg.ts - now:.0f} s",
                )
            seen = self.replay.classify(msg.sender, msg.seq)
            if seen == "duplicate":
                raise MessageRejectedError(
                    "duplicate", f"{msg.kind} seq {msg.seq} from {from_peer[:12]} again"
                )
            if seen == "old":
                raise MessageRejectedError(
                    "replayed", f"{msg.kind} seq {msg.seq} from {from_peer[:12]} long past"
                )
        except MessageRejectedError as exc:
            self.reject(from_peer, exc.reason, exc.detail)
            raise
        return msg
