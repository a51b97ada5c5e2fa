"""A durable, crash-safe record of every protocol slot this node has signed.

Why: a node that restarts without its protocol state could sign a second, different
contribution, proposal, PREPARE, COMMIT or VIEWCHANGE for a slot it already signed before
the crash. Honest peers holding both copies have a valid equivocation proof and evict it.
The round protocol therefore writes each signed message here, and makes it durable
(``fsync``), *before* sending it; after a restart it loads the log and, for a slot it already
signed, re-sends the same content or refuses to sign (see ``RoundProtocol``).

A *slot* is ``(kind, round, view)``: ``propose``, ``prepare``, ``commit`` and ``viewchange``
use their view; ``contrib`` is one per round and uses view 0. Each record keeps the exact
signed wire message (``{"m", "s"}``) and, for a COMMIT, the prepared certificate it was sent
under (the node's lock: a VIEWCHANGE after a restart must still carry it).

File format (all integers big-endian)::

    MAGIC (16 bytes: b"SWARMLM-VOTES-1\\n")
    record*: length (u32) | CRC-32 of payload (u32) | payload (msgpack map)

A payload is ``{"k": kind, "r": round, "v": view, "m": wire, "p": prepared or nil}``, or
``{"floor": round}`` (written first when the file is rewritten by :meth:`VoteLog.prune`:
rounds below it were forgotten, so the node must not sign in them any more). A record cut
short by a crash mid-write (a torn tail) is dropped with a warning and the file truncated to
its last whole record; a damaged record followed by more data is corruption and raises
:class:`VoteLogError` naming the file and offset (we cannot know what the node signed).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from swarmlm.atomic import atomic_write_bytes
from swarmlm.p2p.errors import P2PError
from swarmlm.p2p.identity import canonical_encode
from swarmlm.p2p.messages import SignedMessage, open_signed

log = logging.getLogger(__name__)

MAGIC = b"SWARMLM-VOTES-1\n"
_FRAME = struct.Struct(">II")
MAX_RECORD = 64 << 20  # a proposal with its justification is far below this
SLOT_KINDS = ("contrib", "propose", "prepare", "commit", "viewchange")
DEFAULT_KEEP_ROUNDS = 256  # as long as the protocol keeps decisions


class VoteLogError(P2PError):
    """The vote log cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class SignedSlot:
    """One signed slot: the exact wire message and, for a COMMIT, its prepared certificate."""

    kind: str
    round: int
    view: int
    wire: dict[str, bytes]
    prepared: dict[str, Any] | None = None

    @property
    def message(self) -> SignedMessage:
        """The stored message, verified again (raises MessageRejectedError if damaged)."""
        return open_signed(self.wire)


def slot_view(kind: str, view: int) -> int:
    """Contributions have one slot per round; everything else one per (round, view)."""
    return 0 if kind == "contrib" else view


def same_meaning(kind: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two bodies of ``kind`` for one slot say the same thing: signing both is not
    equivocation (they differ at most in parts no proof compares, e.g. a proposal's
    ``justify``, which is not covered by its hash)."""
    if kind == "contrib":
        return bool(a["digest"] == b["digest"] and a["size"] == b["size"])
    if kind in ("prepare", "commit"):
        return bool(a["view"] == b["view"] and a["h"] == b["h"])
    if kind == "propose":
        keys = ("entries", "changes", "suspects")
        return canonical_encode({k: a.get(k, []) for k in keys}) == canonical_encode(
            {k: b.get(k, []) for k in keys}
        )
    return canonical_encode(a) == canonical_encode(b)


def _frame(payload: dict[str, Any]) -> bytes:
    data = canonical_encode(payload)
    return _FRAME.pack(len(data), zlib.crc32(data)) + data


class VoteLog:
    """Append-only log of signed slots at ``path`` (created if missing), loaded on open.

    Contract: :meth:`record` puts a slot in memory and in the write buffer; :meth:`flush`
    makes everything recorded so far durable (write + fsync). A caller must not send a
    message before a :meth:`flush` that started after its :meth:`record` has returned.
    ``flush`` may run in a worker thread while the event loop keeps recording.
    """

    def __init__(self, path: Path | str, keep_rounds: int = DEFAULT_KEEP_ROUNDS) -> None:
        if keep_rounds < 1:
            raise ValueError(f"keep_rounds must be >= 1, got {keep_rounds}")
        self.path = Path(path)
        self.keep_rounds = keep_rounds
        self.floor = 0  # rounds below it were pruned: unknown, never sign there again
        self._slots: dict[tuple[str, int, int], SignedSlot] = {}
        self._by_round: dict[int, list[SignedSlot]] = {}
        self._pending: list[bytes] = []
        self._lock = threading.Lock()  # in-memory index and write buffer
        self._io = threading.Lock()  # the file descriptor: one writer at a time
        self.fsyncs = 0
        self._load()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    # -- reading -----------------------------------------------------------------------------
    def get(self, kind: str, round: int, view: int = 0) -> SignedSlot | None:
        with self._lock:
            return self._slots.get((kind, round, slot_view(kind, view)))

    def slots(self, round: int) -> list[SignedSlot]:
        """Every slot signed in ``round``, in the order it was signed."""
        with self._lock:
            return list(self._by_round.get(round, ()))

    def rounds(self) -> list[int]:
        with self._lock:
            return sorted(self._by_round)

    def forgotten(self, round: int) -> bool:
        """True for rounds pruned from the log: what we signed there is unknown."""
        return round < self.floor

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    # -- writing -----------------------------------------------------------------------------
    def record(
        self, msg: SignedMessage, view: int = 0, prepared: dict[str, Any] | None = None
    ) -> SignedSlot:
        """Remember ``msg`` for its slot (not yet durable: call :meth:`flush` before sending).

        Raises VoteLogError if the slot is already taken or the round was pruned: the caller
        must consult :meth:`get` first and never sign twice.
        """
        if msg.kind not in SLOT_KINDS:
            raise VoteLogError(f"{self.path}: {msg.kind!r} is not a slot kind")
        v = slot_view(msg.kind, view)
        key = (msg.kind, msg.round, v)
        slot = SignedSlot(msg.kind, msg.round, v, msg.to_wire(), prepared)
        with self._lock:
            if self.forgotten(msg.round):
                raise VoteLogError(
                    f"{self.path}: round {msg.round} is below the floor {self.floor}"
                )
            if key in self._slots:
                raise VoteLogError(f"{self.path}: slot {key} was already signed")
            self._slots[key] = slot
            self._by_round.setdefault(msg.round, []).append(slot)
            self._pending.append(
                _frame({"k": msg.kind, "r": msg.round, "v": v, "m": slot.wire, "p": prepared})
            )
        return slot

    def flush(self) -> None:
        """Write and fsync every recorded slot (a no-op when nothing is pending)."""
        with self._io:
            with self._lock:
                data, self._pending = b"".join(self._pending), []
            if not data:
                return
            if self._fd is None:
                raise VoteLogError(f"{self.path}: the vote log is closed")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError as exc:
                raise VoteLogError(f"{self.path}: cannot write the vote log: {exc}") from exc
            self.fsyncs += 1

    def append(
        self, msg: SignedMessage, view: int = 0, prepared: dict[str, Any] | None = None
    ) -> SignedSlot:
        """:meth:`record` then :meth:`flush`: durable when it returns."""
        slot = self.record(msg, view, prepared)
        self.flush()
        return slot

    def maybe_prune(self, current_round: int) -> bool:
        """Prune once the oldest kept round is a quarter window past due (so the rewrite,
        O(kept records), happens every ``keep_rounds / 4`` rounds, not every round)."""
        below = current_round - self.keep_rounds
        with self._lock:
            oldest = min(self._by_round, default=below)
        if oldest >= below - max(1, self.keep_rounds // 4):
            return False
        self.prune(below)
        return True

    def prune(self, below: int) -> None:
        """Forget rounds ``< below`` by rewriting the file atomically (temporary file, fsync,
        rename, directory fsync): a crash leaves either the old or the new file, whole."""
        with self._io:
            with self._lock:
                self.floor = max(self.floor, below)
                for r in [r for r in self._by_round if r < self.floor]:
                    for s in self._by_round.pop(r):
                        del self._slots[(s.kind, s.round, s.view)]
                kept = [s for r in sorted(self._by_round) for s in self._by_round[r]]
                self._pending = []  # everything recorded is in ``kept`` and rewritten below
                data = MAGIC + _frame({"floor": self.floor})
                data += b"".join(
                    _frame({"k": s.kind, "r": s.round, "v": s.view, "m": s.wire, "p": s.prepared})
                    for s in kept
                )
            try:
                atomic_write_bytes(self.path, data, mode=0o600)
                if self._fd is not None:
                    os.close(self._fd)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            except OSError as exc:
                raise VoteLogError(f"{self.path}: cannot rewrite the vote log: {exc}") from exc
            self.fsyncs += 1
        log.debug("vote log %s pruned below round %d (%d slots kept)", self.path, below, len(kept))

    def close(self) -> None:
        self.flush()
        with self._io:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- loading -----------------------------------------------------------------------------
    def _load(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise VoteLogError(f"{self.path}: cannot read the vote log: {exc}") from exc
        if len(data) < len(MAGIC):
            if not MAGIC.startswith(data):
                raise VoteLogError(f"{self.path}: not a vote log (bad header)")
            # new, or a crash while the header was being written: start afresh
            self._rewrite_header()
            return
        if not data.startswith(MAGIC):
            raise VoteLogError(f"{self.path}: not a vote log (bad header)")
        off = len(MAGIC)
        while off < len(data):
            head = data[off : off + _FRAME.size]
            if len(head) < _FRAME.size:
                self._drop_torn_tail(off, len(data), "a truncated record header")
                return
            length, crc = _FRAME.unpack(head)
            end = off + _FRAME.size + length
            if end > len(data):
                self._drop_torn_tail(off, len(data), f"a record cut short ({length} bytes)")
                return
            if length > MAX_RECORD:
                raise VoteLogError(f"{self.path}: record at byte {off} claims {length} bytes")
            payload = data[off + _FRAME.size : end]
            if zlib.crc32(payload) != crc:
                if end == len(data):
                    self._drop_torn_tail(off, len(data), "a last record with a bad checksum")
                    return
                raise VoteLogError(
                    f"{self.path}: record at byte {off} has a bad checksum and more records "
                    "follow: the vote log is corrupt; refusing to guess what this node signed "
                    "(restore the file or move it away only if you know the node signed "
                    "nothing in the rounds it covers)"
                )
            self._load_record(payload, off)
            off = end

    def _load_record(self, payload: bytes, off: int) -> None:
        try:
            rec = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            if "floor" in rec:
                self.floor = max(self.floor, int(rec["floor"]))
                return
            kind, r, v, wire, prepared = rec["k"], rec["r"], rec["v"], rec["m"], rec["p"]
            if kind not in SLOT_KINDS or not isinstance(r, int) or not isinstance(v, int):
                raise ValueError(f"bad slot {kind!r}, {r!r}, {v!r}")
            if not isinstance(wire, dict) or not isinstance(wire.get("m"), bytes):
                raise ValueError("bad message")
        except Exception as exc:
            raise VoteLogError(
                f"{self.path}: record at byte {off} passed its checksum but is not a valid "
                f"slot ({exc}): the vote log is corrupt"
            ) from None
        key = (kind, r, v)
        if key in self._slots:
            log.warning("%s: slot %s recorded twice; keeping the first", self.path, key)
            return
        slot = SignedSlot(kind, r, v, wire, prepared)
        self._slots[key] = slot
        self._by_round.setdefault(r, []).append(slot)

    def _drop_torn_tail(self, off: int, size: int, what: str) -> None:
        log.warning(
            "%s: dropping %d bytes at the end (%s): the node crashed while writing it, so it "
            "was never sent",
            self.path,
            size - off,
            what,
        )
        try:
            with open(self.path, "r+b") as f:
                f.truncate(off)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise VoteLogError(f"{self.path}: cannot truncate a torn record: {exc}") from exc

    def _rewrite_header(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, MAGIC)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise VoteLogError(f"{self.path}: cannot create the vote log: {exc}") from exc


def _fsync_dir(path: Path) -> None:
    """Make a rename or creation in ``path`` durable (a no-op where directories cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
