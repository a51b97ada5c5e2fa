"""Compression codecs for shards and checkpoints, a chunked file format, and ``auto`` choice.

Codecs: ``none``, ``zstd`` (zstandard), and the standard library's ``gzip``, ``zlib``,
``lzma``, ``bz2``. ``choose_codec`` measures each on a sample and picks the one with the
lowest modelled cost of storing and reading the data back::

    cost = compressed_bytes / io_bytes_per_s + raw_bytes / decompress_bytes_per_s
           + raw_bytes / compress_bytes_per_s / reads

(``io_bytes_per_s`` the disk or network rate, ``reads`` how often a byte is read per write:
shards are read every epoch, checkpoints about once). So ``auto`` picks by measured ratio
and speed, per content: token ids, text, float weights differ.

Chunked files (``write_chunked``/``ChunkedReader``) hold a payload as independently
compressed chunks so that a window can be read without decompressing the whole file::

    b"SWZC" u8 version  u8 codec-name-length  codec-name  u32 chunk_bytes
    chunk 0 .. chunk n-1                      compressed bytes, back to back
    index: n x (u64 offset, u32 compressed length, u32 raw length, u32 crc32 of raw)
    u64 n  u64 index offset  b"SWZC"

Every chunk's crc32 is checked each time it is decompressed; a truncated file, a bad magic,
a bad index or a chunk that fails its check raises ``CorruptShardError`` naming the file and
the chunk.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

from swarmlm.data.errors import CorruptShardError, DataError

__all__ = [
    "CODECS",
    "ChunkedReader",
    "CodecStats",
    "choose_codec",
    "compress",
    "decompress",
    "measure_codec",
    "write_chunked",
]

CODECS = ("none", "zstd", "gzip", "zlib", "lzma", "bz2")
MAGIC = b"SWZC"
VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 18  # 256 KiB: 128 Ki uint16 tokens per chunk
_INDEX = struct.Struct("<QIII")
_FOOTER = struct.Struct("<QQ4s")


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise DataError(f"unknown codec {codec!r} (known: {', '.join(CODECS)}, or 'auto')")


def compress(data: bytes, codec: str, level: int | None = None) -> bytes:
    """``data`` compressed with ``codec`` (default levels: zstd 3, gzip/zlib 6, lzma 6, bz2 9)."""
    _check(codec)
    if codec == "none":
        return bytes(data)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=3 if level is None else level).compress(data)
    if codec == "gzip":
        return gzip.compress(data, compresslevel=6 if level is None else level, mtime=0)
    if codec == "zlib":
        return zlib.compress(data, 6 if level is None else level)
    if codec == "lzma":
        return lzma.compress(data, preset=6 if level is None else level)
    return bz2.compress(data, 9 if level is None else level)


def decompress(data: bytes, codec: str) -> bytes:
    """Inverse of ``compress``; raises ``CorruptShardError`` for undecodable input."""
    _check(codec)
    try:
        if codec == "none":
            return bytes(data)
        if codec == "zstd":
            return zstandard.ZstdDecompressor().decompress(data)
        if codec == "gzip":
            return gzip.decompress(data)
        if codec == "zlib":
            return zlib.decompress(data)
        if codec == "lzma":
            return lzma.decompress(data)
        return bz2.decompress(data)
    except (zstandard.ZstdError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise CorruptShardError(f"{codec} data does not decompress: {e}") from e


@dataclass(frozen=True)
class CodecStats:
    """One codec measured on one sample: ratio = raw / compressed; speeds in MB/s of raw."""

    codec: str
    ratio: float
    compress_mb_s: float
    decompress_mb_s: float

    def cost(self, raw_bytes: int, io_mb_s: float, reads: float) -> float:
        return (
            raw_bytes / self.ratio / (io_mb_s * 1e6)
            + raw_bytes / (self.decompress_mb_s * 1e6)
            + raw_bytes / (self.compress_mb_s * 1e6) / reads
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "ratio": round(self.ratio, 3),
            "compress_mb_s": round(self.compress_mb_s, 1),
            "decompress_mb_s": round(self.decompress_mb_s, 1),
        }


def _timed(fn: Callable[[], bytes], min_seconds: float) -> tuple[bytes, float]:
    """Result and best-of seconds of ``fn``, repeated until ``min_seconds`` have passed."""
    best = float("inf")
    spent = 0.0
    out = b""
    while spent < min_seconds or best == float("inf"):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
    return out, max(best, 1e-9)


def measure_codec(sample: bytes, codec: str, *, min_seconds: float = 0.05) -> CodecStats:
    """Ratio and best-of compress/decompress speed of ``codec`` on ``sample``."""
    if not sample:
        raise DataError("cannot measure a codec on an empty sample")
    packed, t_c = _timed(lambda: compress(sample, codec), min_seconds)
    raw, t_d = _timed(lambda: decompress(packed, codec), min_seconds)
    if raw != sample:
        raise DataError(f"codec {codec} did not round-trip the sample")  # pragma: no cover
    n = len(sample)
    return CodecStats(codec, n / max(1, len(packed)), n / 1e6 / t_c, n / 1e6 / t_d)


def choose_codec(
    sample: bytes,
    *,
    io_mb_s: float = 200.0,
    reads: float = 10.0,
    candidates: tuple[str, ...] = CODECS,
    min_seconds: float = 0.02,
) -> tuple[str, list[CodecStats]]:
    """The codec of lowest modelled cost on ``sample`` (see the module docstring)."""
    for c in candidates:
        _check(c)
    stats = [measure_codec(sample, c, min_seconds=min_seconds) for c in candidates]
    best = min(stats, key=lambda s: s.cost(len(sample), io_mb_s, reads))
    return best.codec, stats


def resolve_codec(codec: str, sample: bytes, **kwargs: float) -> str:
    """``codec`` itself, or for ``"auto"`` the choice of ``choose_codec`` on ``sample``."""
    if codec == "auto":
        return choose_codec(sample, **kwargs)[0]  # type: ignore[arg-type]
    _check(codec)
    return codec


# ---- chunked files ----------------------------------------------------------------------


def write_chunked(
    path: Path, data: bytes | memoryview, codec: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Write ``data`` as a chunked compressed file at ``path``; returns the file's size."""
    _check(codec)
    if chunk_bytes < 1:
        raise DataError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    view = memoryview(data).cast("B")
    name = codec.encode()
    index: list[tuple[int, int, int, int]] = []
    with open(path, "wb") as fh:
        fh.write(MAGIC + bytes([VERSION, len(name)]) + name + struct.pack("<I", chunk_bytes))
        for start in range(0, len(view), chunk_bytes):
            raw = bytes(view[start : start + chunk_bytes])
            packed = compress(raw, codec)
            index.append((fh.tell(), len(packed), len(raw), zlib.crc32(raw)))
            fh.write(packed)
        index_at = fh.tell()
        for entry in index:
            fh.write(_INDEX.pack(*entry))
        fh.write(_FOOTER.pack(len(index), index_at, MAGIC))
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


class ChunkedReader:
    """Random access to a chunked file's raw bytes; every decompressed chunk is checked.

    ``chunk_cache`` (optional) maps ``(path, chunk)`` to raw bytes, e.g. a ``ByteCache``:
    hot chunks are then decompressed once.
    """

    def __init__(self, path: Path, chunk_cache: object | None = None) -> None:
        self.path = Path(path)
        self._cache = chunk_cache
        self._fh: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _corrupt(self, what: str) -> CorruptShardError:
        return CorruptShardError(f"shard {self.path}: {what}")

    def _read_header(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(6)
        if len(head) < 6 or head[:4] != MAGIC:
            raise self._corrupt("not a swarmlm chunked file (bad magic)")
        if head[4] != VERSION:
            raise self._corrupt(f"chunked format version {head[4]} is not {VERSION}")
        name = self._fh.read(head[5]).decode("ascii", "replace")
        if name not in CODECS:
            raise self._corrupt(f"unknown codec {name!r} in header")
        self.codec = name
        (self.chunk_bytes,) = struct.unpack("<I", self._fh.read(4))
        if size < _FOOTER.size:
            raise self._corrupt("truncated (no footer)")
        self._fh.seek(size - _FOOTER.size)
        n, index_at, magic = _FOOTER.unpack(self._fh.read(_FOOTER.size))
        if magic != MAGIC or index_at + n * _INDEX.size + _FOOTER.size != size:
            raise self._corrupt("truncated or corrupt (footer does not match the file size)")
        self._fh.seek(index_at)
        raw_index = self._fh.read(n * _INDEX.size)
        self.index = [_INDEX.unpack_from(raw_index, i * _INDEX.size) for i in range(n)]
        self.size = sum(e[2] for e in self.index)
        for i, (offset, clen, rlen, _) in enumerate(self.index):
            if offset + clen > index_at or (i < n - 1 and rlen != self.chunk_bytes):
                raise self._corrupt(f"chunk {i}: index entry out of range")

    def chunk(self, i: int) -> bytes:
        """Raw bytes of chunk ``i``, crc32-checked (from the cache when it holds them)."""
        key = (str(self.path), i)
        cache = self._cache
        if cache is not None:
            hit = cache.get(key)  # type: ignore[attr-defined]
            if hit is not None:
                return hit  # type: ignore[no-any-return]
        offset, clen, rlen, crc = self.index[i]
        self._fh.seek(offset)
        packed = self._fh.read(clen)
        if len(packed) != clen:
            raise self._corrupt(f"chunk {i}: truncated")
        try:
            raw = decompress(packed, self.codec)
        except CorruptShardError as e:
            raise self._corrupt(f"chunk {i}: {e}") from e
        if len(raw) != rlen or zlib.crc32(raw) != crc:
            raise self._corrupt(f"chunk {i}: crc32 mismatch (corrupted)")
        if cache is not None:
            cache.put(key, raw)  # type: ignore[attr-defined]
        return raw

    def read(self, start: int, length: int) -> bytes:
        """Raw bytes ``[start, start + length)``."""
        if start < 0 or length < 0 or start + length > self.size:
            raise IndexError(f"{self.path}: [{start}, {start + length}) outside 0..{self.size}")
        out = bytearray()
        pos = start
        end = start + length
        while pos < end:
            i = pos // self.chunk_bytes
            raw = self.chunk(i)
            lo = pos - i * self.chunk_bytes
            take = min(end - pos, len(raw) - lo)
            out += raw[lo : lo + take]
            pos += take
        return bytes(out)

    def read_all(self) -> bytes:
        return b"".join(self.chunk(i) for i in range(len(self.index)))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ChunkedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
