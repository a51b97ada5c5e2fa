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
# Payloads of at least 1 GiB must stream; the hard ceiling only guards the size field.
DEFAULT_MAX_BLOB = 4 * 1024 * 1024 * 1024


def digest_of(data: bytes | bytearray | memoryview) -> bytes:
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
    digest: bytes, data: bytes | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[tuple[int, int]]:
    """(offset, end) spans that cover ``data`` in chunks; an empty blob is one empty chunk."""
    n = len(data)
    if n == 0:
        return [(0, 0)]
    return [(o, min(o + chunk_size, n)) for o in range(0, n, chunk_size)]


def encode_blob_chunk(digest: bytes, total: int, offset: int, chunk: bytes | memoryview) -> bytes:
    """One ``blob`` frame; the chunk must fit a frame (chunk_size well below max_frame)."""
    return encode_frame(
        {"t": "blob", "d": digest, "n": total, "o": offset, "c": bytes(chunk)},
        max_frame=len(chunk) + 1024,
    )


@dataclass
class _PartialBlob:
    total: int
    buf: bytearray
    received: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)


class BlobAssembler:
    """Reassembles ``blob`` frames from one peer, bounded in count and bytes.

    Invariants: at most ``max_partial`` blobs in flight; the bytes held for unfinished blobs
    never exceed ``max_bytes``; chunks must arrive in order (one TCP stream); a finished
    blob is returned only if its SHA-256 equals its announced digest.
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
        # digest -> bytes still to skip of a blob refused at its first chunk
        self._skipping: dict[bytes, int] = {}

    def add(self, frame: dict[str, Any]) -> tuple[bytes, bytes] | None:
        """Feed one blob frame; returns (digest, data) when a blob completes and verifies.

        Raises WireError naming the field at fault (the partial blob is discarded).
        """
        d, n, o, c = frame.get("d"), frame.get("n"), frame.get("o"), frame.get("c")
        if not isinstance(d, bytes) or len(d) != DIGEST_SIZE:
            raise WireError("blob frame field 'd' must be a 32-byte digest")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.max_blob:
            self._drop(d)
            raise WireError(f"blob frame field 'n' (total size) invalid or over {self.max_blob}")
        if not isinstance(o, int) or isinstance(o, bool) or not isinstance(c, bytes):
            self._drop(d)
            raise WireError("blob frame fields 'o' (int) and 'c' (bytes) are required")
        skip = self._skipping.get(d)
        if skip is not None and o > 0:
            left = skip - len(c)
            if left <= 0:
                del self._skipping[d]
            else:
                self._skipping[d] = left
            return None
        part = self._partial.get(d)
        if part is None:
            if o != 0:
                raise WireError(f"blob {d.hex()[:12]} starts at offset {o}, expected 0")
            if self.accept is not None and not self.accept(d):
                if n > len(c) and len(self._skipping) < 64:
                    self._skipping[d] = n - len(c)
                raise WireError(f"blob {d.hex()[:12]} was not announced or requested")
            if len(self._partial) >= self.max_partial:
                raise WireError(f"more than {self.max_partial} blobs in flight from one peer")
            if self._held + n > self.max_bytes:
                raise WireError(f"blob of {n} bytes would exceed the {self.max_bytes} byte budget")
            part = _PartialBlob(total=n, buf=bytearray(n))
            self._partial[d] = part
            self._held += n
        if n != part.total or o != part.received or o + len(c) > part.total:
            self._drop(d)
            raise WireError(f"blob {d.hex()[:12]} chunk at {o} (+{len(c)}) out of order or size")
        part.buf[o : o + len(c)] = c
        part.hasher.update(c)
        part.received += len(c)
        if part.received < part.total or (part.total > 0 and len(c) == 0):
            return None
        self._drop(d)
        if part.hasher.digest() != d:
            raise WireError(f"blob {d.hex()[:12]} failed its hash check ({part.total} bytes)")
        return d, bytes(part.buf)

    def _drop(self, d: bytes) -> None:
        part = self._partial.pop(d, None)
        if part is not None:
            self._held -= part.total

    @property
    def held_bytes(self) -> int:
        return self._held
