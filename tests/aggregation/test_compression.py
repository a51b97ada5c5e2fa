"""Codecs: documented error bounds, error feedback, and refusal of corrupt or foreign bytes."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.aggregation import (
    CODECS,
    CodecError,
    CorruptPayloadError,
    ErrorFeedback,
    ForeignPayloadError,
    decode,
    get_codec,
)
from swarmlm.aggregation.compression import MAGIC, PowerSGDCodec, payload_codec

vectors = st.builds(
    lambda n, seed, scale: scale * torch.randn(n, generator=torch.Generator().manual_seed(seed)),
    st.integers(1, 3000),
    st.integers(0, 2**16),
    st.sampled_from([1e-6, 1e-2, 1.0, 3e2, 1e4]),
)


@settings(max_examples=40, deadline=None)
@given(x=vectors)
def test_float_codecs_round_trip_within_their_precision(x: torch.Tensor) -> None:
    torch.testing.assert_close(decode(get_codec("none").encode(x)), x, rtol=0, atol=0)
    y16 = decode(get_codec("fp16").encode(x))
    assert bool(((y16 - x).abs() <= torch.clamp(x.abs() * 2**-11, min=2**-25)).all())
    ybf = decode(get_codec("bf16").encode(x))
    assert bool(((ybf - x).abs() <= torch.clamp(x.abs() * 2**-8, min=2**-134)).all())


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-x.numel()) % block
    blocks = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, block)
    return blocks.amax(dim=1).repeat_interleave(block)[: x.numel()]


@settings(max_examples=40, deadline=None)
@given(x=vectors, block=st.sampled_from([1, 7, 64, 256]))
def test_block_quantisers_stay_within_absmax_over_levels(x: torch.Tensor, block: int) -> None:
    bound = _block_absmax(x, block)
    y8 = decode(get_codec("int8", block_size=block).encode(x))
    assert bool(((y8 - x).abs() <= bound / 254 * (1 + 1e-5) + 1e-30).all())
    y4 = decode(get_codec("int4", block_size=block).encode(x))
    assert bool(((y4 - x).abs() <= bound / 14 * (1 + 1e-5) + 1e-30).all())


@settings(max_examples=40, deadline=None)
@given(x=vectors, fraction=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]))
def test_sparse_codecs_keep_exactly_k_values_and_drop_only_smaller_ones(
    x: torch.Tensor, fraction: float
) -> None:
    k = min(x.numel(), max(1, math.ceil(fraction * x.numel())))
    y = decode(get_codec("topk", fraction=fraction).encode(x))
    kept = y != 0
    assert int(kept.sum()) <= k
    torch.testing.assert_close(y[kept], x[kept], rtol=0, atol=0)
    threshold = x.abs().topk(k).values.min()
    assert bool((x[~kept].abs() <= threshold).all())

    yq = decode(get_codec("topk_int8", fraction=fraction, block_size=32).encode(x))
    # Same coordinates as top-k; kept values within the int8 bound of their block.
    assert bool(((yq - x).abs()[~kept] <= threshold).all())
    assert float((yq - y).abs().max()) <= float(x.abs().max()) / 254 * (1 + 1e-5) + 1e-30

    yr = decode(get_codec("randk", fraction=fraction, seed=3).encode(x))
    nz = yr != 0
    torch.testing.assert_close(yr[nz], x[nz], rtol=0, atol=0)
    assert int(nz.sum()) <= k


def test_top1_percent_int8_with_delta_indices_is_over_100x_smaller_than_float32() -> None:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    dense = len(get_codec("none").encode(x))
    sparse = len(get_codec("topk_int8", fraction=0.01).encode(x))
    assert dense / sparse > 100


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(2, 40),
    cols=st.integers(2, 40),
    rank=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_powersgd_is_exact_on_low_rank_matrices_and_never_worse_than_zero(
    rows: int, cols: int, rank: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    r = min(rank, rows, cols)
    low = torch.randn(rows, r, generator=gen) @ torch.randn(r, cols, generator=gen)
    y = decode(PowerSGDCodec(rank=rank).encode(low))
    assert y.shape == low.shape
    torch.testing.assert_close(y, low, rtol=1e-3, atol=1e-3 * float(low.abs().max()))
    full = torch.randn(rows, cols, generator=gen)
    err = decode(PowerSGDCodec(rank=1).encode(full)) - full
    assert float(err.norm()) <= float(full.norm()) * (1 + 1e-5)


def test_powersgd_warm_start_improves_a_repeated_matrix() -> None:
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(64, 48, generator=gen)
    codec, state = PowerSGDCodec(rank=2), {}
    errors = [float((decode(codec.encode(m, state)) - m).norm()) for _ in range(6)]
    assert errors[-1] < errors[0]


def _residual_bound(q: float, max_norm: float) -> float:
    # |e_{t+1}| <= sqrt(1 - q) |e_t + x_t|  =>  |e_t| <= sqrt(1-q) / (1 - sqrt(1-q)) max|x|.
    c = math.sqrt(1 - q)
    return c / (1 - c) * max_norm


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(10, 400),
    rounds=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(["topk", "topk_int8", "topk_sign", "int4", "powersgd"]),
)
def test_error_feedback_running_sum_tracks_the_running_sum_of_inputs(
    d: int, rounds: int, seed: int, name: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = {"fraction": 0.1} if name.startswith("topk") else {}
    ef = ErrorFeedback(get_codec(name, **params))
    sent = torch.zeros(d)
    inputs = torch.zeros(d)
    max_norm = 0.0
    for _ in range(rounds):
        x = 1.0 + torch.randn(d, generator=gen)
        max_norm = max(max_norm, float(x.norm()))
        update = ef.encode(x)
        torch.testing.assert_close(decode(update.payload), update.transmitted)
        sent += update.transmitted
        inputs += x
        assert ef.residual is not None
        # Exact identity: what was sent plus what is held back is what came in.
        torch.testing.assert_close(sent + ef.residual, inputs, rtol=1e-4, atol=1e-3)
    if name == "topk":
        assert float((inputs - sent).norm()) <= _residual_bound(0.1, max_norm) * (1 + 1e-4)


@pytest.mark.parametrize(
    ("name", "fraction", "rounds"), [("topk_int8", 0.01, 400), ("topk_sign", 0.05, 200)]
)
def test_error_feedback_relative_gap_shrinks_with_rounds(
    name: str, fraction: float, rounds: int
) -> None:
    gen = torch.Generator().manual_seed(2)
    ef = ErrorFeedback(get_codec(name, fraction=fraction))
    sent, inputs, gaps = torch.zeros(5000), torch.zeros(5000), []
    for t in range(1, rounds + 1):
        x = 0.5 + torch.randn(5000, generator=gen)
        sent += ef.encode(x).transmitted
        inputs += x
        if t in (10, rounds):
            gaps.append(float((inputs - sent).norm() / inputs.norm()))
    assert gaps[1] < gaps[0] / 5


@pytest.mark.parametrize("name", CODECS)
def test_every_codec_round_trips_shape_and_names_itself(name: str) -> None:
    x = torch.randn(3, 5, 7)
    payload = get_codec(name).encode(x)
    assert payload[:4] == MAGIC
    assert payload_codec(payload) == name
    assert decode(payload).shape == x.shape
    assert get_codec(name).decode(payload).shape == x.shape


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(CODECS),
    position=st.integers(0, 10**9),
    flip=st.integers(1, 255),
)
def test_any_flipped_byte_is_refused(name: str, position: int, flip: int) -> None:
    payload = bytearray(get_codec(name).encode(torch.randn(200)))
    payload[position % len(payload)] ^= flip
    with pytest.raises((CorruptPayloadError, ForeignPayloadError)):
        decode(bytes(payload))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(CODECS), cut=st.integers(0, 10**9))
def test_truncated_payloads_are_refused(name: str, cut: int) -> None:
    payload = get_codec(name).encode(torch.randn(100))
    with pytest.raises((CorruptPayloadError, ForeignPayloadError)):
        decode(payload[: cut % len(payload)])


def test_foreign_and_future_payloads_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ForeignPayloadError, match="not a swarmlm"):
        decode(b'{"grad": [1, 2, 3]} and some more bytes to pass the size')
    with pytest.raises(ForeignPayloadError, match="not a swarmlm"):
        decode(b"")
    payload = bytearray(get_codec("int8").encode(torch.randn(10)))
    payload[4] = 2  # a format version from the future
    body = bytes(payload[:-4])
    with pytest.raises(ForeignPayloadError, match="version 2"):
        decode(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(CodecError, match=r"encoded with codec 'int8'.*'topk'"):
        get_codec("topk").decode(get_codec("int8").encode(torch.randn(10)))


def _reframe(payload: bytes, body_edit: bytes, offset: int) -> bytes:
    """Overwrite payload bytes and recompute the checksum: crafted, not damaged, input."""
    data = bytearray(payload[:-4])
    data[offset : offset + len(body_edit)] = body_edit
    return bytes(data) + struct.pack("<I", zlib.crc32(bytes(data)))


def test_crafted_payloads_with_valid_checksums_are_still_validated() -> None:
    x = torch.randn(100)
    header = 16 + 8  # fixed header plus one dimension
    # A huge claimed shape is refused before any allocation.
    bomb = _reframe(get_codec("topk").encode(x), struct.pack("<Q", 1 << 40), 16)
    with pytest.raises(CorruptPayloadError, match="above the limit"):
        decode(bomb)
    # k larger than the tensor.
    with pytest.raises(CorruptPayloadError, match="k="):
        decode(_reframe(get_codec("topk").encode(x), struct.pack("<Q", 101), header))
    # A first index beyond the tensor.
    with pytest.raises(CorruptPayloadError, match="out of range"):
        decode(_reframe(get_codec("topk").encode(x), struct.pack("<Q", 500), header + 9))
    # A NaN scale in an int8 payload.
    nan = struct.pack("<f", float("nan"))
    with pytest.raises(CorruptPayloadError, match="scales"):
        decode(_reframe(get_codec("int8").encode(x), nan, header + 4))
    with pytest.raises(CorruptPayloadError, match="values"):
        decode(_reframe(get_codec("none").encode(x), nan, header))


def test_encoders_refuse_non_finite_or_out_of_range_inputs() -> None:
    with pytest.raises(CodecError, match="NaN"):
        get_codec("int8").encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CodecError, match="fp16 range"):
        get_codec("fp16").encode(torch.tensor([1e6]))
    with pytest.raises(CodecError, match="float32"):
        get_codec("int8").encode(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(CodecError, match="unknown codec 'gzip'"):
        get_codec("gzip")
    with pytest.raises(CodecError, match="fraction"):
        get_codec("topk", fraction=0.0)
    with pytest.raises(CodecError, match="block_size"):
        get_codec("int8", block_size=0)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(CODECS),
    edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=4),
    n=st.sampled_from([1, 5, 64, 300]),
)
def test_crafted_payloads_decode_to_finite_values_or_raise_codec_errors_only(
    name: str, edits: list[tuple[int, int]], n: int
) -> None:
    _assert_edited_payload_is_refused_or_finite(get_codec(name).encode(torch.randn(n)), edits)


def _assert_edited_payload_is_refused_or_finite(
    encoded: bytes, edits: list[tuple[int, int]]
) -> None:
    """Overwrite bytes after the magic, fix the CRC (so the edit reaches the decoder), and
    require a codec error or finite values: never another exception, never NaN/inf."""
    payload = bytearray(encoded[:-4])
    for pos, value in edits:
        payload[4 + pos % (len(payload) - 4)] = value
    data = bytes(payload) + struct.pack("<I", zlib.crc32(bytes(payload)))
    try:
        out = decode(data, max_numel=100_000)
    except CodecError:
        return
    assert bool(torch.isfinite(out).all())


def _frame_body(codec_id: int, shape: tuple[int, ...], body: bytes, flags: int = 0) -> bytes:
    """A well-formed frame around a hand-made body (valid checksum)."""
    head = struct.pack("<4sBBBBQ", MAGIC, 1, codec_id, len(shape), flags, len(body))
    data = head + struct.pack(f"<{len(shape)}Q", *shape) + body
    return data + struct.pack("<I", zlib.crc32(data))


def _zstd_frame_claiming(size: int) -> bytes:
    """A tiny, valid zstd frame whose header claims ``size`` decompressed bytes (one raw
    1-byte block): decompressors that trust the header allocate ``size`` up front."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", size) + b"\x09\x00\x00\x01"


def test_a_zstd_section_claiming_a_huge_size_is_refused_before_allocating() -> None:
    # top-k body: k, value kind (float32), index header (first, width, zstd flag, length),
    # the index bytes, then k float32 values. k = 10 needs 9 one-byte deltas; the frame
    # claims a terabyte. Before the fix the receiver raised MemoryError (a crash), not a
    # CodecError.
    section = _zstd_frame_claiming(1 << 40)
    body = (
        struct.pack("<QB", 10, 0)
        + struct.pack("<QBBQ", 0, 1, 1, len(section))
        + section
        + struct.pack("<10f", *range(10))
    )
    with pytest.raises(CorruptPayloadError, match="indices"):
        decode(_frame_body(5, (100,), body))


def test_int8_with_zstd_decodes_to_the_same_values_in_fewer_bytes() -> None:
    # A pseudo-gradient-like vector: most values small against each block's extremes.
    gen = torch.Generator().manual_seed(4)
    x = torch.distributions.Laplace(0.0, 0.01).sample((100_000,)) * (
        1 + torch.rand(100_000, generator=gen)
    )
    plain = get_codec("int8", block_size=1024).encode(x)
    packed = get_codec("int8", block_size=1024, zstd=True).encode(x)
    assert payload_codec(packed) == "int8"
    torch.testing.assert_close(decode(packed), decode(plain), rtol=0, atol=0)
    assert len(packed) < 0.95 * len(plain)
    # Incompressible bodies are sent as they are (no flag, no growth).
    tiny = torch.randn(3)
    assert get_codec("int8", zstd=True).encode(tiny) == get_codec("int8").encode(tiny)


def test_a_compressed_body_must_state_a_plausible_size() -> None:
    int8 = 3
    with pytest.raises(CorruptPayloadError, match="claims"):
        decode(_frame_body(int8, (100,), _zstd_frame_claiming(1 << 40), flags=1))
    with pytest.raises(CorruptPayloadError, match="not a zstd frame"):
        decode(_frame_body(int8, (100,), b"definitely not zstd", flags=1))
    import zstandard

    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 200)
    with pytest.raises(CorruptPayloadError, match="does not state its size"):
        decode(_frame_body(int8, (100,), unsized, flags=1))
    with pytest.raises(CorruptPayloadError, match="flags=2"):
        decode(_frame_body(int8, (100,), b"\0" * 8, flags=2))


@settings(max_examples=100, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_crafted_zstd_int8_payloads_decode_to_finite_values_or_raise_codec_errors(
    edits: list[tuple[int, int]],
) -> None:
    x = torch.randn(2000, generator=torch.Generator().manual_seed(5)).pow(3)
    encoded = get_codec("int8", block_size=1024, zstd=True).encode(x)
    assert encoded[7] == 1  # the body is compressed
    _assert_edited_payload_is_refused_or_finite(encoded, edits)
