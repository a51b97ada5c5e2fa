"""Partitioned aggregation in the swarm (issue 19), the parts without a network: part
commitments walked as content-addressed Merkle blobs, the partitioned contribution header,
per-part error feedback, accusations judged from public facts, and the apply step."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm import merkle
from swarmlm.aggregation import decode
from swarmlm.aggregation.partitioned import plan_parts
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.messages import MessageSigner
from swarmlm.swarm.config import SwarmConfig
from swarmlm.swarm.contribution import decode_part_header, encode_part_header
from swarmlm.swarm.engine import RoundEngine
from swarmlm.swarm.errors import ContributionError, SwarmError
from swarmlm.swarm.params import ParamLayout
from swarmlm.swarm.partitioned import (
    CLAIM_KIND,
    Accusation,
    PartEncoder,
    PartInput,
    RoundInputs,
    Verdict,
    apply_aggregate,
    bounds_of,
    candidates,
    claim_body,
    decode_accusations,
    encode_accusations,
    judge_accusation,
    recompute,
    tree_blobs,
    walk_to_part,
)
from swarmlm.train.config import OptimConfig

D = 40


def _walk(root: bytes, index: int, k: int, blobs: dict[bytes, bytes]) -> PartInput:
    async def fetch(digest: bytes, _: list[str]) -> bytes:
        if digest not in blobs:
            raise SwarmError("missing")
        return blobs[digest]

    return asyncio.run(walk_to_part(root, index, k, fetch))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 13])
def test_every_part_is_reached_from_the_signed_root_and_proves_its_place(k: int) -> None:
    chunks = [f"part {i}".encode() * (i + 1) for i in range(k)]
    root, blobs = tree_blobs(chunks)
    assert root == merkle.merkle_root([hashlib.sha256(c).digest() for c in chunks])
    for i in range(k):
        got = _walk(root, i, k, blobs)
        assert got.chunk == chunks[i]
        got.check(root, i, k)  # the walk's path is the RFC 6962 audit path
        assert len(got.siblings) == merkle.proof_length(i, k)


def test_a_part_under_another_index_or_root_does_not_prove() -> None:
    chunks = [bytes([i]) * 9 for i in range(6)]
    root, blobs = tree_blobs(chunks)
    got = _walk(root, 2, 6, blobs)
    with pytest.raises(merkle.MerkleError):
        got.check(root, 3, 6)
    other, _ = tree_blobs([b"x"] * 6)
    with pytest.raises(merkle.MerkleError):
        got.check(other, 2, 6)
    # a tree node swapped for a leaf blob (wrong shape) is refused, not misread
    assert len(blobs[root]) == 65
    bad = dict(blobs)
    bad[root] = blobs[next(h for h, b in blobs.items() if len(b) == 33)]
    with pytest.raises(SwarmError, match="not an inner node"):
        _walk(root, 0, 6, bad)


def test_the_header_round_trips_and_its_size_does_not_grow_with_parts() -> None:
    state, base, root = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    small = encode_part_header(3, state, 64, 4, root, base, 1.25, b"acc")
    big = encode_part_header(3, state, 64, 1000, root, base, 1.25, b"acc")
    assert len(big) - len(small) == 3  # "4" -> "1000": the root stands for every part
    h = decode_part_header("p", small)
    assert (h.round, h.state_digest, h.base_digest, h.samples) == (3, state, base, 64)
    assert (h.parts, h.root, h.attachment, h.seconds) == (4, root, b"acc", 1.25)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_as_a_header_naming_the_peer(data: bytes) -> None:
    with pytest.raises(ContributionError) as caught:
        decode_part_header("peer-x", data)
    assert caught.value.peer == "peer-x"


def test_a_header_with_a_corrupt_field_names_it() -> None:
    ok = encode_part_header(1, b"\x01" * 32, 1, 4, b"\x03" * 32)
    with pytest.raises(ContributionError, match="'parts'"):
        decode_part_header("p", ok.replace(b'"parts":4', b'"parts":0'))
    with pytest.raises(ContributionError, match="attachment"):
        decode_part_header("p", ok + b"trailing")


def test_per_part_error_feedback_sends_what_the_codec_dropped_later() -> None:
    cfg = SwarmConfig(codec="int8")
    enc = PartEncoder(cfg)
    torch.manual_seed(0)
    bounds = bounds_of(1000, 7)
    total_in = torch.zeros(1000)
    total_sent = torch.zeros(1000)
    for _ in range(5):
        u = torch.randn(1000)
        chunks = enc.encode(u, bounds)
        sent = torch.cat([decode(c).reshape(-1) for c in chunks])
        total_in += u
        total_sent += sent
    assert enc.residual is not None
    assert torch.allclose(total_sent + enc.residual, total_in, atol=1e-4)


def _setup(
    rule: str = "centered_clip",
) -> tuple[SwarmConfig, RoundInputs, dict[str, list[bytes]], list[NodeIdentity]]:
    cfg = SwarmConfig(aggregator=rule, aggregation_layout="partitioned")
    ids = [NodeIdentity.generate() for _ in range(4)]
    peers = sorted(i.node_id for i in ids)
    torch.manual_seed(1)
    k = 4
    enc_chunks: dict[str, list[bytes]] = {}
    headers = {}
    for p in peers:
        chunks = PartEncoder(cfg).encode(torch.randn(D), bounds_of(D, k))
        root, _ = tree_blobs(chunks)
        enc_chunks[p] = chunks
        headers[p] = decode_part_header(p, encode_part_header(1, b"\x00" * 32, 8, k, root))
    plan = plan_parts(1, D, peers, b"seed", parts=k)
    inputs = RoundInputs(1, headers, plan, {}, [], [], set(peers), peers)
    return cfg, inputs, enc_chunks, ids


def _accusation(
    cfg: SwarmConfig,
    inputs: RoundInputs,
    chunks: dict[str, list[bytes]],
    ids: list[NodeIdentity],
    part: int,
    lie: float = 0.0,
) -> Accusation:
    agg_id = next(i for i in ids if i.node_id == inputs.plan.aggregators[part])
    out = recompute(cfg, inputs.plan, part, {p: c[part] for p, c in chunks.items()}, None)
    if lie:
        from swarmlm.aggregation import get_codec

        out = get_codec("int8").encode(decode(out).reshape(-1) + lie)
    msg = MessageSigner(agg_id).sign(
        CLAIM_KIND, claim_body(part, [], hashlib.sha256(out).digest()), 1
    )
    evidence = {}
    for p, c in chunks.items():
        root, blobs = tree_blobs(c)
        evidence[p] = _walk(root, part, len(c), blobs)
    return Accusation(msg.to_wire(), out, evidence)


def test_an_honest_claim_makes_the_accusation_false_and_a_lie_is_proven_and_fixed() -> None:
    cfg, inputs, chunks, ids = _setup()
    honest = _accusation(cfg, inputs, chunks, ids, 2)
    verdict, accused, part, fixed = judge_accusation(honest, inputs, cfg, None)
    assert (verdict, accused, part, fixed) == (
        Verdict.FALSE,
        inputs.plan.aggregators[2],
        2,
        None,
    )
    lie = _accusation(cfg, inputs, chunks, ids, 2, lie=0.5)
    verdict, accused, part, fixed = judge_accusation(lie, inputs, cfg, None)
    assert verdict == Verdict.LIED
    assert fixed == honest.output  # the part every peer uses instead: the same bytes


def test_evidence_that_contradicts_the_commitments_is_invalid() -> None:
    cfg, inputs, chunks, ids = _setup()
    acc = _accusation(cfg, inputs, chunks, ids, 1, lie=0.5)
    peer = sorted(acc.inputs)[0]
    forged = dict(acc.inputs)
    forged[peer] = PartInput(b"forged" + acc.inputs[peer].chunk, acc.inputs[peer].siblings)
    assert judge_accusation(Accusation(acc.claim, acc.output, forged), inputs, cfg, None)[0] == (
        Verdict.INVALID
    )
    short = {p: i for p, i in acc.inputs.items() if p != peer}  # an input left out
    assert judge_accusation(Accusation(acc.claim, acc.output, short), inputs, cfg, None)[0] == (
        Verdict.INVALID
    )
    other_output = Accusation(acc.claim, acc.output + b"x", acc.inputs)
    assert judge_accusation(other_output, inputs, cfg, None)[0] == Verdict.INVALID
    # a claim signed by someone who is not a candidate aggregator of that part
    stranger = NodeIdentity.generate()
    msg = MessageSigner(stranger).sign(
        CLAIM_KIND, claim_body(1, [], hashlib.sha256(acc.output).digest()), 1
    )
    fake = Accusation(msg.to_wire(), acc.output, acc.inputs)
    assert judge_accusation(fake, inputs, cfg, None)[0] == Verdict.INVALID
    # a tampered signature
    bad_sig = Accusation({"m": acc.claim["m"], "s": b"\x00" * 64}, acc.output, acc.inputs)
    assert judge_accusation(bad_sig, inputs, cfg, None)[0] == Verdict.INVALID


def test_accusations_round_trip_and_garbage_gives_none() -> None:
    cfg, inputs, chunks, ids = _setup()
    acc = _accusation(cfg, inputs, chunks, ids, 0, lie=1.0)
    back = decode_accusations(encode_accusations([acc]))
    assert back == [acc]
    for junk in (b"\x91", b"\x00\x01", b"\xc1", encode_accusations([acc])[:-3]):
        assert decode_accusations(junk) == []


def test_a_silent_aggregator_is_replaced_by_the_next_in_rank_the_same_everywhere() -> None:
    peers = [f"p{i}" for i in range(5)]
    plan = plan_parts(1, 50, peers, b"s", parts=5)
    for part in range(5):
        cands = candidates(plan, peers, part)
        assert cands[0] == plan.aggregators[part]
        assert sorted(cands) == sorted(peers)
        assert cands == candidates(plan, list(reversed(peers)), part)


def test_applying_the_joined_aggregate_is_deterministic_and_counts_absence() -> None:
    cfg = SwarmConfig(aggregation_layout="partitioned")
    model = torch.nn.Linear(5, 4)
    layout = ParamLayout.of(model)
    torch.manual_seed(0)
    params = torch.randn(layout.numel)
    agg = torch.randn(layout.numel)
    digests = []
    for _ in range(2):
        e = RoundEngine(cfg, layout, params, OptimConfig())
        rep = apply_aggregate(
            e,
            1,
            agg,
            accepted=["a", "b", "c"],
            invalid={"d": "bad"},
            members=["a", "b", "c", "d", "e"],
            present={"a", "b", "c", "d"},
            lr=0.0,
        )
        digests.append(e.state_digest())
        assert rep.absent == ["e"]
        assert e.reputation["d"] == 0.5
        assert e.center is not None
        assert torch.equal(e.center, agg)
        assert not torch.equal(e.params, params)
    assert digests[0] == digests[1]
    with pytest.raises(SwarmError, match="cannot follow"):
        apply_aggregate(e, 5, agg, accepted=[], invalid={}, members=[], present=set(), lr=0.0)


def test_the_layout_refuses_rules_that_need_whole_updates() -> None:
    with pytest.raises(ValueError, match="per-part rule"):
        SwarmConfig(aggregation_layout="partitioned", aggregator="krum")
    with pytest.raises(ValueError, match="overlap"):
        SwarmConfig(aggregation_layout="partitioned", overlap=True)
