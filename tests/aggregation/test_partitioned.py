"""Partitioned robust aggregation rules (issue 19): plans, per-part aggregation, claims,
verifier choice and the judgement of accusations."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.aggregation import get_aggregator
from swarmlm.aggregation.errors import AggregationError
from swarmlm.aggregation.partitioned import (
    Accusation,
    PartPlan,
    Verdict,
    aggregate_part,
    bytes_per_peer,
    decode_part,
    encode_part,
    judge,
    make_claim,
    part_digests,
    plan_parts,
    verifications_needed,
    verifiers,
)

PEERS = [f"peer{i:02d}" for i in range(10)]


@settings(max_examples=200, deadline=None)
@given(
    dim=st.integers(1, 5000),
    n=st.integers(1, 10),
    parts=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.binary(min_size=1, max_size=8),
)
def test_a_plan_covers_every_coordinate_once_in_near_equal_parts(
    dim: int, n: int, parts: int | None, seed: bytes
) -> None:
    k = n if parts is None else parts
    if k > dim:
        with pytest.raises(AggregationError, match="parts must be"):
            plan_parts(1, dim, PEERS[:n], seed, parts)
        return
    plan = plan_parts(1, dim, PEERS[:n], seed, parts)
    assert len(plan) == k
    assert plan.bounds[0][0] == 0
    assert plan.bounds[-1][1] == dim
    assert all(a[1] == b[0] for a, b in zip(plan.bounds, plan.bounds[1:], strict=False))
    sizes = [b - a for a, b in plan.bounds]
    assert max(sizes) - min(sizes) <= 1
    # every contributor aggregates ceil or floor of k / n parts
    counts = [len(plan.parts_of(p)) for p in PEERS[:n]]
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == k
    # the order of the contributor list does not matter, the seed does
    assert plan_parts(1, dim, list(reversed(PEERS[:n])), seed, parts) == plan


def test_the_seed_chooses_the_aggregators_unpredictably() -> None:
    firsts = {plan_parts(1, 100, PEERS, bytes([s]), 10).aggregators[0] for s in range(64)}
    assert len(firsts) >= 8  # 64 seeds spread the first part over (almost) every peer


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_a_coordinatewise_rule_per_part_is_exactly_the_rule_on_the_whole(rule: str) -> None:
    g = torch.Generator().manual_seed(0)
    updates = {p: torch.randn(1003, generator=g) for p in PEERS[:7]}
    f = 0 if rule == "mean" else 2
    plan = plan_parts(3, 1003, list(updates), b"seed", 7)
    parts = [
        aggregate_part({p: u[a:b] for p, u in updates.items()}, rule, f) for a, b in plan.bounds
    ]
    whole = get_aggregator(rule, f=f)(torch.stack([updates[p] for p in sorted(updates)]))
    if rule == "mean":  # summation order differs with the vector length: last-bit rounding
        assert torch.allclose(plan.join(parts), whole, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(plan.join(parts), whole)


def test_centered_clipping_per_part_keeps_f_attackers_out_of_every_part() -> None:
    g = torch.Generator().manual_seed(1)
    honest = {p: 0.01 * torch.randn(400, generator=g) + 1.0 for p in PEERS[:7]}
    attack = {p: torch.full((400,), -1000.0) for p in PEERS[7:9]}
    plan = plan_parts(1, 400, PEERS[:9], b"s", 9)
    center = torch.ones(400)
    out = plan.join(
        [
            aggregate_part(
                {p: u[a:b] for p, u in {**honest, **attack}.items()},
                "centered_clip",
                2,
                center=center[a:b],
            )
            for a, b in plan.bounds
        ]
    )
    assert float((out - 1.0).abs().max()) < 0.05  # the attackers moved no part far


def test_parts_travel_as_float32_bytes_and_bad_parts_are_refused() -> None:
    t = torch.tensor([1.5, -2.0, 3.25])
    assert torch.equal(decode_part(encode_part(t), 3), t)
    with pytest.raises(AggregationError, match="expected 12"):
        decode_part(encode_part(t)[:-1], 3)
    with pytest.raises(AggregationError, match="NaN"):
        decode_part(encode_part(torch.tensor([1.0, float("nan"), 0.0])), 3)
    with pytest.raises(AggregationError, match="float32"):
        encode_part(t.double())
    with pytest.raises(AggregationError, match="cannot be applied per part"):
        aggregate_part({"a": t}, "krum", 0)


def test_verifiers_never_include_the_aggregator_and_depend_on_the_seed() -> None:
    chosen = verifiers(b"x", PEERS, 3, PEERS[0], 4)
    assert len(chosen) == 4 == len(set(chosen))
    assert PEERS[0] not in chosen
    assert verifiers(b"x", PEERS, 3, PEERS[0], 4) == chosen
    assert any(verifiers(bytes([s]), PEERS, 3, PEERS[0], 4) != chosen for s in range(8))


def test_enough_verifiers_that_f_silent_ones_cannot_cover_a_lie() -> None:
    assert verifications_needed(4, 1) == 2  # one Byzantine among 3 candidates: pick 2
    assert verifications_needed(100, 33, 1e-6) <= 34
    m = verifications_needed(1000, 333, 1e-6)
    assert m < 20  # independent of n in practice: the cost of catching a liar stays small


# -- accusations -----------------------------------------------------------------------------
def _round(rule: str = "median", f: int = 1) -> tuple[PartPlan, dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(2)
    updates = {p: torch.randn(40, generator=g) for p in PEERS[:4]}
    plan = plan_parts(5, 40, list(updates), hashlib.sha256(b"cert of round 4").digest(), 4)
    committed = {p: part_digests(u, plan) for p, u in updates.items()}
    return plan, updates, committed


def _evidence(plan: PartPlan, updates: dict[str, torch.Tensor], i: int) -> dict[str, bytes]:
    a, b = plan.bounds[i]
    return {p: encode_part(u[a:b]) for p, u in updates.items()}


def _claimed(plan: PartPlan, updates: dict[str, torch.Tensor], i: int, lie: float = 0.0):
    a, b = plan.bounds[i]
    inputs = {p: u[a:b] for p, u in updates.items()}
    out = aggregate_part(inputs, "median", 1) + lie
    return make_claim(plan, i, inputs, out), encode_part(out)


def test_an_accusation_against_an_honest_aggregator_fails_and_costs_the_accuser() -> None:
    plan, updates, committed = _round()
    claim, out = _claimed(plan, updates, 2)
    acc = Accusation(claim, out, _evidence(plan, updates, 2))
    assert judge(acc, plan, committed, "median", 1) is Verdict.FALSE_ACCUSATION


def test_a_lying_aggregator_is_convicted_by_anyone_from_the_commitments() -> None:
    plan, updates, committed = _round()
    claim, out = _claimed(plan, updates, 2, lie=0.5)
    acc = Accusation(claim, out, _evidence(plan, updates, 2))
    assert judge(acc, plan, committed, "median", 1) is Verdict.AGGREGATOR_LIED


def test_an_aggregator_that_leaves_a_contributor_out_is_convicted() -> None:
    plan, updates, committed = _round()
    a, b = plan.bounds[1]
    inputs = {p: u[a:b] for p, u in updates.items() if p != PEERS[3]}
    out = aggregate_part(inputs, "median", 1)
    acc = Accusation(
        make_claim(plan, 1, inputs, out), encode_part(out), _evidence(plan, updates, 1)
    )
    assert judge(acc, plan, committed, "median", 1) is Verdict.AGGREGATOR_LIED


def test_forged_evidence_or_a_claim_of_another_part_is_invalid() -> None:
    plan, updates, committed = _round()
    claim, out = _claimed(plan, updates, 0, lie=0.5)
    forged = _evidence(plan, updates, 0)
    forged[PEERS[1]] = encode_part(torch.zeros(plan.bounds[0][1] - plan.bounds[0][0]))
    assert judge(Accusation(claim, out, forged), plan, committed, "median", 1) is Verdict.INVALID
    # an output other than the signed one
    other = encode_part(torch.ones(plan.bounds[0][1]))
    evidence = _evidence(plan, updates, 0)
    assert judge(Accusation(claim, other, evidence), plan, committed, "median", 1) is (
        Verdict.INVALID
    )
    # evidence missing a contributor
    partial = dict(evidence)
    del partial[PEERS[0]]
    assert judge(Accusation(claim, out, partial), plan, committed, "median", 1) is Verdict.INVALID


def test_bytes_per_peer_are_about_two_payloads_whatever_n() -> None:
    for n in (4, 32, 1000):
        b = bytes_per_peer(n, 1_000_000)
        assert b["partitioned_sent"] <= 2 * 1_000_000
        assert b["partitioned_received"] <= 2 * 1_000_000
        assert b["all_to_all_sent"] == (n - 1) * 1_000_000
