"""Frames and blobs: round trips, size limits, and decoders that no input can crash."""

from __future__ import annotations

import asyncio
import contextlib
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.p2p.errors import WireError
from swarmlm.p2p.wire import (
    BLOB_HEAD,
    HEADER,
    WIRE_VERSION,
    BlobAssembler,
    BlobDone,
    FrameDecoder,
    FrameReader,
    blob_frames,
    decode_frame_body,
    digest_of,
    encode_blob_chunk,
    encode_frame,
    read_frame,
)


def test_frame_round_trips_through_the_stream_decoder() -> None:
    frames = [encode_frame({"t": "msg", "m": b"\x00" * 10}), encode_frame({"t": "ping"})]
    dec = FrameDecoder()
    out = []
    stream = b"".join(frames)
    for i in range(0, len(stream), 7):  # arbitrary fragmentation
        out += dec.feed(stream[i : i + 7])
    assert [f["t"] for f in out] == ["msg", "ping"]
    assert out[0]["m"] == b"\x00" * 10
    assert all(f["v"] == WIRE_VERSION for f in out)


def test_oversized_frame_is_refused_before_its_body_is_read() -> None:
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(WireError, match="over max_frame"):
        dec.feed(HEADER.pack(10**9))
    with pytest.raises(WireError, match="over max_frame"):
        encode_frame({"t": "x", "pad": b"0" * 2000}, max_frame=1000)


def test_frame_of_another_wire_version_is_refused() -> None:
    body = msgpack.packb({"v": WIRE_VERSION + 1, "t": "ping"})
    with pytest.raises(WireError, match="wire version"):
        decode_frame_body(body)


def test_read_frame_refuses_oversized_announcement_from_a_stream() -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(HEADER.pack(5_000_000))
        with pytest.raises(WireError, match="over max_frame"):
            await read_frame(reader, 4096, timeout=1.0)

    asyncio.run(go())


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300))
def test_frame_body_decoder_never_crashes_on_arbitrary_bytes(data: bytes) -> None:
    try:
        frame = decode_frame_body(data)
    except WireError:
        return
    assert isinstance(frame, dict)
    assert frame["v"] == WIRE_VERSION


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_stream_decoder_never_crashes_on_arbitrary_streams(chunks: list[bytes]) -> None:
    dec = FrameDecoder(max_frame=4096)
    try:
        for c in chunks:
            dec.feed(c)
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    obj=st.dictionaries(
        st.sampled_from(["v", "t", "d", "n", "o", "c"]),
        st.none() | st.integers(-5, 10**12) | st.binary(max_size=40) | st.text(max_size=5),
    )
)
def test_blob_assembler_never_crashes_on_arbitrary_frames(obj: dict[str, object]) -> None:
    asm = BlobAssembler(max_blob=1 << 20)
    with contextlib.suppress(WireError):
        asm.add(obj)
    assert asm.held_bytes <= 1 << 20


def _chunks(data: bytes, size: int) -> list[dict[str, object]]:
    d = digest_of(data)
    dec = FrameDecoder(max_frame=size + 2048)
    out: list[dict[str, object]] = []
    for start, end in blob_frames(d, data, size):
        out += dec.feed(encode_blob_chunk(d, len(data), start, data[start:end]))
    return out


def test_blob_reassembles_and_verifies_against_its_digest() -> None:
    data = bytes(range(256)) * 40 + b"tail"
    asm = BlobAssembler()
    results = [asm.add(f) for f in _chunks(data, 1000)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == (digest_of(data), data)
    assert asm.held_bytes == 0


def test_empty_blob_is_one_empty_chunk() -> None:
    frames = _chunks(b"", 1000)
    assert len(frames) == 1
    assert BlobAssembler().add(frames[0]) == (digest_of(b""), b"")


def test_corrupted_blob_is_rejected_by_its_hash() -> None:
    data = b"a" * 5000
    frames = _chunks(data, 1000)
    frames[2]["c"] = b"b" * 1000
    asm = BlobAssembler()
    for f in frames[:-1]:
        asm.add(f)
    with pytest.raises(WireError, match="hash check"):
        asm.add(frames[-1])
    assert asm.held_bytes == 0


def test_out_of_order_chunk_discards_the_blob() -> None:
    frames = _chunks(b"z" * 3000, 1000)
    asm = BlobAssembler()
    asm.add(frames[0])
    with pytest.raises(WireError, match="out of order"):
        asm.add(frames[2])
    assert asm.held_bytes == 0


def test_unannounced_blob_is_refused_at_its_first_chunk() -> None:
    frames = _chunks(b"q" * 3000, 1000)
    asm = BlobAssembler(accept=lambda d: False)
    with pytest.raises(WireError, match="not announced"):
        asm.add(frames[0])


def test_blob_budget_bounds_memory_held_for_unfinished_blobs() -> None:
    asm = BlobAssembler(max_blob=10_000, max_bytes=15_000)
    a = _chunks(b"a" * 10_000, 1000)
    b = _chunks(b"b" * 10_000, 1000)
    asm.add(a[0])
    with pytest.raises(WireError, match="budget"):
        asm.add(b[0])
    assert asm.held_bytes == 10_000


def test_rest_of_a_refused_blob_is_skipped_without_further_errors() -> None:
    frames = _chunks(b"r" * 3000, 1000)
    asm = BlobAssembler(accept=lambda d: False)
    with pytest.raises(WireError, match="not announced"):
        asm.add(frames[0])
    assert asm.add(frames[1]) is None
    assert asm.add(frames[2]) is None


@pytest.mark.parametrize("length", [0, 1, 255, 256, 65535, 65536, 300_000])
def test_blob_frame_decodes_to_the_same_fields_as_its_msgpack_form(length: int) -> None:
    d, chunk = b"d" * 32, b"x" * length
    whole = encode_blob_chunk(d, 10**9, 4096, chunk)
    ref = encode_frame({"t": "blob", "d": d, "n": 10**9, "o": 4096, "c": chunk}, 10**7)
    assert FrameDecoder(10**7).feed(whole) == FrameDecoder(10**7).feed(ref)


def _read_all(stream: bytes, asm: BlobAssembler) -> list[dict[str, object]]:
    async def go() -> list[dict[str, object]]:
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        reader.feed_eof()
        fr = FrameReader(reader, 4096, timeout=1.0)
        out: list[dict[str, object]] = []
        while True:
            try:
                out.append(await fr.next(asm))
            except (asyncio.IncompleteReadError, WireError):
                return out

    return asyncio.run(go())


def test_frame_reader_streams_blob_chunks_into_place_and_keeps_messages() -> None:
    data = os.urandom(5000)
    d = digest_of(data)
    stream = encode_frame({"t": "ping"})
    for start, end in blob_frames(d, data, 1000):
        stream += encode_blob_chunk(d, len(data), start, data[start:end])
    stream += encode_frame({"t": "msg", "m": b"x", "s": b"y"})
    frames = _read_all(stream, BlobAssembler())
    assert frames[0]["t"] == "ping"
    done = frames[5]["done"]
    assert isinstance(done, BlobDone)
    assert bytes(done.data) == data
    assert done.actual == d
    assert frames[6]["t"] == "msg"


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=80), max_size=6), blobby=st.booleans())
def test_frame_reader_never_crashes_on_arbitrary_streams(chunks: list[bytes], blobby: bool) -> None:
    stream = b"".join(
        HEADER.pack(len(c) + (BLOB_HEAD.size if blobby else 0)) + (b"\xb1" if blobby else b"") + c
        for c in chunks
    )
    asm = BlobAssembler(max_blob=1 << 16)
    frames = _read_all(stream, asm)
    assert all(isinstance(f, dict) for f in frames)
    assert asm.held_bytes <= 2 << 16
