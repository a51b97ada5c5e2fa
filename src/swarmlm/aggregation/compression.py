"""Gradient compression codecs with a versioned, checksummed byte format.

Every codec turns a float32 tensor (any shape) into ``bytes`` and back. Decoding refuses
bytes that are not ours (:class:`ForeignPayloadError`) or that are damaged or inconsistent
(:class:`CorruptPayloadError`) with a message naming the field at fault, so a malformed
payload from a peer can never crash a node or smuggle NaNs into an aggregate.

Wire format, version 1 (all integers little-endian)::

    magic   4 bytes  b"SWLC"
    version u8       1
    codec   u8       codec id (see CODEC_IDS)
    ndim    u8       0..8
    flags   u8       bit 0: the body is one zstd frame (see below); other bits 0 (reserved)
    body    u64      length of the (possibly zstd-compressed) codec body in bytes
    shape   ndim x u64
    body    codec-specific (below)
    crc32   u32      zlib.crc32 of every preceding byte

Codecs and their documented error bounds (``x`` input, ``y = decode(encode(x))``):

* ``none``: float32 as is; exact.
* ``fp16``: ``|y - x| <= max(|x| * 2**-11, 2**-25)``; refuses ``|x| > 65504``.
* ``bf16``: ``|y - x| <= max(|x| * 2**-8, 2**-134)``; refuses values that round to infinity.
* ``int8``: blocks of ``block_size`` values share a float32 scale ``absmax / 127``;
  ``|y - x| <= absmax(block) / 254`` (plus float32 rounding, relative 1e-6). With
  ``zstd=True`` the body is zstd-compressed when that makes it smaller (flag bit 0): the
  quantised values of a pseudo-gradient are far from uniform over the 255 levels (about
  7.2 bits of entropy with blocks of 1024), so this saves 5-10 % of the bytes, exactly.
* ``int4``: as int8 with levels -7..7; ``|y - x| <= absmax(block) / 14``.
* ``topk``: keeps the ``k = ceil(fraction * numel)`` largest magnitudes exactly;
  every dropped value has ``|x| <= min kept |x|``, so ``|y - x| <= min kept |x|``.
* ``randk``: keeps ``k`` uniformly random coordinates exactly (``y = x`` there, 0 elsewhere;
  with ``unbiased=True`` kept values are scaled by ``numel / k``).
* ``topk_int8``: top-k whose kept values are int8 block-quantised (``block_size`` over the kept
  values in index order): kept ``|y - x| <= absmax(block) / 254``, dropped as top-k.
* ``topk_sign``: top-k whose kept values become their sign times the mean magnitude of their
  block (``block_size`` kept values in index order; the scaled sign of Karimireddy et al.
  2019, "Error Feedback Fixes SignSGD"): one bit a value plus a float32 a block. Kept
  ``|y - x| <= absmax(block)`` and each block keeps its L1 norm; dropped as top-k. At the
  same bytes it can keep about twice as many coordinates as ``topk_int8``, which is what
  error feedback needs when rounds are few.
* ``powersgd``: rank-``r`` approximation ``P Q^T`` of the tensor viewed as a matrix
  (one power iteration, warm-started from the previous round's ``Q`` when a state dict is
  passed); ``|y - x|_F <= |x|_F`` and exact when the matrix has rank <= r.

Compressed bodies (flag bit 0) must name their decompressed size in the zstd frame header,
at most ``16 x numel + 4096`` bytes (more than any codec's body), which the decoder checks
before decompressing.

Sparse bodies store sorted indices as the first index (u64) plus deltas in the narrowest of
1/2/4/8 bytes, compressed with zstd when that makes them smaller.

Lossy codecs are meant to be used through :class:`ErrorFeedback`, which keeps the residual
``compensated - transmitted`` per peer and adds it to the next round's input.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import zstandard
from torch import Tensor

from swarmlm.aggregation.errors import CodecError, CorruptPayloadError, ForeignPayloadError

logger = logging.getLogger(__name__)

MAGIC = b"SWLC"
FORMAT_VERSION = 1
MAX_NDIM = 8
#: Decoders refuse payloads claiming more elements than this (an allocation-bomb guard: a
#: sparse payload of a few bytes can claim a large dense shape). 2**28 float32 = 1 GiB.
#: Receivers that know the expected size should pass it as ``max_numel``.
DEFAULT_MAX_NUMEL = 1 << 28

_HEADER = struct.Struct("<4sBBBBQ")
FLAG_ZSTD_BODY = 1
_CRC = struct.Struct("<I")

CODEC_IDS: dict[str, int] = {
    "none": 0,
    "fp16": 1,
    "bf16": 2,
    "int8": 3,
    "int4": 4,
    "topk": 5,
    "randk": 6,
    "topk_int8": 7,
    "powersgd": 8,
    "topk_sign": 9,
}
_CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

State = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# framing


def _frame(codec_id: int, shape: tuple[int, ...], body: bytes, zstd: bool = False) -> bytes:
    flags = 0
    if zstd and body:
        packed = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(body)
        if len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD_BODY
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, codec_id, len(shape), flags, len(body))
    dims = struct.pack(f"<{len(shape)}Q", *shape)
    data = b"".join((head, dims, body))
    return data + _CRC.pack(zlib.crc32(data))


@dataclass(frozen=True)
class _Frame:
    codec: str
    shape: tuple[int, ...]
    body: memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _unframe(data: bytes | bytearray | memoryview, max_numel: int) -> _Frame:
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size + _CRC.size:
        if not view or bytes(view[:4]) != MAGIC[: len(view[:4])]:
            raise ForeignPayloadError(
                f"not a swarmlm compressed payload: {len(view)} bytes without the magic {MAGIC!r}"
            )
        raise CorruptPayloadError(
            f"payload truncated: {len(view)} bytes, the header alone needs "
            f"{_HEADER.size + _CRC.size}"
        )
    magic, version, codec_id, ndim, flags, body_len = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise ForeignPayloadError(
            f"not a swarmlm compressed payload: magic {bytes(magic)!r}, expected {MAGIC!r}"
        )
    if version != FORMAT_VERSION:
        raise ForeignPayloadError(
            f"unsupported payload format version {version}; this build reads version "
            f"{FORMAT_VERSION}"
        )
    (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    if zlib.crc32(view[: len(view) - _CRC.size]) != crc:
        raise CorruptPayloadError("payload checksum mismatch: the bytes were damaged in transit")
    name = _CODEC_NAMES.get(codec_id)
    if name is None:
        raise CorruptPayloadError(f"payload names unknown codec id {codec_id}")
    if ndim > MAX_NDIM or flags & ~FLAG_ZSTD_BODY:
        raise CorruptPayloadError(f"payload header invalid: ndim={ndim}, flags={flags}")
    expected = _HEADER.size + 8 * ndim + body_len + _CRC.size
    if expected != len(view):
        raise CorruptPayloadError(
            f"payload length {len(view)} does not match its header (expects {expected})"
        )
    shape = struct.unpack_from(f"<{ndim}Q", view, _HEADER.size)
    numel = math.prod(shape)
    if numel > max_numel or any(dim > max_numel for dim in shape):
        raise CorruptPayloadError(
            f"payload claims shape {shape} ({numel} elements), above the limit {max_numel}"
        )
    start = _HEADER.size + 8 * ndim
    body = view[start : start + body_len]
    if flags & FLAG_ZSTD_BODY:
        # within what any codec's body of numel values can take (its decoder checks exactly)
        body = memoryview(_unzstd(name, body, 16 * numel + 4096, "body", require_size=True))
    return _Frame(name, tuple(int(s) for s in shape), body)


class _Reader:
    """Bounds-checked cursor over a codec body; errors name the codec and the field."""

    def __init__(self, codec: str, body: memoryview) -> None:
        self.codec = codec
        self.body = body
        self.pos = 0

    def take(self, n: int, field: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.body):
            raise CorruptPayloadError(
                f"{self.codec} payload truncated reading {field}: needs {n} bytes at offset "
                f"{self.pos}, body has {len(self.body)}"
            )
        out = self.body[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, field: str) -> tuple[Any, ...]:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, field))

    def array(self, dtype: np.dtype[Any], count: int, field: str) -> np.ndarray[Any, Any]:
        raw = self.take(count * dtype.itemsize, field)
        return np.frombuffer(raw, dtype=dtype, count=count)

    def finish(self) -> None:
        if self.pos != len(self.body):
            raise CorruptPayloadError(
                f"{self.codec} payload has {len(self.body) - self.pos} unexpected trailing bytes"
            )


def _finite_or_raise(t: Tensor, codec: str, field: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CorruptPayloadError(f"{codec} payload field {field} contains NaN or infinity")


def _to_tensor(arr: np.ndarray[Any, Any]) -> Tensor:
    # np.frombuffer views are read-only; copy once into memory torch owns.
    return torch.from_numpy(arr.copy())


def _check_input(x: Tensor, codec: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise CodecError(f"{codec}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise CodecError(f"{codec}: input must be float32, got {x.dtype}")
    if x.dim() > MAX_NDIM:
        raise CodecError(f"{codec}: input has {x.dim()} dimensions, at most {MAX_NDIM}")
    flat = x.detach().reshape(-1).contiguous()
    if not bool(torch.isfinite(flat).all()):
        raise CodecError(f"{codec}: input contains NaN or infinity")
    return flat


# --------------------------------------------------------------------------------------------
# block quantisation shared by int8, int4 and topk_int8


def _quantize_blocks(flat: Tensor, block_size: int, levels: int) -> tuple[Tensor, Tensor]:
    """Symmetric absmax quantisation: returns (scales float32 (nblocks,), q int8 (numel,))."""
    numel = flat.numel()
    nblocks = -(-numel // block_size)
    pad = nblocks * block_size - numel
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.view(nblocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    scales = absmax / levels
    inv = torch.where(absmax > 0, levels / absmax, torch.zeros_like(absmax))
    q = (blocks * inv[:, None]).round_().clamp_(-levels, levels).to(torch.int8)
    return scales, q.view(-1)[:numel]


def _dequantize_blocks(q: Tensor, scales: Tensor, block_size: int) -> Tensor:
    """Inverse of :func:`_quantize_blocks`; allocates ``O(numel)`` whatever ``block_size``."""
    numel = q.numel()
    full = numel // block_size * block_size
    out = torch.empty(numel, dtype=torch.float32)
    if full:
        blocks = q[:full].to(torch.float32).view(-1, block_size)
        out[:full] = (blocks * scales[: full // block_size, None]).view(-1)
    if full < numel:
        out[full:] = q[full:].to(torch.float32) * scales[-1]
    return out


def _read_scales(r: _Reader, numel: int, block_size: int) -> Tensor:
    """The float32 per-block scales of ``numel`` values: finite and non-negative."""
    scales = _to_tensor(r.array(np.dtype("<f4"), -(-numel // block_size), "scales"))
    _finite_or_raise(scales, r.codec, "scales")
    if bool((scales < 0).any()):
        raise CorruptPayloadError(f"{r.codec} payload field scales has negative entries")
    return scales


def _read_blocks(
    r: _Reader, numel: int, block_size: int, levels: int, packed4: bool
) -> tuple[Tensor, Tensor]:
    scales = _read_scales(r, numel, block_size)
    if packed4:
        packed = _to_tensor(r.array(np.dtype("u1"), (numel + 1) // 2, "values"))
        q = torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:numel]
        q = q.to(torch.int8) - 8
    else:
        q = _to_tensor(r.array(np.dtype("i1"), numel, "values"))
    if numel and int(q.abs().max()) > levels:
        raise CorruptPayloadError(f"{r.codec} payload has quantised values outside ±{levels}")
    return scales, q


def _sign_blocks(flat: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Per block the mean magnitude (float32 ``(nblocks,)``) and which values are negative."""
    numel = flat.numel()
    nblocks = -(-numel // block_size)
    pad = nblocks * block_size - numel
    mags = torch.nn.functional.pad(flat.abs(), (0, pad)).view(nblocks, block_size).sum(dim=1)
    counts = torch.full((nblocks,), float(block_size))
    if pad:
        counts[-1] = block_size - pad
    return mags / counts, flat < 0


def _read_signs(r: _Reader, numel: int, block_size: int) -> Tensor:
    scales = _read_scales(r, numel, block_size)
    packed = r.array(np.dtype("u1"), (numel + 7) // 8, "signs")
    negative = np.unpackbits(packed)
    if negative[numel:].any():
        raise CorruptPayloadError(f"{r.codec} payload has sign bits set past its {numel} values")
    sign = 1.0 - 2.0 * torch.from_numpy(negative[:numel].astype(np.float32))
    return sign * scales.repeat_interleave(block_size)[:numel]


def _check_payload_block_size(codec: str, block_size: int) -> None:
    if not 1 <= block_size <= 1 << 24:
        raise CorruptPayloadError(f"{codec} payload has block_size {block_size}, not in [1, 2**24]")


def _check_block_size(codec: str, block_size: int) -> int:
    if not isinstance(block_size, int) or not 1 <= block_size <= 1 << 24:
        raise CodecError(f"{codec}: block_size must be an int in [1, 2**24], got {block_size!r}")
    return block_size


# --------------------------------------------------------------------------------------------
# zstd sections


def _unzstd(
    codec: str, raw: bytes | memoryview, limit: int, field: str, *, require_size: bool = False
) -> bytes:
    """Decompress a zstd section of at most ``limit`` bytes from a peer.

    The frame header's claimed size is checked before decompressing: python-zstandard
    allocates whatever a header claims and ignores ``max_output_size`` then, so a 20-byte
    frame claiming a terabyte raised ``MemoryError`` (a crash, not a refusal).
    ``require_size``: refuse a frame whose header does not state its size (whole bodies).
    """
    data = bytes(raw)
    try:
        claimed = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CorruptPayloadError(f"{codec} payload {field}: not a zstd frame ({exc})") from exc
    if require_size and claimed < 0:
        raise CorruptPayloadError(f"{codec} payload {field}: zstd frame does not state its size")
    if limit <= 0 or claimed > limit:
        raise CorruptPayloadError(
            f"{codec} payload {field}: zstd frame claims {claimed} bytes, at most {limit} fit"
        )
    try:
        # claimed == -1 (size not in the header): max_output_size bounds the allocation
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise CorruptPayloadError(f"{codec} payload {field} fail zstd: {exc}") from exc


# --------------------------------------------------------------------------------------------
# sparse index encoding


def _encode_indices(idx: np.ndarray[Any, Any], use_zstd: bool) -> bytes:
    """Sorted unique int64 indices -> first (u64), width (u8), zstd flag (u8), len, bytes."""
    if idx.size == 0:
        return struct.pack("<QBBQ", 0, 1, 0, 0)
    deltas = np.diff(idx)
    top = int(deltas.max()) if deltas.size else 0
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8
    raw = deltas.astype(f"<u{width}").tobytes()
    zflag = 0
    if use_zstd and raw:
        packed = zstandard.ZstdCompressor(level=3).compress(raw)
        if len(packed) < len(raw):
            raw, zflag = packed, 1
    return struct.pack("<QBBQ", int(idx[0]), width, zflag, len(raw)) + raw


def _decode_indices(r: _Reader, k: int, numel: int) -> Tensor:
    first, width, zflag, nbytes = r.unpack("QBBQ", "index header")
    if k and first >= numel:
        raise CorruptPayloadError(
            f"{r.codec} payload index {first} out of range for {numel} elements"
        )
    if width not in (1, 2, 4, 8) or zflag not in (0, 1):
        raise CorruptPayloadError(
            f"{r.codec} payload index header invalid: width={width}, zstd={zflag}"
        )
    raw: bytes | memoryview = r.take(nbytes, "indices")
    expected = max(k - 1, 0) * width
    if zflag:
        raw = _unzstd(r.codec, raw, expected, "indices")
    if len(raw) != expected:
        raise CorruptPayloadError(
            f"{r.codec} payload index section holds {len(raw)} bytes, expected {expected} for k={k}"
        )
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    deltas = np.frombuffer(raw, dtype=f"<u{width}").astype(np.int64)
    if deltas.size and int(deltas.min()) < 1:
        raise CorruptPayloadError(f"{r.codec} payload indices are not strictly increasing")
    if width == 8 and deltas.size and int(deltas.max()) >= numel:
        raise CorruptPayloadError(f"{r.codec} payload index delta out of range")
    idx = np.empty(k, dtype=np.int64)
    idx[0] = first
    np.cumsum(deltas, out=idx[1:])
    idx[1:] += first
    if first >= numel or int(idx[-1]) >= numel:
        raise CorruptPayloadError(
            f"{r.codec} payload index {int(idx[-1])} out of range for {numel} elements"
        )
    return torch.from_numpy(idx)


# --------------------------------------------------------------------------------------------
# codecs


class Codec:
    """Base class. Subclasses set ``name`` and implement ``_encode_body``/``_decode_body``.

    ``encode(x, state)``: ``x`` float32 of any shape (at most 8 dims), finite. ``state`` is
    a per-peer dict a stateful codec (PowerSGD) may read and update; others ignore it.
    ``decode(data)`` returns a float32 tensor of the encoded shape.
    """

    name: ClassVar[str] = ""
    #: zstd-compress the whole body when that makes it smaller (frame flag bit 0)
    zstd_body: bool = False

    def encode(self, x: Tensor, state: State | None = None) -> bytes:
        flat = _check_input(x, self.name)
        body = self._encode_body(flat, tuple(x.shape), state)
        return _frame(CODEC_IDS[self.name], tuple(x.shape), body, self.zstd_body)

    def decode(
        self, data: bytes | bytearray | memoryview, max_numel: int = DEFAULT_MAX_NUMEL
    ) -> Tensor:
        frame = _unframe(data, max_numel)
        if frame.codec != self.name:
            raise CodecError(
                f"payload was encoded with codec {frame.codec!r}, this decoder is {self.name!r}"
            )
        return _decode_frame(frame)

    def _encode_body(self, flat: Tensor, shape: tuple[int, ...], state: State | None) -> bytes:
        raise NotImplementedError

    @classmethod
    def _decode_body(cls, r: _Reader, numel: int, shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoCompression(Codec):
    """Raw float32 (the reference for byte counts)."""

    name = "none"

    def _encode_body(self, flat: Tensor, shape: tuple[int, ...], state: State | None) -> bytes:
        return flat.numpy().astype("<f4", copy=False).tobytes()

    @classmethod
    def _decode_body(cls, r: _Reader, numel: int, shape: tuple[int, ...]) -> Tensor:
        out = _to_tensor(r.array(np.dtype("<f4"), numel, "values"))
        _finite_or_raise(out, r.codec, "values")
        return out


class Float16Codec(Codec):
    """IEEE half precision: 2 bytes a value."""

    name = "fp16"

    def _encode_body(self, flat: Tensor, shape: tuple[int, ...], state: State | None) -> bytes:
        if flat.numel() and float(flat.abs().max()) > 65504.0:
            raise CodecError(
                f"fp16: input magnitude {float(flat.abs().max()):.6g} exceeds the fp16 range "
                f"(65504); use bf16 or int8"
            )
        return flat.to(torch.float16).numpy().tobytes()

    @classmethod
    def _decode_body(cls, r: _Reader, numel: int, shape: tuple[int, ...]) -> Tensor:
        out = _to_tensor(r.array(np.dtype("<f2"), numel, "values")).to(torch.float32)
        _finite_or_raise(out, r.codec, "values")
        return out


class BFloat16Codec(Codec):
    """bfloat16: 2 bytes a value, the float32 exponent range, 8 bits of precision."""

    name = "bf16"

    def _encode_body(self, flat: Tensor, shape: tuple[int, ...], state: State | None) -> bytes:
        half = flat.to(torch.bfloat16)
        if not bool(torch.isfinite(half).all()):
            raise CodecError("bf16: input values round to infinity in bfloat16")
        return half.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()

    @classmethod
    def _decode_body(cls, r: _Reader, numel: int, shape: tuple[int, ...]) -> Tensor:
        raw = _to_tensor(r.array(np.dtype("<i2"), numel, "values"))
        out = raw.view(torch.bfloat16).to(torch.float32)
        _finite_or_raise(out, r.codec, "values")
        return out


class Int8BlockCodec(Codec):
    """Block-wise absmax int8: 1 byte a value plus a float32 scale per block; ``zstd``
    compresses the body losslessly on top (kept only when smaller)."""

    name = "int8"
    levels: ClassVar[int] = 127

    def __init__(self, block_size: int = 64, zstd: bool = False) -> None:
        self.block_size = _check_block_size(self.name, block_size)
        self.zstd_body = bool(zstd)

    def _encode_body(self, flat: Tensor, shape: tuple[int, ...], state: State | None) -> bytes:
        scales, q = _quantize_blocks(flat, self.block_size, self.levels)
        return b"".join(
            (struct.pack("<I", self.block_size), scales.numpy().tobytes(), self._pack(q))
        )

    @staticmethod
    def _pack(q: Tensor) -> bytes:
        return q.numpy().tobytes()

    @classmethod
    def _decode_body(cls, r: _Reader, numel: int, shape: tuple[int, ...]) -> Tensor:
        (block_size,) = r.unpack("I", "block_size")
        _check_payload_block_size(r.codec, block_size)
        scales, q = _read_blocks(r, numel, block_size, cls.levels, cls.name == "int4")
        return _dequantize_blocks(q, scales, block_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size}, zstd={self.zstd_body})"


class Int4BlockCodec(Int8BlockCodec):
    """Block-wise absmax 4-bit (levels -7..7, two values a byte)."""

    name = "int4"
    levels: ClassVar[int] = 7

    @staticmethod
    def _pack(q: Tensor) -> bytes:
        u = (q.to(torch.int16) + 8).to(torch.uint8)
        if u.numel() % 2:
            u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
        pairs = u.view(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()


def _check_fraction(codec: str, fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise CodecError(f"{codec}: fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


class _SparseCodec(Codec):
    """Shared body for top-k and random-k: k, index section, value section.

    Body: ``k u64``, ``value_kind u8`` (0 float32, 1 int8 blocks, 2 scaled signs), index
    section, values (the int8 and sign kinds prefix them with ``block_size u32`` and the
    float32 block scales; signs are packed eight to a byte, bit set = negative, unused bits
    of the last byte zero).
    """

    value_kind: ClassVar[int] = 0

    def __init__(self, fraction: float = 0.01, block_size: int = 64, zstd: bool = True) -> None:
        self.fraction = _check_fraction(self.name, fraction)
        self.block_size = _check_block_size(self.name, block_size)
        self.zstd = bool(zstd)

    def k_for(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel))) if numel else 0

    def _select(self, flat: Tensor, k: int, state: State | None) -> Tensor:
        raise NotImplementedError

    def _value_scale(self, numel: int, k: int) -> float:
        return 1.0

    def _encode_body(self, flat: Tensor, shape: tuple[int, ...], state: State | None) -> bytes:
        k = self.k_for(flat.numel())
        idx = torch.sort(self._select(flat, k, state)).values if k else torch.zeros(0).long()
        values = flat[idx] * self._value_scale(flat.numel(), k)
        parts = [
            struct.pack("<QB", k, self.value_kind),
            _encode_indices(idx.numpy(), self.zstd),
        ]
        if self.value_kind == 0:
            parts.append(values.numpy().astype("<f4", copy=False).tobytes())
        else:
            if self.value_kind == 1:
                scales, q = _quantize_blocks(values, self.block_size, 127)
                packed = q.numpy().tobytes()
            else:
                scales, negative = _sign_blocks(values, self.block_size)
                packed = np.packbits(negative.numpy()).tobytes()
            parts += [struct.pack("<I", self.block_size), scales.numpy().tobytes(), packed]
        return b"".join(parts)

    @classmethod
    def _decode_body(cls, r: _Reader, numel: int, shape: tuple[int, ...]) -> Tensor:
        k, kind = r.unpack("QB", "sparse header")
        if k > numel or kind not in (0, 1, 2):
            raise CorruptPayloadError(
                f"{r.codec} payload sparse header invalid: k={k} for {numel} elements, "
                f"value kind {kind}"
            )
        idx = _decode_indices(r, k, numel)
        if kind in (1, 2):
            (block_size,) = r.unpack("I", "block_size")
            _check_payload_block_size(r.codec, block_size)
        if kind == 1:
            scales, q = _read_blocks(r, k, block_size, 127, False)
            values = _dequantize_blocks(q, scales, block_size)
        elif kind == 2:
            values = _read_signs(r, k, block_size)
        else:
            values = _to_tensor(r.array(np.dtype("<f4"), k, "values"))
            _finite_or_raise(values, r.codec, "values")
        out = torch.zeros(numel, dtype=torch.float32)
        out[idx] = values
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fraction={self.fraction}, block_size={self.block_size})"


class TopKCodec(_SparseCodec):
    """The ``ceil(fraction * numel)`` largest magnitudes, float32 values, exact."""

    name = "topk"

    def _select(self, flat: Tensor, k: int, state: State | None) -> Tensor:
        return torch.topk(flat.abs(), k, sorted=False).indices


class TopKInt8Codec(TopKCodec):
    """Top-k with int8 block-quantised values and delta/zstd indices (about 3 bytes a value)."""

    name = "topk_int8"
    value_kind = 1


class TopKSignCodec(TopKCodec):
    """Top-k whose values are sent as signs scaled by their block's mean magnitude.

    A bit a value instead of eight: at equal bytes the fraction can be about doubled, and
    with error feedback the magnitude error comes back next round while a coordinate left
    out waits until it grows into the top-k. Over few rounds (DiLoCo's pseudo-gradients) the
    second is the costlier loss; benchmarks/swarm.py measures it.
    """

    name = "topk_sign"
    value_kind = 2

    def __init__(self, fraction: float = 0.01, block_size: int = 256, zstd: bool = True) -> None:
        super().__init__(fraction=fraction, block_size=block_size, zstd=zstd)


class RandomKCodec(_SparseCodec):
    """``k`` coordinates chosen uniformly at random (without replacement) from ``seed``.

    Each call draws fresh coordinates from a generator advanced in ``state['randk_step']``
    (so successive rounds differ but a run is reproducible). ``unbiased=True`` scales kept
    values by ``numel / k`` (an unbiased estimate; do not combine with error feedback).
    """

    name = "randk"

    def __init__(
        self, fraction: float = 0.01, seed: int = 0, unbiased: bool = False, zstd: bool = True
    ) -> None:
        super().__init__(fraction=fraction, zstd=zstd)
        self.seed = int(seed)
        self.unbiased = bool(unbiased)

    def _select(self, flat: Tensor, k: int, state: State | None) -> Tensor:
        step = 0
        if state is not None:
            step = int(state.get("randk_step", torch.zeros(())).item())
            state["randk_step"] = torch.tensor(step + 1)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randperm(flat.numel(), generator=gen)[:k]

    def _value_scale(self, numel: int, k: int) -> float:
        return numel / k if self.unbiased and k else 1.0

    def __repr__(self) -> str:
        return f"RandomKCodec(fraction={self.fraction}, seed={self.seed}, unbiased={self.unbiased})"


class PowerSGDCodec(Codec):
    """Rank-``rank`` approximation (Vogels et al. 2019) of the tensor viewed as a matrix.

    A 2-d input is used as is; other shapes are flattened and zero-padded to the most square
    ``rows x cols`` with ``rows = ceil(sqrt(numel))``. One power iteration: ``P = M Q``,
    orthonormalise ``P``, ``Q = M^T P``; sends ``P`` and ``Q``; ``decode = P Q^T``. With a
    ``state`` dict, ``Q`` is warm-started from the previous round (state key ``powersgd_q``),
    which is what makes a single iteration accurate over time.
    """

    name = "powersgd"

    def __init__(self, rank: int = 4, seed: int = 0) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise CodecError(f"powersgd: rank must be a positive int, got {rank!r}")
        self.rank = rank
        self.seed = int(seed)

    @staticmethod
    def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) == 2:
            return shape[0], shape[1]
        numel = math.prod(shape)
        rows = max(1, math.isqrt(max(numel - 1, 0)) + 1) if numel > 1 else 1
        return rows, max(1, -(-numel // rows))

    def _encode_body(self, flat: Tensor, shape: tuple[int, ...], state: State | None) -> bytes:
        rows, cols = self.matrix_shape(shape)
        pad = rows * cols - flat.numel()
        m = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(rows, cols)
        r = min(self.rank, rows, cols)
        q = None if state is None else state.get("powersgd_q")
        if q is None or q.shape != (cols, r):
            gen = torch.Generator().manual_seed(self.seed)
            q = torch.randn(cols, r, generator=gen)
        p = m @ q
        p, _ = torch.linalg.qr(p, mode="reduced")
        q = m.t() @ p
        if state is not None:
            state["powersgd_q"] = q.clone()
        return b"".join(
            (
                struct.pack("<QQI", rows, cols, r),
                p.contiguous().numpy().tobytes(),
                q.contiguous().numpy().tobytes(),
            )
        )

    @classmethod
    def _decode_body(cls, r: _Reader, numel: int, shape: tuple[int, ...]) -> Tensor:
        rows, cols, rank = r.unpack("QQI", "matrix header")
        if (rows, cols) != cls.matrix_shape(shape) or not 1 <= rank <= min(rows, cols):
            raise CorruptPayloadError(
                f"powersgd payload matrix {rows}x{cols} rank {rank} does not fit shape {shape}"
            )
        p = _to_tensor(r.array(np.dtype("<f4"), rows * rank, "P")).view(rows, rank)
        q = _to_tensor(r.array(np.dtype("<f4"), cols * rank, "Q")).view(cols, rank)
        _finite_or_raise(p, r.codec, "P")
        _finite_or_raise(q, r.codec, "Q")
        return (p @ q.t()).reshape(-1)[:numel]

    def __repr__(self) -> str:
        return f"PowerSGDCodec(rank={self.rank})"


_CODEC_CLASSES: dict[str, type[Codec]] = {
    cls.name: cls
    for cls in (
        NoCompression,
        Float16Codec,
        BFloat16Codec,
        Int8BlockCodec,
        Int4BlockCodec,
        TopKCodec,
        RandomKCodec,
        TopKInt8Codec,
        TopKSignCodec,
        PowerSGDCodec,
    )
}
CODECS: tuple[str, ...] = tuple(_CODEC_CLASSES)


def _decode_frame(frame: _Frame) -> Tensor:
    cls = _CODEC_CLASSES[frame.codec]
    reader = _Reader(frame.codec, frame.body)
    flat = cls._decode_body(reader, frame.numel, frame.shape)
    reader.finish()
    # Finite fields can still multiply out to infinity (a huge scale, a huge P Q^T).
    _finite_or_raise(flat, frame.codec, "decoded values")
    return flat.reshape(frame.shape)


def decode(data: bytes | bytearray | memoryview, max_numel: int = DEFAULT_MAX_NUMEL) -> Tensor:
    """Decode any payload produced by a codec of this module (the codec id is in the header)."""
    return _decode_frame(_unframe(data, max_numel))


def payload_codec(data: bytes | bytearray | memoryview) -> str:
    """Name of the codec a payload was encoded with (validates the whole frame)."""
    return _unframe(data, DEFAULT_MAX_NUMEL).codec


def get_codec(name: str, **params: Any) -> Codec:
    """Build codec ``name`` (one of :data:`CODECS`) with its constructor ``params``."""
    cls = _CODEC_CLASSES.get(name)
    if cls is None:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(CODECS)}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise CodecError(f"codec {name!r}: bad parameters {params}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# error feedback


@dataclass(frozen=True)
class EncodedUpdate:
    """What one peer sends in one round: ``payload`` bytes and what receivers will decode."""

    payload: bytes
    transmitted: Tensor


class ErrorFeedback:
    """Per-peer error feedback (Seide et al. 2014; Karimireddy et al. 2019) around a codec.

    Each round sends ``C(x + e)`` and keeps ``e <- x + e - decode(C(x + e))``. Hence
    ``sum_t transmitted_t = sum_t x_t - e_T``: the running sum of what was sent tracks the
    running sum of the inputs up to the bounded residual ``e_T``. One instance per peer and
    per tensor; it also holds the codec's own state (PowerSGD warm start, random-k step).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: Tensor | None = None
        self.state: State = {}

    def encode(self, x: Tensor) -> EncodedUpdate:
        if self.residual is not None and self.residual.shape != x.shape:
            raise CodecError(
                f"error feedback: input shape {tuple(x.shape)} differs from the residual "
                f"shape {tuple(self.residual.shape)}"
            )
        compensated = x.detach().clone() if self.residual is None else x.detach() + self.residual
        payload = self.codec.encode(compensated, self.state)
        transmitted = decode(payload)
        self.residual = compensated - transmitted
        return EncodedUpdate(payload, transmitted)

    def reset(self) -> None:
        self.residual = None
        self.state = {}
