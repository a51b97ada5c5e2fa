"""Secure aggregation (SecAgg, Bonawitz et al. 2017) inside small groups, as a pure state machine.

Only the *sum* of a group's updates is revealed; no member, and nobody watching the wire,
learns one peer's update, and the sum is still recovered exactly when up to ``k - t`` of the
group's ``k`` members drop out mid-round. Each peer runs a :class:`SecAggPeer`: feed it
messages and the time, send what it returns. It opens no socket and reads no clock.

Rounds, for one group of ``k`` members with threshold ``t`` (every message Ed25519-signed by
its author, so any member may relay it):

1. ``advertise``: two fresh X25519 public keys, ``c`` (to encrypt shares) and ``s`` (masks).
2. ``share``: Shamir shares (threshold ``t``, one per member, own included) of the peer's
   self-mask seed ``b`` and of its ``s`` secret key, each encrypted to its holder with
   AES-256-GCM under ``HKDF(X25519(c_u, c_v))``; plus the hash of every share and of ``b``,
   signed, so a revealed share or a reconstructed secret can be checked against the dealer.
3. ``masked``: ``y_u = q(x_u) + PRG(b_u) + sum_v +-PRG(HKDF(X25519(s_u, s_v)))`` in
   ``Z_2^32`` (``+`` if ``u < v``): the pairwise masks cancel in the sum over the group.
4. ``survivors``: the signed set ``S`` of peers whose masked input the author holds. A peer
   reveals shares for one set only, and only once ``t`` members signed exactly that set: two
   different sets cannot both gather ``t`` signatures while the group has fewer than
   ``2t - k`` equivocating members, so no honest peer ever reveals both secrets of a peer.
5. ``unmask``: for ``u`` in ``S`` the share of ``b_u``; for ``u`` not in ``S`` (dropped) the
   share of ``s_u``. ``t`` shares of each rebuild the masks to remove; the result is the
   exact ring sum of the survivors' quantised updates.

The key phases (1, 2) need every member; a member missing there abandons the round for the
whole group (it is redone without the missing, as docs/privacy.md says). From phase 3 on, up
to ``k - t`` members may vanish. Fewer than ``t`` survivors, shares that do not rebuild the
committed secret, or no agreed survivor set: the peer *abandons* (``abandoned`` holds the
named error); it never outputs a wrong sum.

Why ``Z_2^32`` and not a prime field: uint32 arithmetic wraps natively (numpy, no
reduction), an AES-CTR keystream is directly a uniform mask (no rejection sampling) and the
masked vector is exactly as large as float32, so secure aggregation costs no payload bytes.
Overflow: every peer clips its update to L2 norm ``clip`` (so each coordinate is within
``+-clip``) and scales by ``s = (2^31 - 1) / (max_peers * clip)``; the sum of up to
``max_peers`` quantised coordinates then stays within ``+-(2^31 - 1)`` and decodes as int32.
Resolution ``1 / s`` (``3.7e-9`` for 8 peers and ``clip = 1``).

Composition with Byzantine robustness (:func:`assign_groups`, :func:`robust_over_groups`):
groups are drawn from a seed no single peer controls (the previous decision certificate's
hash), each group's mean is revealed, and the swarm's robust rule runs over the group means.
Without zero-knowledge range proofs the group cannot check one member's norm: it can check
that the *sum* respects ``|S| * clip`` and discard a group whose sum does not
(:attr:`GroupResult.norm_ok`). Limits are stated in docs/privacy.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from swarmlm.aggregation.registry import Aggregator, get_aggregator
from swarmlm.p2p.identity import NodeIdentity, canonical_encode, verify_signature

DOMAIN = b"swarmlm-secagg-v1"
RING_BITS = 32
#: Shamir's field: the Mersenne prime 2^521 - 1, large enough for any 32-byte secret.
PRIME = 2**521 - 1
SHARE_SIZE = 66
KEY_SIZE = 32
#: Largest masked vector accepted from the wire (values), so a message cannot make a peer
#: allocate without bound; the swarm's models are far below it.
MAX_DIM = 1 << 28


# ------------------------------------------------------------------------------------------
# errors


class SecAggError(ValueError):
    """Base class: a secure-aggregation message or round that cannot be accepted."""


class MalformedMessageError(SecAggError):
    """Bytes or fields that are not a well-formed secure-aggregation message."""


class NotAMemberError(SecAggError):
    """A message from (or a share for) a peer outside the group."""


class BadSignatureError(SecAggError):
    """A message whose Ed25519 signature does not verify under its author's key."""


class WrongRoundError(SecAggError):
    """A message for another training round or another group."""


class WrongLengthError(SecAggError):
    """A masked contribution whose length is not the round's vector dimension."""


class EquivocationError(SecAggError):
    """Two different signed messages of one kind from one author in one round."""


class BadShareError(SecAggError):
    """A share that does not decrypt, or does not match its dealer's signed commitment."""


class SharesDoNotReconstructError(SecAggError):
    """``t`` committed shares that rebuild something other than the dealer's committed secret:
    the dealer dealt inconsistent shares. Names the dealer."""


class DropoutError(SecAggError):
    """More members dropped than the threshold allows, or a key phase missed a member: the
    group's round is abandoned (and redone without the missing), never summed wrongly."""


# ------------------------------------------------------------------------------------------
# Shamir secret sharing over GF(2^521 - 1)


def _random_field_element(rng: Callable[[int], bytes]) -> int:
    """Uniform in ``[0, PRIME)`` by rejection (521 random bits; rejection odds 2^-521)."""
    while True:
        v = int.from_bytes(rng(SHARE_SIZE), "big") & ((1 << 521) - 1)
        if v < PRIME:
            return v


def shamir_split(
    secret: int, threshold: int, xs: Sequence[int], rng: Callable[[int], bytes]
) -> list[int]:
    """Shares ``f(x)`` for each ``x`` in ``xs`` of a random degree ``threshold - 1``
    polynomial with ``f(0) = secret``; any ``threshold`` of them rebuild it, fewer reveal
    nothing about it."""
    if not 0 <= secret < PRIME:
        raise SecAggError("Shamir secret must lie in [0, 2^521 - 1)")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} must be in 1..{len(xs)} (the share count)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("Shamir x-coordinates must be distinct and non-zero")
    coeffs = [secret] + [_random_field_element(rng) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def shamir_reconstruct(points: Sequence[tuple[int, int]]) -> int:
    """``f(0)`` by Lagrange interpolation through ``points`` (``(x, y)`` pairs, distinct x)."""
    xs = [x for x, _ in points]
    if not points or len(set(xs)) != len(xs):
        raise SecAggError("Shamir reconstruction needs distinct x-coordinates")
    total = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        total = (total + yj * num * pow(den, -1, PRIME)) % PRIME
    return total


# ------------------------------------------------------------------------------------------
# fixed point in Z_2^32


@dataclass(frozen=True)
class FixedPoint:
    """Quantisation of a clipped float update into ``Z_2^32`` such that the sum of up to
    ``max_peers`` of them cannot overflow (see the module docstring for the bound)."""

    clip: float
    max_peers: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)) or self.max_peers < 1:
            raise SecAggError(
                f"FixedPoint needs clip > 0 and max_peers >= 1, got {self.clip}, {self.max_peers}"
            )

    @property
    def scale(self) -> float:
        return (2**31 - 1) / (self.max_peers * self.clip)

    @property
    def limit(self) -> int:
        """Largest magnitude of one quantised coordinate."""
        return math.floor(self.clip * self.scale)

    def clip_update(self, update: np.ndarray) -> np.ndarray:
        """``update`` scaled down to L2 norm ``clip`` if above it (float64)."""
        x = np.asarray(update, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all():
            raise SecAggError("update has non-finite values")
        norm = float(np.linalg.norm(x))
        return x * (self.clip / norm) if norm > self.clip else x

    def encode(self, update: np.ndarray) -> np.ndarray:
        """Clip, quantise (round to nearest) and map to ``Z_2^32`` (uint32)."""
        q = np.clip(np.rint(self.clip_update(update) * self.scale), -self.limit, self.limit)
        return q.astype(np.int64).astype(np.uint32)

    def decode_sum(self, ring_sum: np.ndarray) -> np.ndarray:
        """The float sum of at most ``max_peers`` encoded updates (int32 view, unscaled)."""
        return ring_sum.astype(np.uint32).view(np.int32).astype(np.float64) / self.scale


def prg(key: bytes, dim: int) -> np.ndarray:
    """``dim`` uniform uint32 values from AES-256-CTR keyed by ``key`` (32 bytes, used once
    per round for one purpose, so the all-zero IV never repeats under a key)."""
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(4 * dim)), dtype="<u4")


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=DOMAIN + info).derive(
        secret
    )


def _ctx(*parts: object) -> bytes:
    return canonical_encode([str(p) if not isinstance(p, int | bytes) else p for p in parts])


def _h(*parts: object) -> bytes:
    return hashlib.sha256(DOMAIN + _ctx(*parts)).digest()


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# ------------------------------------------------------------------------------------------
# messages


KINDS = ("advertise", "share", "masked", "survivors", "unmask")


def _bytes_of(size: int | None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and (size is None or len(v) == size)


def _map_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: (
        isinstance(v, dict)
        and len(v) <= 4096
        and all(isinstance(k, str) and check(x) for k, x in v.items())
    )


_FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "advertise": {"c_pk": _bytes_of(32), "s_pk": _bytes_of(32)},
    "share": {
        "ciphertexts": _map_of(_bytes_of(2 * SHARE_SIZE + 16)),
        "b_commits": _map_of(_bytes_of(32)),
        "s_commits": _map_of(_bytes_of(32)),
        "b_commit": _bytes_of(32),
    },
    "masked": {
        "dim": lambda v: isinstance(v, int) and 0 < v <= MAX_DIM,
        "data": _bytes_of(None),
    },
    "survivors": {
        "survivors": lambda v: (
            isinstance(v, list) and len(v) <= 4096 and all(isinstance(s, str) for s in v)
        )
    },
    "unmask": {
        "survivors_digest": _bytes_of(32),
        "b_shares": _map_of(_bytes_of(SHARE_SIZE)),
        "s_shares": _map_of(_bytes_of(SHARE_SIZE)),
    },
}


@dataclass(frozen=True)
class Message:
    """One signed secure-aggregation message. ``fields`` depend on ``kind`` (``_FIELDS``)."""

    kind: str
    round: int
    group: int
    sender: str
    fields: dict[str, Any]
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return DOMAIN + canonical_encode(
            {
                "kind": self.kind,
                "round": self.round,
                "group": self.group,
                "sender": self.sender,
                "fields": self.fields,
            }
        )

    def to_bytes(self) -> bytes:
        """Wire form (canonical msgpack); :meth:`from_bytes` is its strict inverse."""
        return canonical_encode(
            {
                "kind": self.kind,
                "round": self.round,
                "group": self.group,
                "sender": self.sender,
                "fields": self.fields,
                "sig": self.signature,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        """Decode and check the shape of every field; raise :class:`MalformedMessageError`
        naming the first thing wrong. The signature is checked by the receiving peer."""
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=4 * MAX_DIM)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise MalformedMessageError(f"not a msgpack secure-aggregation message: {exc}") from exc
        if not isinstance(obj, dict) or set(obj) != {
            "kind",
            "round",
            "group",
            "sender",
            "fields",
            "sig",
        }:
            raise MalformedMessageError(
                "message must be a map of kind/round/group/sender/fields/sig"
            )
        return cls.build(
            obj["kind"], obj["round"], obj["group"], obj["sender"], obj["fields"], obj["sig"]
        )

    @classmethod
    def build(
        cls, kind: Any, round: Any, group: Any, sender: Any, fields: Any, sig: Any
    ) -> Message:
        if kind not in _FIELDS:
            raise MalformedMessageError(f"unknown message kind {kind!r}")
        for name, v in (("round", round), ("group", group)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
                raise MalformedMessageError(f"{kind}: {name} must be a non-negative int")
        if not isinstance(sender, str) or not isinstance(sig, bytes):
            raise MalformedMessageError(f"{kind}: sender must be str and sig bytes")
        schema = _FIELDS[kind]
        if not isinstance(fields, dict) or set(fields) != set(schema):
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise MalformedMessageError(f"{kind}: fields must be {sorted(schema)}, got {got}")
        for name, check in schema.items():
            if not check(fields[name]):
                raise MalformedMessageError(f"{kind}: field {name!r} is malformed")
        return cls(kind, round, group, sender, dict(fields), sig)

    @classmethod
    def signed(
        cls, identity: NodeIdentity, kind: str, round: int, group: int, fields: dict[str, Any]
    ) -> Message:
        msg = cls.build(kind, round, group, identity.node_id, fields, b"")
        return cls(
            kind, round, group, identity.node_id, msg.fields, identity.sign(msg.signed_bytes())
        )


# ------------------------------------------------------------------------------------------
# the per-peer state machine


class Phase(IntEnum):
    ADVERTISE = 0
    SHARE = 1
    MASK = 2
    CONSISTENCY = 3
    UNMASK = 4
    DONE = 5
    ABANDONED = 6


@dataclass(frozen=True)
class GroupResult:
    """A group's recovered sum: ``ring_sum`` (exact, uint32) over ``survivors``, its float
    decoding ``total``, and whether it respects the group norm bound ``|S| * clip``."""

    round: int
    group: int
    survivors: tuple[str, ...]
    ring_sum: np.ndarray
    total: np.ndarray
    norm_ok: bool

    @property
    def mean(self) -> np.ndarray:
        return self.total / len(self.survivors)


def default_threshold(k: int) -> int:
    """``floor(2k / 3) + 1``: tolerates ``k - t`` dropouts while a survivor set needs
    ``t`` signatures, which two sets cannot both gather with fewer than ``2t - k``
    equivocators (Bonawitz et al.'s bound for an active adversary)."""
    return 2 * k // 3 + 1


@dataclass
class _Peer:
    """What one peer knows about another member during a round."""

    c_pk: bytes | None = None
    s_pk: bytes | None = None
    share_msg: Message | None = None
    b_share: int | None = None  # my share of their b (decrypted)
    s_share: int | None = None
    masked: np.ndarray | None = None
    survivors: tuple[str, ...] | None = None
    unmask: Message | None = None
    seen: dict[str, bytes] = field(default_factory=dict)  # kind -> signed bytes (equivocation)


class SecAggPeer:
    """One member's side of one group's secure-aggregation round.

    ``members`` maps every member's node id to its Ed25519 public key (the group, in any
    order; share x-coordinates follow the sorted ids). Drive it with :meth:`start`,
    :meth:`receive` (raises a :class:`SecAggError` naming what is wrong and leaves the state
    unchanged) and :meth:`tick` (deadlines: ``timeout`` seconds per phase, in the caller's
    clock). Each returns the messages to broadcast to the group. When done, :attr:`result`
    holds the :class:`GroupResult`, or :attr:`abandoned` the reason the round was dropped.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        round: int,
        group: int,
        members: Mapping[str, bytes],
        dim: int,
        codec: FixedPoint,
        *,
        threshold: int | None = None,
        timeout: float = 10.0,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.me = identity
        self.round, self.group, self.dim, self.codec = round, group, dim, codec
        self.order = sorted(members)
        if identity.node_id not in members:
            raise NotAMemberError(f"{identity.short_id} is not a member of group {group}")
        k = len(self.order)
        self.threshold = default_threshold(k) if threshold is None else threshold
        if not k // 2 < self.threshold <= k:
            raise SecAggError(
                f"threshold {self.threshold} for a group of {k} must be in {k // 2 + 1}..{k}: "
                "at most half would let two survivor sets both gather t signatures"
            )
        if k > codec.max_peers:
            raise SecAggError(f"group of {k} exceeds the codec's max_peers={codec.max_peers}")
        if not 0 < dim <= MAX_DIM:
            raise SecAggError(f"dim {dim} outside 1..{MAX_DIM}")
        self.keys = dict(members)
        self.x = {m: i + 1 for i, m in enumerate(self.order)}
        self.peers = {m: _Peer() for m in self.order}
        self.timeout, self.rng = timeout, rng
        self.phase = Phase.ADVERTISE
        self.deadline = math.inf
        self.result: GroupResult | None = None
        self.abandoned: SecAggError | None = None
        self.rejected: list[SecAggError] = []
        self._agreed: tuple[str, ...] | None = None
        self._input: np.ndarray | None = None
        # Shares that arrived before their author's advertisement (or before our start):
        # signed and checked, decrypted once the keys are known.
        self._early_shares: list[Message] = []

    # -- driving -------------------------------------------------------------------------

    def start(self, update: np.ndarray, now: float) -> list[Message]:
        """Begin the round with this peer's float update (clipped here): the advertisement."""
        if self._input is not None:
            raise SecAggError("round already started")
        x = np.asarray(update, dtype=np.float64).reshape(-1)
        if x.size != self.dim:
            raise WrongLengthError(f"own update has {x.size} values, the round's dim is {self.dim}")
        self._input = self.codec.encode(x)
        self._c = X25519PrivateKey.from_private_bytes(self.rng(32))
        self._s = X25519PrivateKey.from_private_bytes(self.rng(32))
        self._b = self.rng(32)
        self.deadline = now + self.timeout
        msg = self._sign("advertise", {"c_pk": _raw_public(self._c), "s_pk": _raw_public(self._s)})
        return self._self_deliver(msg, now)

    def receive(self, msg: Message | bytes, now: float) -> list[Message]:
        """Accept one message (object or wire bytes) from the group; returns what to send.

        Raises a :class:`SecAggError` subclass for a bad message and changes nothing.
        """
        if isinstance(msg, bytes | bytearray):
            msg = Message.from_bytes(bytes(msg))
        if self.phase >= Phase.DONE:
            return []
        try:
            self._accept(msg)
        except SecAggError as exc:
            self.rejected.append(exc)
            raise
        return self._advance(now)

    def tick(self, now: float) -> list[Message]:
        """Let time pass: a phase whose deadline is over goes on with what it has, or the
        round is abandoned."""
        if self.phase >= Phase.DONE or now < self.deadline:
            return []
        return self._advance(now, expired=True)

    # -- validation ----------------------------------------------------------------------

    def _accept(self, msg: Message) -> None:
        if msg.sender not in self.keys:
            raise NotAMemberError(
                f"{msg.kind} from {msg.sender[:12]}, not a member of group {self.group}"
            )
        if msg.round != self.round or msg.group != self.group:
            raise WrongRoundError(
                f"{msg.kind} from {msg.sender[:12]} is for round {msg.round} group {msg.group}, "
                f"this is round {self.round} group {self.group}"
            )
        if not verify_signature(self.keys[msg.sender], msg.signature, msg.signed_bytes()):
            raise BadSignatureError(f"{msg.kind} from {msg.sender[:12]}: signature does not verify")
        p = self.peers[msg.sender]
        body = msg.signed_bytes()
        if msg.kind == "share" and (p.c_pk is None or self._input is None):
            held = [m for m in self._early_shares if m.sender == msg.sender]
            if held and held[0].signed_bytes() != body:
                raise EquivocationError(f"{msg.sender[:12]} signed two different share messages")
            if not held:  # at most one held back per member: bounded memory
                self._early_shares.append(msg)
            return
        if msg.kind in p.seen:
            if p.seen[msg.kind] == body:
                return  # a duplicate (relayed twice): harmless
            raise EquivocationError(f"{msg.sender[:12]} signed two different {msg.kind} messages")
        getattr(self, f"_on_{msg.kind}")(msg, p)
        p.seen[msg.kind] = body

    def _on_advertise(self, msg: Message, p: _Peer) -> None:
        for name in ("c_pk", "s_pk"):
            try:  # reject low-order points now rather than fail later
                X25519PrivateKey.from_private_bytes(bytes(32)).exchange(
                    X25519PublicKey.from_public_bytes(msg.fields[name])
                )
            except ValueError as exc:
                raise MalformedMessageError(
                    f"advertise from {msg.sender[:12]}: bad {name}"
                ) from exc
        p.c_pk, p.s_pk = msg.fields["c_pk"], msg.fields["s_pk"]

    def _on_share(self, msg: Message, p: _Peer) -> None:
        f = msg.fields
        others = set(self.order)
        for name in ("ciphertexts", "b_commits", "s_commits"):
            if set(f[name]) != others:
                raise NotAMemberError(
                    f"share from {msg.sender[:12]}: {name} not for exactly the group"
                )
        assert p.c_pk is not None  # _accept keeps shares back until the advertisement
        me = self.me.node_id
        key = self._share_key(msg.sender, me, p.c_pk)
        try:
            plain = AESGCM(key).decrypt(
                bytes(12), f["ciphertexts"][me], _ctx(self.round, self.group, msg.sender, me)
            )
        except Exception as exc:
            raise BadShareError(f"share from {msg.sender[:12]} does not decrypt") from exc
        b_sh, s_sh = plain[:SHARE_SIZE], plain[SHARE_SIZE:]
        if (
            _h("b", self.round, self.group, msg.sender, me, b_sh) != f["b_commits"][me]
            or _h("s", self.round, self.group, msg.sender, me, s_sh) != f["s_commits"][me]
        ):
            raise BadShareError(f"share from {msg.sender[:12]} does not match its own commitment")
        p.share_msg = msg
        p.b_share, p.s_share = int.from_bytes(b_sh, "big"), int.from_bytes(s_sh, "big")

    def _on_masked(self, msg: Message, p: _Peer) -> None:
        dim, data = msg.fields["dim"], msg.fields["data"]
        if dim != self.dim or len(data) != 4 * self.dim:
            raise WrongLengthError(
                f"masked input from {msg.sender[:12]} has {len(data) // 4} values (dim {dim}), "
                f"the round's dim is {self.dim}"
            )
        p.masked = np.frombuffer(data, dtype="<u4")

    def _on_survivors(self, msg: Message, p: _Peer) -> None:
        s = msg.fields["survivors"]
        if s != sorted(set(s)) or not set(s) <= set(self.order):
            raise NotAMemberError(
                f"survivors from {msg.sender[:12]}: not a sorted subset of the group"
            )
        p.survivors = tuple(s)

    def _on_unmask(self, msg: Message, p: _Peer) -> None:
        p.unmask = msg  # checked against the agreed set and the commitments when used

    # -- phases --------------------------------------------------------------------------

    def _advance(self, now: float, expired: bool = False) -> list[Message]:
        out: list[Message] = []
        early, self._early_shares = self._early_shares, []
        for msg in early:
            try:
                self._accept(msg)
            except SecAggError as exc:
                self.rejected.append(exc)
        try:
            while True:
                step = self._step(now, expired)
                if step is None:
                    break
                out.extend(step)
                expired = False
                self.deadline = now + self.timeout
        except SecAggError as exc:
            self.abandoned, self.phase = exc, Phase.ABANDONED
        return out

    def _step(self, now: float, expired: bool) -> list[Message] | None:
        """One phase transition if its condition holds; None if nothing changes yet."""
        members = self.order
        if self.phase == Phase.ADVERTISE:
            missing = [m for m in members if self.peers[m].c_pk is None]
            if missing:
                if expired:
                    raise DropoutError(f"key advertisement missing from {_names(missing)}")
                return None
            self.phase = Phase.SHARE
            return self._self_deliver(self._share_message(), now)
        if self.phase == Phase.SHARE:
            missing = [m for m in members if self.peers[m].share_msg is None]
            if missing:
                if expired:
                    raise DropoutError(f"key shares missing from {_names(missing)}")
                return None
            self.phase = Phase.MASK
            return self._self_deliver(self._masked_message(), now)
        if self.phase == Phase.MASK:
            have = tuple(m for m in members if self.peers[m].masked is not None)
            if len(have) < len(members) and not expired and self._quorum() is None:
                return None
            if len(have) < self.threshold:
                raise DropoutError(
                    f"only {len(have)} masked inputs, the threshold is {self.threshold}"
                )
            self.phase = Phase.CONSISTENCY
            return self._self_deliver(self._sign("survivors", {"survivors": list(have)}), now)
        if self.phase == Phase.CONSISTENCY:
            agreed = self._quorum()
            if agreed is None:
                if expired:
                    raise DropoutError(f"no survivor set signed by {self.threshold} members")
                return None
            self._agreed, self.phase = agreed, Phase.UNMASK
            return self._self_deliver(self._unmask_message(agreed), now)
        if self.phase == Phase.UNMASK:
            result = self._try_finish()
            if result is None:
                if expired:
                    raise DropoutError(
                        "not enough unmasking shares or masked inputs before the deadline"
                    )
                return None
            self.result, self.phase = result, Phase.DONE
            return []
        return None

    def _quorum(self) -> tuple[str, ...] | None:
        votes: dict[tuple[str, ...], int] = {}
        for p in self.peers.values():
            if p.survivors is not None:
                votes[p.survivors] = votes.get(p.survivors, 0) + 1
        best = [s for s, c in votes.items() if c >= self.threshold and len(s) >= self.threshold]
        return best[0] if len(best) == 1 else None

    # -- messages ------------------------------------------------------------------------

    def _sign(self, kind: str, fields: dict[str, Any]) -> Message:
        return Message.signed(self.me, kind, self.round, self.group, fields)

    def _self_deliver(self, msg: Message, now: float) -> list[Message]:
        """Our own message counts as received by us (it is broadcast to the others)."""
        self._accept(msg)
        return [msg]

    def _share_key(self, dealer: str, holder: str, other_c_pk: bytes) -> bytes:
        shared = self._c.exchange(X25519PublicKey.from_public_bytes(other_c_pk))
        return _hkdf(shared, _ctx("enc", self.round, self.group, dealer, holder))

    def _share_message(self) -> Message:
        me, t = self.me.node_id, self.threshold
        xs = [self.x[m] for m in self.order]
        s_raw = self._s.private_bytes_raw()
        b_sh = shamir_split(int.from_bytes(self._b, "big"), t, xs, self.rng)
        s_sh = shamir_split(int.from_bytes(s_raw, "big"), t, xs, self.rng)
        cts, bc, sc = {}, {}, {}
        for m, bv, sv in zip(self.order, b_sh, s_sh, strict=True):
            bb, sb = bv.to_bytes(SHARE_SIZE, "big"), sv.to_bytes(SHARE_SIZE, "big")
            c_pk = self.peers[m].c_pk
            assert c_pk is not None
            key = self._share_key(me, m, c_pk)
            cts[m] = AESGCM(key).encrypt(bytes(12), bb + sb, _ctx(self.round, self.group, me, m))
            bc[m] = _h("b", self.round, self.group, me, m, bb)
            sc[m] = _h("s", self.round, self.group, me, m, sb)
        fields = {
            "ciphertexts": cts,
            "b_commits": bc,
            "s_commits": sc,
            "b_commit": self._b_commit(me, self._b),
        }
        return self._sign("share", fields)

    def _b_commit(self, dealer: str, b: bytes) -> bytes:
        return _h("self-mask", self.round, self.group, dealer, b)

    def _pair_mask(self, u: str, v: str, s_secret: X25519PrivateKey, other_pk: bytes) -> np.ndarray:
        """``+PRG`` if ``u < v`` else ``-PRG``: the term ``u``'s input carries for ``v``."""
        shared = s_secret.exchange(X25519PublicKey.from_public_bytes(other_pk))
        lo, hi = min(u, v), max(u, v)
        mask = prg(_hkdf(shared, _ctx("pair", self.round, self.group, lo, hi)), self.dim)
        return mask if u < v else (np.uint32(0) - mask)

    def _self_mask(self, u: str, b: bytes) -> np.ndarray:
        return prg(_hkdf(b, _ctx("self", self.round, self.group, u)), self.dim)

    def _masked_message(self) -> Message:
        me = self.me.node_id
        assert self._input is not None
        y = self._input + self._self_mask(me, self._b)
        for v in self.order:
            if v != me:
                s_pk = self.peers[v].s_pk
                assert s_pk is not None
                y += self._pair_mask(me, v, self._s, s_pk)
        return self._sign("masked", {"dim": self.dim, "data": y.astype("<u4").tobytes()})

    def _unmask_message(self, agreed: tuple[str, ...]) -> Message:
        b, s = {}, {}
        for m in self.order:
            p = self.peers[m]
            assert p.b_share is not None
            assert p.s_share is not None
            if m in agreed:
                b[m] = p.b_share.to_bytes(SHARE_SIZE, "big")
            else:
                s[m] = p.s_share.to_bytes(SHARE_SIZE, "big")
        return self._sign(
            "unmask", {"survivors_digest": _h("S", *agreed), "b_shares": b, "s_shares": s}
        )

    # -- unmasking -----------------------------------------------------------------------

    def _valid_shares(self, agreed: tuple[str, ...]) -> dict[str, list[tuple[int, int]]]:
        """Per dealer, the ``(x, share)`` points revealed for the agreed set that match the
        dealer's commitments; a revealer whose message breaks the rules is rejected whole."""
        digest = _h("S", *agreed)
        points: dict[str, list[tuple[int, int]]] = {m: [] for m in self.order}
        for holder, p in self.peers.items():
            msg = p.unmask
            if msg is None or msg.fields["survivors_digest"] != digest:
                continue
            b, s = msg.fields["b_shares"], msg.fields["s_shares"]
            if set(b) != set(agreed) or set(s) != set(self.order) - set(agreed):
                self.rejected.append(
                    BadShareError(f"unmask from {holder[:12]} reveals the wrong shares")
                )
                p.unmask = None
                continue
            bad = False
            found: list[tuple[str, int]] = []
            for dealer, kind, share in [(d, "b", v) for d, v in b.items()] + [
                (d, "s", v) for d, v in s.items()
            ]:
                dm = self.peers[dealer].share_msg
                assert dm is not None
                if (
                    _h(kind, self.round, self.group, dealer, holder, share)
                    != dm.fields[f"{kind}_commits"][holder]
                ):
                    bad = True
                    break
                found.append((dealer, int.from_bytes(share, "big")))
            if bad:
                self.rejected.append(
                    BadShareError(
                        f"unmask from {holder[:12]}: a share does not match its dealer's commitment"
                    )
                )
                p.unmask = None
                continue
            for dealer, y in found:
                points[dealer].append((self.x[holder], y))
        return points

    def _try_finish(self) -> GroupResult | None:
        agreed = self._agreed
        assert agreed is not None
        if any(self.peers[u].masked is None for u in agreed):
            return None
        points = self._valid_shares(agreed)
        if any(len(points[m]) < self.threshold for m in self.order):
            return None
        total = np.zeros(self.dim, dtype=np.uint32)
        for u in agreed:
            masked = self.peers[u].masked
            assert masked is not None
            total += masked
            secret = shamir_reconstruct(points[u][: self.threshold])
            dm = self.peers[u].share_msg
            assert dm is not None
            b = secret.to_bytes(64, "big")[-32:] if secret < 2**256 else b""
            if self._b_commit(u, b) != dm.fields["b_commit"]:
                raise SharesDoNotReconstructError(
                    f"shares of {u[:12]}'s self-mask do not rebuild its committed seed"
                )
            total -= self._self_mask(u, b)
        for v in self.order:
            if v in agreed:
                continue
            secret = shamir_reconstruct(points[v][: self.threshold])
            pv = self.peers[v]
            ok = secret < 2**256
            s_v = X25519PrivateKey.from_private_bytes(secret.to_bytes(32, "big")) if ok else None
            if s_v is None or _raw_public(s_v) != pv.s_pk:
                raise SharesDoNotReconstructError(
                    f"shares of dropped {v[:12]}'s mask key do not rebuild its public key"
                )
            for u in agreed:
                su = self.peers[u].s_pk
                assert su is not None
                total -= self._pair_mask(u, v, s_v, su)  # the term y_u still carries for v
        decoded = self.codec.decode_sum(total)
        slack = len(agreed) * 0.5 * math.sqrt(self.dim) / self.codec.scale
        norm_ok = float(np.linalg.norm(decoded)) <= len(agreed) * self.codec.clip + slack
        return GroupResult(self.round, self.group, agreed, total, decoded, norm_ok)


def _names(ids: Iterable[str]) -> str:
    return ", ".join(i[:12] for i in ids)


# ------------------------------------------------------------------------------------------
# composition with Byzantine robustness


def assign_groups(seed: bytes, members: Sequence[str], group_size: int) -> list[tuple[str, ...]]:
    """Cut ``members`` into ``len // group_size`` groups of ``group_size`` or one more.

    Members are ranked by ``sha256(seed | "secagg-group" | id)``: with ``seed`` the hash of
    the previous decision certificate, no single peer chooses its group or its companions.
    Each group is returned sorted.
    """
    if group_size < 2 or len(members) < group_size:
        raise SecAggError(f"cannot form groups of {group_size} from {len(members)} members")
    if len(set(members)) != len(members):
        raise SecAggError("duplicate member ids")
    ranked = sorted(
        members, key=lambda m: hashlib.sha256(seed + b"secagg-group" + m.encode()).digest()
    )
    n_groups = len(ranked) // group_size
    base, extra = divmod(len(ranked), n_groups)
    out, start = [], 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        out.append(tuple(sorted(ranked[start : start + size])))
        start += size
    return out


def robust_over_groups(
    results: Sequence[GroupResult], rule: str | Aggregator, f_peers: int, **params: Any
) -> tuple[torch.Tensor, list[int]]:
    """Aggregate the groups' means with the swarm's robust ``rule``.

    A group whose sum breaks its norm bound holds a violator: it is dropped (and counts
    against the ``f_peers`` budget). A rule given by name then tolerates ``min(f_peers,
    groups)`` bad groups minus those dropped; an :class:`Aggregator` instance (stateful rules
    such as centered clipping keep their centre across rounds) is used as configured.
    Returns the aggregate (float32) and the dropped groups.
    """
    if not results:
        raise SecAggError("no group results to aggregate")
    dropped = [r.group for r in results if not r.norm_ok]
    kept = [r for r in results if r.norm_ok]
    if not kept:
        raise SecAggError("every group's sum broke its norm bound")
    stack = torch.from_numpy(np.stack([r.mean for r in kept])).to(torch.float32)
    if isinstance(rule, Aggregator):
        return rule(stack), dropped
    f = max(0, min(f_peers, len(results)) - len(dropped))
    agg = get_aggregator(rule, **({"f": f} if rule != "mean" else {}), **params)
    return agg(stack), dropped


# ------------------------------------------------------------------------------------------
# in-process simulation (tests, benchmarks)


@dataclass
class SimulatedRound:
    peers: dict[str, SecAggPeer]
    bytes_sent: int
    messages: int


def simulate_group(
    identities: Sequence[NodeIdentity],
    updates: Mapping[str, np.ndarray],
    *,
    round: int = 0,
    group: int = 0,
    codec: FixedPoint,
    threshold: int | None = None,
    drop_before: Mapping[str, str] | None = None,
    tamper: Callable[[Message], Message | bytes | None] | None = None,
    seed: int | None = None,
) -> SimulatedRound:
    """Run one group's round over in-memory broadcast, in virtual time.

    ``drop_before[peer] = kind``: the peer crashes instead of sending its first message of
    that kind (``"masked"``: drops after the key phases, ``"unmask"``: after masking).
    ``tamper(msg)`` may replace a message in flight (returning bytes or a message) or drop
    it (``None``). Bytes are counted per recipient (broadcast to ``k - 1`` members).
    ``seed`` makes every peer's randomness reproducible (tests only).
    """
    members = {i.node_id: i.public_key_bytes for i in identities}
    dim = len(next(iter(updates.values())))
    drop = dict(drop_before or {})
    peers: dict[str, SecAggPeer] = {}
    for i in identities:
        rng: Callable[[int], bytes] = os.urandom
        if seed is not None:
            rng = np.random.default_rng([seed, int(i.node_id[:8], 16)]).bytes
        peers[i.node_id] = SecAggPeer(
            i, round, group, members, dim, codec, threshold=threshold, rng=rng
        )
    crashed: set[str] = set()
    queue: list[tuple[str, Message]] = []
    sent = [0, 0]

    def emit(author: str, msgs: list[Message]) -> None:
        for m in msgs:
            if author in crashed:
                return
            if drop.get(author) == m.kind:
                crashed.add(author)
                return
            queue.append((author, m))

    now = 0.0
    for u, p in peers.items():
        emit(u, p.start(updates[u], now))
    for _ in range(10):
        while queue:
            author, msg = queue.pop(0)
            wire: Message | bytes | None = tamper(msg) if tamper else msg
            if wire is None:
                continue
            data = wire if isinstance(wire, bytes) else wire.to_bytes()
            for v, p in peers.items():
                if v == author or v in crashed:
                    continue
                sent[0] += len(data)
                sent[1] += 1
                # A rejected message is recorded in p.rejected; a real node logs and penalises.
                with contextlib.suppress(SecAggError):
                    emit(v, p.receive(data, now))
        if all(p.phase >= Phase.DONE for v, p in peers.items() if v not in crashed):
            break
        now += peers[next(iter(peers))].timeout + 1
        for v, p in peers.items():
            if v not in crashed:
                emit(v, p.tick(now))
    return SimulatedRound(peers=peers, bytes_sent=sent[0], messages=sent[1])


def plain_ring_sum(codec: FixedPoint, updates: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of the quantised updates without any masking: what SecAgg must reproduce."""
    total: np.ndarray | None = None
    for u in updates:
        q = codec.encode(u)
        total = q.copy() if total is None else total + q
    assert total is not None
    return total


__all__ = [
    "BadShareError",
    "BadSignatureError",
    "DropoutError",
    "EquivocationError",
    "FixedPoint",
    "GroupResult",
    "MalformedMessageError",
    "Message",
    "NotAMemberError",
    "Phase",
    "SecAggError",
    "SecAggPeer",
    "SharesDoNotReconstructError",
    "WrongLengthError",
    "WrongRoundError",
    "assign_groups",
    "default_threshold",
    "plain_ring_sum",
    "prg",
    "robust_over_groups",
    "shamir_reconstruct",
    "shamir_split",
    "simulate_group",
]
