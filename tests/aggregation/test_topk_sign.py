"""The scaled-sign top-k codec: which coordinates it keeps, what values, how many bytes."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.aggregation import CorruptPayloadError, decode, get_codec

vectors = st.builds(
    lambda n, seed, scale: scale * torch.randn(n, generator=torch.Generator().manual_seed(seed)),
    st.integers(1, 3000),
    st.integers(0, 2**16),
    st.sampled_from([1e-6, 1.0, 1e4]),
)


@settings(max_examples=40, deadline=None)
@given(
    x=vectors, fraction=st.sampled_from([0.001, 0.1, 0.5, 1.0]), block=st.sampled_from([1, 7, 256])
)
def test_keeps_the_top_k_coordinates_with_their_signs_and_each_blocks_l1_norm(
    x: torch.Tensor, fraction: float, block: int
) -> None:
    k = min(x.numel(), max(1, math.ceil(fraction * x.numel())))
    y = decode(get_codec("topk_sign", fraction=fraction, block_size=block).encode(x))
    exact = decode(get_codec("topk", fraction=fraction).encode(x))
    kept = exact != 0
    # The same coordinates as plain top-k, each with its own sign ...
    assert bool((y[~kept] == 0).all())
    assert bool((torch.sign(y[kept]) == torch.sign(x[kept])).all())
    # ... and, per block of kept values (in index order), one magnitude: their mean, so the
    # block keeps its L1 norm and no value is off by more than the block's largest.
    xs, ys = x[kept], y[kept]
    assert xs.numel() <= k
    for start in range(0, xs.numel(), block):
        xb, yb = xs[start : start + block], ys[start : start + block]
        mean = float(xb.abs().mean())
        torch.testing.assert_close(yb.abs(), torch.full_like(yb, mean), rtol=1e-5, atol=0)
        assert float((yb - xb).abs().max()) <= float(xb.abs().max()) * (1 + 1e-5)


def test_twice_the_coordinates_of_topk_int8_in_fewer_bytes() -> None:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    int8 = len(get_codec("topk_int8", fraction=0.1).encode(x))
    sign = len(get_codec("topk_sign", fraction=0.2).encode(x))
    assert sign < int8
    assert len(get_codec("none").encode(x)) / sign > 25


def _reseal(payload: bytes, body_edit: int, value: int) -> bytes:
    """Set the byte at ``body_edit`` (from the end of the body) and fix the checksum."""
    raw = bytearray(payload[:-4])
    raw[len(raw) + body_edit] = value
    return bytes(raw) + struct.pack("<I", zlib.crc32(bytes(raw)))


def test_sign_bits_past_the_values_are_refused() -> None:
    # 3 kept values: their signs use 3 bits of the last byte; the other 5 must be zero.
    x = torch.tensor([5.0, -4.0, 3.0, 0.1, 0.2, -0.1, 0.0, 0.05])
    payload = get_codec("topk_sign", fraction=3 / 8, zstd=False).encode(x)
    y = decode(payload)
    assert y.tolist() == pytest.approx([4.0, -4.0, 4.0, 0, 0, 0, 0, 0])
    with pytest.raises(CorruptPayloadError, match="sign bits set past"):
        decode(_reseal(payload, -1, payload[-5] | 0x01))


def test_negative_scales_are_refused() -> None:
    x = torch.tensor([5.0, -4.0, 3.0, 0.1])
    payload = get_codec("topk_sign", fraction=0.75, zstd=False).encode(x)
    # Body tail: scale (f32) then one byte of signs.
    raw = bytearray(payload[:-4])
    raw[-5:-1] = struct.pack("<f", -1.0)
    sealed = bytes(raw) + struct.pack("<I", zlib.crc32(bytes(raw)))
    with pytest.raises(CorruptPayloadError, match="negative"):
        decode(sealed)
