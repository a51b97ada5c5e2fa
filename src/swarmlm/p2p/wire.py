"""Wire format: length-prefixed msgpack frames and chunked, hash-verified blobs.

Frame layout: a 4-byte big-endian unsigned body length, then a msgpack map body with at
least ``{"v": WIRE_VERSION, "t": <frame type str>}``. A body longer than the receiver's
``max_frame`` is refused before any of it is read, so a peer cannot make us allocate more
than ``max_frame`` bytes per frame.

Large payloads travel as a run of ``blob`` frames ``{"t": "blob", "d": digest, "n": total,
"o": offset, "c": chunk}``; :class:`BlobAssembler` puts them back together in order and
releases the bytes only once their SHA-256 equals the digest, so a corrupted or forged blob
is never used.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from swarmlm.p2p.errors import WireError

WIRE_VERSION = 1
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
DIGEST_SIZE = 32
# Blob frames skip msgpack: magic byte (not a valid top-level map start), digest, total, offset.
BLOB_MAGIC = 0xB1
BLOB_HEAD = struct.Struct(">B32sQQ")
Payload = bytes | bytearray
# Payloads of at least 1 GiB must stream; the hard ceiling only guards the size field.
DEFAULT_MAX_BLOB = 4 * 1024 * 1024 * 1024


def digest_of(data: Payload | memoryview) -> bytes:
    """SHA-256 of ``data`` (32 bytes): the name a payload is contributed and fetched by."""
    return hashlib.sha256(data).digest()


def encode_frame(body: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Header + msgpack body for ``body``; sets ``v``. Raises WireError if too large."""
    body = {**body, "v": WIRE_VERSION}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    if len(packed) > max_frame:
        raise WireError(
            f"frame of type {body.get('t')!r} is {len(packed)} bytes, over max_frame {max_frame}"
        )
    return HEADER.pack(len(packed)) + packed


def decode_frame_body(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """Parse one frame body. Raises only :class:`WireError`, whatever the input bytes."""
    if len(data) > max_frame:
        raise WireError(f"frame body of {len(data)} bytes is over max_frame {max_frame}")
    if data[:1] == bytes([BLOB_MAGIC]):
        if len(data) < BLOB_HEAD.size:
            raise WireError(f"blob frame of {len(data)} bytes is shorter than its head")
        _, d, n, o = BLOB_HEAD.unpack_from(data)
        return {"v": WIRE_VERSION, "t": "blob", "d": d, "n": n, "o": o,
                "c": data[BLOB_HEAD.size :]}  # fmt: skip
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, ...)
        raise WireError(f"frame body is not valid msgpack: {str(exc)[:80]!r}") from None
    if not isinstance(obj, dict):
        raise WireError(f"frame body must be a map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != WIRE_VERSION:
        raise WireError(f"frame has wire version {version!r}, this node speaks {WIRE_VERSION}")
    if not isinstance(obj.get("t"), str):
        raise WireError("frame has no string field 't' (frame type)")
    return obj


async def read_frame(
    reader: asyncio.StreamReader, max_frame: int, timeout: float | None
) -> dict[str, Any]:
    """Read one frame; raises WireError (bad frame), TimeoutError or IncompleteReadError."""
    header = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout)
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise WireError(f"frame announces {length} bytes, over max_frame {max_frame}")
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return decode_frame_body(body, max_frame)


class FrameReader:
    """Reads frames from a stream; blob chunks go straight into a :class:`BlobAssembler`.

    Why not ``readexactly``: with megabyte frames its buffer handling copies every byte
    several times. Here each read drains the stream buffer, and chunk bytes are copied once,
    into the blob's final buffer. ``timeout`` bounds the silence before any single read.
    """

    def __init__(self, reader: asyncio.StreamReader, max_frame: int, timeout: float) -> None:
        self.reader = reader
        self.max_frame = max_frame
        self.timeout = timeout

    async def _read(self, n: int) -> bytes:
        data = await asyncio.wait_for(self.reader.read(n), self.timeout)
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        return data

    async def _exact(self, n: int) -> bytes:
        parts = []
        while n > 0:
            data = await self._read(n)
            parts.append(data)
            n -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def next(self, assembler: BlobAssembler) -> dict[str, Any]:
        """The next frame. Blob chunks return ``{"t": "blob", "done": BlobDone | None}``.

        Raises WireError when framing can no longer be trusted (oversized, truncated blob
        head); a blob refused by the assembler is consumed and reported as
        ``{"t": "blob", "error": WireError}`` so the connection survives.
        """
        (length,) = HEADER.unpack(await self._exact(HEADER.size))
        if length > self.max_frame:
            raise WireError(f"frame announces {length} bytes, over max_frame {self.max_frame}")
        if length == 0:
            raise WireError("empty frame")
        first = await self._exact(1)
        if first[0] != BLOB_MAGIC:
            return decode_frame_body(first + await self._exact(length - 1), self.max_frame)
        if length < BLOB_HEAD.size:
            raise WireError(f"blob frame of {length} bytes is shorter than its head")
        _, d, n, o = BLOB_HEAD.unpack(first + await self._exact(BLOB_HEAD.size - 1))
        remaining = length - BLOB_HEAD.size
        try:
            store = assembler.begin(d, n, o, remaining)
        except WireError as exc:
            await self._skip(remaining)
            return {"t": "blob", "error": exc, "size": length}
        if not store:
            await self._skip(remaining)
            return {"t": "blob", "done": None, "size": length}
        while remaining > 0:
            data = await self._read(min(remaining, 1 << 20))
            assembler.feed(data)
            remaining -= len(data)
        try:
            done = assembler.end()
        except WireError as exc:
            return {"t": "blob", "error": exc, "size": length}
        return {"t": "blob", "done": done, "size": length}

    async def _skip(self, n: int) -> None:
        while n > 0:
            n -= len(await self._read(min(n, 1 << 20)))


class FrameDecoder:
    """Incremental decoder over a byte stream (for non-asyncio callers and fuzzing).

    ``feed`` returns the complete frames found so far; after a WireError the stream is
    unusable (the length prefix can no longer be trusted) and the caller must drop it.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        frames: list[dict[str, Any]] = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise WireError(f"frame announces {length} bytes, over max_frame {self.max_frame}")
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            frames.append(decode_frame_body(body, self.max_frame))
        return frames


def blob_frames(
    digest: bytes, data: Payload | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[tuple[int, int]]:
    """(offset, end) spans that cover ``data`` in chunks; an empty blob is one empty chunk."""
    n = len(data)
    if n == 0:
        return [(0, 0)]
    return [(o, min(o + chunk_size, n)) for o in range(0, n, chunk_size)]


def blob_chunk_prefix(digest: bytes, total: int, offset: int, length: int) -> bytes:
    """Length header + fixed blob head; the ``length`` chunk bytes follow unencoded.

    Blob frame body: ``0xB1`` (blob, wire version 1), digest (32 bytes), total size and
    offset (unsigned 64-bit big-endian), then the raw chunk. Writing the chunk as a separate
    buffer saves copying every payload byte on the sending side.
    """
    return HEADER.pack(BLOB_HEAD.size + length) + BLOB_HEAD.pack(BLOB_MAGIC, digest, total, offset)


def encode_blob_chunk(digest: bytes, total: int, offset: int, chunk: bytes | memoryview) -> bytes:
    """One whole blob frame (tests and tools; the transport writes prefix and chunk apart)."""
    return blob_chunk_prefix(digest, total, offset, len(chunk)) + bytes(chunk)


@dataclass
class BlobDone:
    """A fully received blob; it may be used only if ``actual`` (its SHA-256) == ``digest``.

    Hashing happens chunk by chunk on arrival: measured here, that beats a hashing thread,
    which loses more to GIL hand-offs than it gains in parallelism on two busy cores.
    """

    digest: bytes
    data: bytearray
    actual: bytes


@dataclass
class _PartialBlob:
    total: int
    buf: bytearray
    received: int = 0
    chunk_start: int = 0
    chunk_end: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)


class BlobAssembler:
    """Reassembles the blob chunks of one peer's stream, bounded in count and bytes.

    Invariants: at most ``max_partial`` blobs in flight; bytes reserved for unfinished blobs
    never exceed ``max_bytes``; chunks arrive in order (one TCP stream); a blob is handed out
    with its hash and must be checked against its digest before use.
    """

    def __init__(
        self,
        max_blob: int = DEFAULT_MAX_BLOB,
        max_partial: int = 8,
        max_bytes: int | None = None,
        accept: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.accept = accept
        self.max_blob = max_blob
        self.max_partial = max_partial
        self.max_bytes = max_bytes if max_bytes is not None else 2 * max_blob
        self._partial: dict[bytes, _PartialBlob] = {}
        self._held = 0
        self._skipping: dict[bytes, int] = {}  # digest -> bytes still to skip (refused blob)
        self._current: tuple[bytes, _PartialBlob] | None = None

    def begin(self, d: bytes, n: int, o: int, length: int) -> bool:
        """Start a chunk; True = feed its bytes, False = skip them (blob refused earlier).

        Raises WireError naming the problem (the partial blob, if any, is discarded).
        """
        if len(d) != DIGEST_SIZE:
            raise WireError("blob chunk digest must be 32 bytes")
        if n > self.max_blob:
            self._drop(d)
            raise WireError(f"blob total size {n} is over max_blob {self.max_blob}")
        skip = self._skipping.get(d)
        if skip is not None and o > 0:
            left = skip - length
            if left <= 0:
                del self._skipping[d]
            else:
                self._skipping[d] = left
            return False
        part = self._partial.get(d)
        if part is None:
            if o != 0:
                raise WireError(f"blob {d.hex()[:12]} starts at offset {o}, expected 0")
            if self.accept is not None and not self.accept(d):
                if n > length and len(self._skipping) < 64:
                    self._skipping[d] = n - length
                raise WireError(f"blob {d.hex()[:12]} was not announced or requested")
            if len(self._partial) >= self.max_partial:
                raise WireError(f"more than {self.max_partial} blobs in flight from one peer")
            if self._held + n > self.max_bytes:
                raise WireError(f"blob of {n} bytes would exceed the {self.max_bytes} byte budget")
            part = _PartialBlob(total=n, buf=bytearray(n))
            self._partial[d] = part
            self._held += n
        if n != part.total or o != part.received or o + length > part.total:
            self._drop(d)
            raise WireError(f"blob {d.hex()[:12]} chunk at {o} (+{length}) out of order or size")
        if length == 0 and n > 0:
            self._drop(d)
            raise WireError(f"blob {d.hex()[:12]} has an empty chunk")
        part.chunk_start, part.chunk_end = o, o + length
        self._current = (d, part)
        return True

    def feed(self, data: bytes) -> None:
        """Copy the next bytes of the current chunk into place (caller bounds the length)."""
        assert self._current is not None
        part = self._current[1]
        end = part.received + len(data)
        if end > part.chunk_end:
            raise WireError("blob chunk longer than announced")
        part.buf[part.received : end] = data
        part.received = end

    def end(self) -> BlobDone | None:
        """Finish the current chunk; returns the blob when this was its last chunk."""
        assert self._current is not None
        d, part = self._current
        self._current = None
        part.hasher.update(memoryview(part.buf)[part.chunk_start : part.chunk_end])
        if part.received < part.total:
            return None
        self._drop(d)
        return BlobDone(d, part.buf, part.hasher.digest())

    def add(self, frame: dict[str, Any]) -> tuple[bytes, bytes] | None:
        """Feed one decoded blob frame dict (tools, tests); verifies synchronously.

        Returns (digest, data) when the blob completes and its hash matches; raises
        WireError naming the field at fault otherwise.
        """
        d, n, o, c = frame.get("d"), frame.get("n"), frame.get("o"), frame.get("c")
        if not isinstance(d, bytes) or len(d) != DIGEST_SIZE:
            raise WireError("blob frame field 'd' must be a 32-byte digest")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise WireError("blob frame field 'n' (total size) must be a non-negative int")
        if not isinstance(o, int) or isinstance(o, bool) or o < 0 or not isinstance(c, bytes):
            raise WireError("blob frame fields 'o' (int) and 'c' (bytes) are required")
        if not self.begin(d, n, o, len(c)):
            return None
        self.feed(c)
        done = self.end()
        if done is None:
            return None
        if done.actual != d:
            raise WireError(f"blob {d.hex()[:12]} failed its hash check ({len(done.data)} bytes)")
        return d, bytes(done.data)

    def _drop(self, d: bytes) -> None:
        part = self._partial.pop(d, None)
        if part is not None:
            self._held -= part.total
        if self._current is not None and self._current[0] == d:
            self._current = None

    def receiving(self, d: bytes) -> bool:
        """True while blob ``d`` is partly received on this stream."""
        return d in self._partial

    @property
    def held_bytes(self) -> int:
        return self._held
