"""Partitioned robust aggregation: the rules of issue 19's design, as pure functions.

All-to-all aggregation costs each peer ``(n - 1) x payload`` per round. Here the update
vector of dimension ``d`` is cut into contiguous parts, each with an *aggregator* among the
round's contributors; a contributor sends part ``i`` only to its aggregator, which aggregates
it robustly over every contributor the round's decision names and sends the result back:
about ``2 x payload`` per peer whatever ``n`` is (BTARD, Gorbunov et al. 2022, does the same
with centered clipping; a coordinate-wise rule gives exactly the global result).

What makes a lying aggregator catchable, and an honest one safe from false accusations:

* a contributor signs, inside its round contribution, the digest of each encoded part
  (:func:`part_digests`), so the inputs of part ``i`` are fixed by the decision before any
  aggregator sees them;
* the aggregator signs a :class:`PartClaim` (the round, the part, the input digests it used,
  the digest of its output) and sends the output with it;
* peers chosen *after* the claims (:func:`verifiers`, from a seed the next decision
  certifies) fetch the committed inputs, recompute (:func:`aggregate_part`) and compare
  (:func:`outputs_agree`); a mismatch is an :class:`Accusation` carrying the claim and the
  inputs, which anyone checks with :func:`judge` against the commitments alone. A claim
  whose recomputation agrees makes the accusation false: the accuser pays.

Wiring this into the swarm's rounds (who sends what, time-outs, replacing an aggregator that
is silent or voted out) is the swarm layer's job; nothing here touches a network or a disk.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from swarmlm.aggregation.errors import AggregationError
from swarmlm.aggregation.registry import AGGREGATORS

DIGEST = hashlib.sha256
#: Rules whose result on a part equals the part of their result on the whole vector.
COORDINATEWISE = frozenset({"mean", "median", "trimmed_mean"})
#: Rules usable per part: the coordinate-wise ones, and centered clipping (BTARD's rule), whose
#: per-part version clips each part on its own (a stricter, not weaker, robustness notion).
PART_RULES = COORDINATEWISE | {"centered_clip"}


@dataclass(frozen=True)
class PartPlan:
    """How round ``round``'s update of dimension ``dim`` is cut: part ``i`` is
    ``[bounds[i][0], bounds[i][1])`` and is aggregated by ``aggregators[i]``."""

    round: int
    dim: int
    bounds: tuple[tuple[int, int], ...]
    aggregators: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.bounds)

    def parts_of(self, peer: str) -> list[int]:
        """The parts ``peer`` aggregates."""
        return [i for i, a in enumerate(self.aggregators) if a == peer]

    def split(self, update: Tensor) -> list[Tensor]:
        """``update`` (shape ``(dim,)``) cut into this plan's parts (views, no copy)."""
        if update.dim() != 1 or update.numel() != self.dim:
            raise AggregationError(
                f"update has shape {tuple(update.shape)}, the plan expects ({self.dim},)"
            )
        return [update[a:b] for a, b in self.bounds]

    def join(self, parts: list[Tensor]) -> Tensor:
        """The whole vector from its aggregated parts, in order."""
        if len(parts) != len(self.bounds):
            raise AggregationError(f"{len(parts)} parts given, the plan has {len(self.bounds)}")
        for i, (p, (a, b)) in enumerate(zip(parts, self.bounds, strict=True)):
            if p.shape != (b - a,):
                raise AggregationError(f"part {i} has shape {tuple(p.shape)}, expected ({b - a},)")
        return torch.cat(parts)


def _rank(seed: bytes, label: bytes, peer: str) -> bytes:
    return DIGEST(seed + label + peer.encode()).digest()


def plan_parts(
    round: int, dim: int, contributors: list[str], seed: bytes, parts: int | None = None
) -> PartPlan:
    """Cut ``dim`` coordinates into ``parts`` (default: one per contributor) contiguous
    parts whose sizes differ by at most one, and give them to the contributors in the order
    ``seed`` ranks them, round robin.

    ``seed`` must be something every honest peer holds identically and nobody could choose
    alone before the contributions were fixed: the hash of the previous round's decision
    certificate. A part count below the contributor count leaves some of them without a part
    (fewer, larger messages); above it, some aggregate several."""
    members = sorted(set(contributors))
    if not members:
        raise AggregationError("a plan needs at least one contributor")
    if dim < 1:
        raise AggregationError(f"dimension must be positive, got {dim}")
    k = len(members) if parts is None else parts
    if not 1 <= k <= dim:
        raise AggregationError(f"parts must be in [1, {dim}] (the dimension), got {k}")
    order = sorted(members, key=lambda p: _rank(seed, b"aggregator", p))
    base, extra = divmod(dim, k)
    bounds, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return PartPlan(round, dim, tuple(bounds), tuple(order[i % len(order)] for i in range(k)))


def encode_part(part: Tensor) -> bytes:
    """The bytes a part travels and is committed as: float32, little-endian."""
    if part.dtype != torch.float32:
        raise AggregationError(f"parts are float32, got {part.dtype}")
    return part.detach().contiguous().numpy().astype("<f4", copy=False).tobytes()


def decode_part(data: bytes, size: int) -> Tensor:
    """The inverse of :func:`encode_part`, refusing a wrong length or non-finite values (a
    part with NaN would poison every rule)."""
    if len(data) != 4 * size:
        raise AggregationError(f"part has {len(data)} bytes, expected {4 * size}")
    t = torch.frombuffer(bytearray(data), dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise AggregationError("part holds NaN or infinite values")
    return t


def part_digests(update: Tensor, plan: PartPlan) -> list[bytes]:
    """What a contributor commits to in its signed contribution: one digest per part."""
    return [DIGEST(encode_part(p)).digest() for p in plan.split(update)]


def aggregate_part(
    inputs: dict[str, Tensor],
    rule: str,
    f: int,
    center: Tensor | None = None,
    **params: Any,
) -> Tensor:
    """Part ``i`` aggregated over ``inputs`` (contributor -> part), stacked in sorted
    contributor order so that every peer that recomputes it gets the same bits.
    ``center``: for centered clipping, that part of the previous round's aggregate (agreed
    state, so everyone holds it)."""
    if rule not in PART_RULES:
        raise AggregationError(
            f"rule {rule!r} cannot be applied per part; choose from {', '.join(sorted(PART_RULES))}"
        )
    if not inputs:
        raise AggregationError("no inputs to aggregate")
    sizes = {t.shape for t in inputs.values()}
    if len(sizes) != 1:
        raise AggregationError(f"inputs of one part differ in shape: {sorted(sizes)}")
    stack = torch.stack([inputs[p] for p in sorted(inputs)])
    spec = AGGREGATORS[rule]
    if rule == "centered_clip":
        out: Tensor = spec.fn(stack, f=f, center=center, **params)
    else:
        out = spec.fn(stack, f=f, **params)
    return out


def outputs_agree(claimed: Tensor, recomputed: Tensor, rtol: float = 1e-5) -> bool:
    """Whether a claimed part aggregate is the recomputed one, up to float rounding between
    machines (BLAS order): within ``rtol`` of the larger of their norms, coordinate-wise."""
    if claimed.shape != recomputed.shape:
        return False
    if not bool(torch.isfinite(claimed).all()):
        return False
    scale = max(float(claimed.abs().max()), float(recomputed.abs().max()), 1e-12)
    return bool((claimed - recomputed).abs().max() <= rtol * scale)


def verifiers(seed: bytes, members: list[str], part: int, aggregator: str, m: int) -> list[str]:
    """The ``m`` members that check part ``part``: ranked by ``seed`` (which must be fixed
    only after the claims, e.g. the hash of the decision certificate of the round that
    carries them), never the aggregator itself."""
    label = b"verify:" + str(part).encode()
    others = sorted(p for p in set(members) if p != aggregator)
    return sorted(others, key=lambda p: _rank(seed, label, p))[: max(0, m)]


def verifications_needed(n: int, f: int, miss: float = 1e-6) -> int:
    """Verifiers per part so that a lying aggregator escapes every honest one with
    probability at most ``miss``, when up to ``f`` of the ``n - 1`` candidates are Byzantine
    and stay silent: hypergeometric, computed exactly (the smallest such m)."""
    if not 0 <= f < n:
        raise AggregationError(f"need 0 <= f < n, got f = {f}, n = {n}")
    pool = n - 1
    for m in range(1, pool + 1):
        # P(all m chosen are among the f Byzantine) = C(f, m) / C(pool, m)
        if m > f or math.comb(f, m) / math.comb(pool, m) <= miss:
            return m
    return pool


@dataclass(frozen=True)
class PartClaim:
    """What an aggregator signs about part ``part`` of round ``round``: the inputs it used
    (contributor, digest), sorted, and the digest of its output."""

    round: int
    part: int
    aggregator: str
    inputs: tuple[tuple[str, bytes], ...]
    output_digest: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "part": self.part,
            "aggregator": self.aggregator,
            "inputs": [[p, d] for p, d in self.inputs],
            "output": self.output_digest,
        }


def make_claim(plan: PartPlan, part: int, inputs: dict[str, Tensor], output: Tensor) -> PartClaim:
    """The claim of ``plan.aggregators[part]`` for an output computed from ``inputs``."""
    return PartClaim(
        plan.round,
        part,
        plan.aggregators[part],
        tuple((p, DIGEST(encode_part(inputs[p])).digest()) for p in sorted(inputs)),
        DIGEST(encode_part(output)).digest(),
    )


class Verdict(Enum):
    """The outcome of :func:`judge`: who is at fault."""

    AGGREGATOR_LIED = "aggregator_lied"  # evict it, recompute the part
    FALSE_ACCUSATION = "false_accusation"  # the accuser pays
    INVALID = "invalid"  # evidence that contradicts the commitments: the accuser pays


@dataclass(frozen=True)
class Accusation:
    """A verifier's evidence against a claim: the claimed output and the committed inputs."""

    claim: PartClaim
    output: bytes
    inputs: dict[str, bytes]


def judge(
    acc: Accusation,
    plan: PartPlan,
    committed: dict[str, list[bytes]],
    rule: str,
    f: int,
    center: Tensor | None = None,
    rtol: float = 1e-5,
    **params: Any,
) -> Verdict:
    """Decide an accusation from public facts only: ``committed`` (contributor -> its signed
    part digests, from the round's decision) and the plan. Any member reaches the same
    verdict, so the swarm can vote on it like on any other membership change.

    The aggregator lied when its claim names inputs other than the committed ones (it left
    out or swapped a contributor), or when its output is not the rule's result on them."""
    c = acc.claim
    if c.round != plan.round or not 0 <= c.part < len(plan):
        return Verdict.INVALID
    if c.aggregator != plan.aggregators[c.part]:
        return Verdict.INVALID
    if DIGEST(acc.output).digest() != c.output_digest:
        return Verdict.INVALID  # not the output the aggregator signed for
    a, b = plan.bounds[c.part]
    expected = {p: d[c.part] for p, d in committed.items() if len(d) == len(plan)}
    if set(acc.inputs) != set(expected):
        return Verdict.INVALID
    for p, data in acc.inputs.items():
        if DIGEST(data).digest() != expected[p]:
            return Verdict.INVALID  # evidence must be what the contributor committed to
    if dict(c.inputs) != expected:
        return Verdict.AGGREGATOR_LIED  # it aggregated something else than the round's inputs
    try:
        claimed = decode_part(acc.output, b - a)
    except AggregationError:
        return Verdict.AGGREGATOR_LIED  # it signed an output that is not a valid part
    try:
        inputs = {p: decode_part(data, b - a) for p, data in acc.inputs.items()}
    except AggregationError:
        return Verdict.INVALID
    recomputed = aggregate_part(inputs, rule, f, center=center, **params)
    if outputs_agree(claimed, recomputed, rtol):
        return Verdict.FALSE_ACCUSATION
    return Verdict.AGGREGATOR_LIED


def bytes_per_peer(n: int, payload: int, parts: int | None = None) -> dict[str, float]:
    """Bytes one contributor sends and receives per round, partitioned against all-to-all
    (payloads only; control messages apart): the figure issue 19 bounds by ``3 x payload``."""
    k = n if parts is None else parts
    share = payload / k  # one part
    mine = math.ceil(k / n)  # parts this peer aggregates (at most)
    return {
        "partitioned_sent": payload * (k - mine) / k + mine * share * (n - 1),
        "partitioned_received": mine * share * (n - 1) + payload * (k - mine) / k,
        "all_to_all_sent": payload * (n - 1),
        "all_to_all_received": payload * (n - 1),
    }
