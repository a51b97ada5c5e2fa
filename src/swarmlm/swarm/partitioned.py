"""Partitioned robust aggregation in the swarm's rounds (issue 19; design in
docs/partitioned-aggregation.md).

With ``swarm.aggregation_layout: partitioned`` a round's contribution is a small signed
header (:func:`swarmlm.swarm.contribution.encode_part_header`) holding the Merkle root of the
contributor's ``k`` encoded parts, not the update itself. After the decision:

1. every peer reads the decided headers and derives the round's *inputs* (valid headers of
   the agreed state, reputation above ``exclude_below``) and the :class:`PartPlan`
   (``k = |M_r|`` parts, aggregators ranked by a hash of the decided entries, round robin
   over the inputs), identically;
2. the aggregator of part ``i`` walks each input's Merkle tree to leaf ``i`` (every tree
   node is a content-addressed blob, so each fetch is verified by its hash and the walk is
   the inclusion proof), aggregates with the run's rule and ``f``
   (:func:`swarmlm.aggregation.partitioned.aggregate_part`), encodes the output with the
   run's codec (deterministic: no error feedback), serves it by digest and broadcasts a
   signed ``part_claim``;
3. every peer fetches each claimed output, checks its digest, joins the parts and applies
   the round *tentatively*; an aggregator silent past ``partition_timeout`` is replaced by
   the next contributor in rank (same inputs, same rule, so an honest replacement's output
   is the same bytes);
4. each peer checks each part it did not aggregate with probability ``min(1,
   partition_verifiers / (n - 1))`` (a private coin: no aggregator can know who checks); a
   mismatch becomes an :class:`Accusation` with the signed claim, the output and every input with
   its Merkle proof, carried in the accuser's *next* contribution (so the decision, not the
   network's timing, says which accusations every peer judges);
5. when round ``r + 1`` is decided every peer judges the accusations about round ``r``
   (:func:`judge_accusation`, from public commitments only): a proven lie replaces that
   part by the recomputed one, rewinds round ``r`` and applies it again, and zeroes the
   liar's reputation (it is voted out); a false or invalid accusation halves the accuser's.

Worker momentum cannot stay in the consensus state (no peer sees another's whole update):
contributors apply it locally before encoding (Karimireddy et al.'s worker momentum, as in
BTARD). Outlier scores need distances of whole updates and are not computed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import torch
from torch import Tensor

from swarmlm import merkle
from swarmlm.aggregation import decode, get_codec
from swarmlm.aggregation.errors import AggregationError, CodecError
from swarmlm.aggregation.partitioned import (
    PartPlan,
    aggregate_part,
    outputs_agree,
    plan_parts,
)
from swarmlm.aggregation.registry import AGGREGATORS
from swarmlm.p2p.errors import MessageRejectedError, TransportError
from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.swarm.config import SwarmConfig
from swarmlm.swarm.contribution import PartHeader, decode_part_header, encode_part_header
from swarmlm.swarm.engine import INITIAL_REPUTATION, RoundEngine, RoundReport, single_thread
from swarmlm.swarm.errors import ContributionError, SwarmError
from swarmlm.swarm.outer import FlatAdamW
from swarmlm.swarm.params import load_flat_params

if TYPE_CHECKING:
    from swarmlm.swarm.node import SwarmNode

log = logging.getLogger(__name__)

CLAIM_KIND = "part_claim"
MAX_ACCUSATIONS = 16  # per contribution: more is a flood, the rest are dropped unread

Fetch = Callable[[bytes, list[str]], Awaitable[bytes]]


# -- parts and their Merkle commitments ------------------------------------------------------
class PartEncoder:
    """A contributor's parts: the update cut by the plan's bounds, each encoded by the run's
    codec through its own error feedback (what a part's codec drops is sent in a later
    round, as for a whole payload)."""

    def __init__(self, cfg: SwarmConfig) -> None:
        self.codec = get_codec(cfg.codec, **cfg.codec_kwargs())
        self.residual: Tensor | None = None

    def encode(self, update: Tensor, bounds: Sequence[tuple[int, int]]) -> list[bytes]:
        x = update.detach().float()
        compensated = x.clone() if self.residual is None else x + self.residual
        chunks, sent = [], []
        for a, b in bounds:
            payload = self.codec.encode(compensated[a:b].contiguous())
            chunks.append(payload)
            sent.append(decode(payload, max_numel=b - a))
        self.residual = compensated - torch.cat(sent)
        return chunks


def bounds_of(dim: int, k: int) -> list[tuple[int, int]]:
    """Contiguous parts whose sizes differ by at most one (as :func:`plan_parts` cuts)."""
    base, extra = divmod(dim, k)
    out, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def tree_blobs(chunks: Sequence[bytes]) -> tuple[bytes, dict[bytes, bytes]]:
    """The Merkle root over ``chunks`` (:mod:`swarmlm.merkle`, RFC 6962) and every blob a peer
    needs to walk from it to a chunk, keyed by its SHA-256: inner nodes ``0x01 | left |
    right`` (their node hash), leaves ``0x00 | sha256(chunk)`` (their leaf hash) and the
    chunks. The root alone travels in the signed header: O(1) bytes whatever ``k`` is."""
    blobs: dict[bytes, bytes] = {}
    level = []
    for c in chunks:
        digest = merkle.chunk_digest(c)
        blobs[digest] = c
        leaf = merkle.LEAF_PREFIX + digest
        h = hashlib.sha256(leaf).digest()
        blobs[h] = leaf
        level.append(h)
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            node = merkle.NODE_PREFIX + level[i] + level[i + 1]
            h = hashlib.sha256(node).digest()
            blobs[h] = node
            nxt.append(h)
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    root = merkle.merkle_root([merkle.chunk_digest(c) for c in chunks])
    assert not level or level[0] == root
    return root, blobs


@dataclass(frozen=True)
class PartInput:
    """Part ``index`` of one contributor, with the audit path that proves it was committed."""

    chunk: bytes
    siblings: tuple[bytes, ...]  # leaf to root, as merkle.verify takes them

    def check(self, root: bytes, index: int, n_leaves: int) -> None:
        merkle.verify(root, index, merkle.chunk_digest(self.chunk), self.siblings, n_leaves)


def _split_point(size: int) -> int:
    s = 1
    while s * 2 < size:
        s *= 2
    return s


async def walk_to_part(root: bytes, index: int, n_leaves: int, fetch: Fetch) -> PartInput:
    """Fetch part ``index`` of the tree ``root`` node by node (RFC 6962's split: the largest
    power of two below the size goes left). Every blob is fetched by its digest, so the
    transport's hash check makes each step a verified step of the proof."""
    if not 0 <= index < n_leaves:
        raise SwarmError(f"part {index} is outside a tree of {n_leaves} parts")
    lo, hi, h = 0, n_leaves, root
    path: list[bytes] = []
    while hi - lo > 1:
        node = await fetch(h, [])
        if len(node) != 65 or node[:1] != merkle.NODE_PREFIX:
            raise SwarmError(f"tree node {h.hex()[:12]} is not an inner node")
        left, right = node[1:33], node[33:]
        s = _split_point(hi - lo)
        if index < lo + s:
            h, hi = left, lo + s
            path.append(right)
        else:
            h, lo = right, lo + s
            path.append(left)
    leaf = await fetch(h, [])
    if len(leaf) != 33 or leaf[:1] != merkle.LEAF_PREFIX:
        raise SwarmError(f"tree leaf {h.hex()[:12]} is not a leaf")
    chunk = await fetch(leaf[1:], [])
    part = PartInput(bytes(chunk), tuple(reversed(path)))
    part.check(root, index, n_leaves)
    return part


# -- the plan, the inputs, the claims ----------------------------------------------------------
def plan_seed(round: int, headers: Sequence[tuple[str, bytes]]) -> bytes:
    """The plan's seed: a hash of the decided entries (peer, payload digest). A leader that
    grinds its choice of entries only permutes who aggregates which part: each contributor
    aggregates ``ceil(k / inputs)`` or ``floor(k / inputs)`` parts whatever the order, and
    every part is open to verification (docs/partitioned-aggregation.md)."""
    h = hashlib.sha256(b"swarmlm/part-plan/v1" + round.to_bytes(8, "big"))
    for peer, digest in sorted(headers):
        h.update(peer.encode() + digest)
    return h.digest()


def round_f(cfg: SwarmConfig, n: int) -> int:
    """The run's ``f`` for ``n`` inputs, capped at what the rule tolerates (as the engine)."""
    f = cfg.byzantine_f if cfg.byzantine_f is not None else (n - 1) // 3
    return min(f, AGGREGATORS[cfg.aggregator].max_f(n))


def candidates(plan: PartPlan, inputs: Sequence[str], part: int) -> list[str]:
    """Who aggregates ``part``: its planned aggregator, then the next inputs in the plan's
    rank (a replacement when it is silent)."""
    order = list(dict.fromkeys(plan.aggregators[i] for i in range(len(plan))))
    order += [p for p in sorted(inputs) if p not in order]
    start = order.index(plan.aggregators[part])
    return order[start:] + order[:start]


def claim_body(part: int, missing: Sequence[str], output_digest: bytes) -> dict[str, Any]:
    return {"part": part, "missing": sorted(missing), "output": output_digest}


@dataclass(frozen=True)
class Claim:
    """A verified ``part_claim``: ``aggregator`` says part ``part`` of round ``round``,
    computed over the round's inputs except ``missing``, has output digest ``output``."""

    round: int
    part: int
    aggregator: str
    missing: tuple[str, ...]
    output: bytes
    signed: SignedMessage

    @classmethod
    def parse(cls, msg: SignedMessage) -> Claim:
        b = msg.body
        missing = b["missing"]
        if not all(isinstance(p, str) for p in missing) or list(missing) != sorted(set(missing)):
            raise MessageRejectedError("invalid", "part_claim: 'missing' must be sorted ids")
        if len(b["output"]) != 32 or b["part"] < 0:
            raise MessageRejectedError("invalid", "part_claim: bad part or output digest")
        return cls(msg.round, b["part"], msg.sender, tuple(missing), b["output"], msg)


def recompute(
    cfg: SwarmConfig,
    plan: PartPlan,
    part: int,
    chunks: dict[str, bytes],
    center: Tensor | None,
) -> bytes:
    """Part ``part``'s output from the inputs' encoded chunks: decode (a chunk that does not
    decode, or has the wrong size, is left out by everyone alike), aggregate in sorted
    contributor order on one thread, encode with the run's codec. Deterministic: the same
    inputs give the same bytes on the same torch build and CPU."""
    a, b = plan.bounds[part]
    tensors = {}
    for peer, chunk in chunks.items():
        with contextlib.suppress(CodecError):
            t = decode(chunk, max_numel=b - a)
            if t.numel() == b - a:
                tensors[peer] = t.reshape(-1).float()
    if not tensors:
        raise AggregationError(f"part {part}: no input decodes")
    params = dict(cfg.aggregator_params)
    with single_thread():
        out = aggregate_part(
            tensors,
            cfg.aggregator,
            round_f(cfg, len(tensors)),
            center=None if center is None else center[a:b],
            **params,
        )
    codec = get_codec(cfg.codec, **cfg.codec_kwargs())
    return codec.encode(out.contiguous())


# -- accusations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Accusation:
    """Evidence against a claim: the signed claim, the output it names, every input's part
    with its audit path. Judged by :func:`judge_accusation` from public facts alone."""

    claim: dict[str, bytes]  # the signed part_claim, {"m", "s"}
    output: bytes
    inputs: dict[str, PartInput]

    def to_wire(self) -> dict[str, Any]:
        return {
            "claim": self.claim,
            "output": self.output,
            "inputs": [[p, i.chunk, list(i.siblings)] for p, i in sorted(self.inputs.items())],
        }

    @classmethod
    def from_wire(cls, w: Any) -> Accusation:
        if not isinstance(w, dict) or set(w) != {"claim", "output", "inputs"}:
            raise ValueError("an accusation holds exactly claim, output, inputs")
        if not isinstance(w["output"], bytes) or not isinstance(w["inputs"], list):
            raise ValueError("accusation output/inputs malformed")
        inputs = {}
        for row in w["inputs"]:
            ok = isinstance(row, list) and len(row) == 3
            if not ok or not isinstance(row[0], str) or not isinstance(row[1], bytes):
                raise ValueError("accusation input rows are [peer, chunk, siblings]")
            if not isinstance(row[2], list) or not all(isinstance(s, bytes) for s in row[2]):
                raise ValueError("accusation siblings must be bytes")
            inputs[row[0]] = PartInput(row[1], tuple(row[2]))
        return cls(w["claim"], w["output"], inputs)


def encode_accusations(accusations: Sequence[Accusation]) -> bytes:
    if not accusations:
        return b""
    return bytes(msgpack.packb([a.to_wire() for a in accusations], use_bin_type=True))


def decode_accusations(data: bytes) -> list[Accusation]:
    """Accusations from a contribution's attachment; malformed bytes give none (the
    accuser's own loss: its evidence is not judged)."""
    if not data:
        return []
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        if not isinstance(raw, list):
            return []
        return [Accusation.from_wire(w) for w in raw[:MAX_ACCUSATIONS]]
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return []


class Verdict:
    LIED = "aggregator_lied"
    FALSE = "false_accusation"
    INVALID = "invalid"


@dataclass
class RoundInputs:
    """What every peer derives identically from round ``r``'s decided headers."""

    round: int
    headers: dict[str, PartHeader]  # the inputs (valid, current, not excluded)
    plan: PartPlan
    invalid: dict[str, str]
    stale: list[str]
    excluded: list[str]
    present: set[str]
    members: list[str]


def judge_accusation(
    acc: Accusation, inputs: RoundInputs, cfg: SwarmConfig, center: Tensor | None
) -> tuple[str, str, int, bytes | None]:
    """(verdict, accused peer, part, corrected output or None). Uses only the decided
    headers of the round (roots), the plan and the evidence: every peer agrees."""
    try:
        msg = open_signed(acc.claim)
        if msg.kind != CLAIM_KIND:
            raise MessageRejectedError("invalid", "not a part_claim")
        claim = Claim.parse(msg)
    except (MessageRejectedError, KeyError, TypeError):
        return Verdict.INVALID, "", -1, None
    plan = inputs.plan
    if claim.round != inputs.round or not 0 <= claim.part < len(plan):
        return Verdict.INVALID, claim.aggregator, claim.part, None
    if claim.aggregator not in candidates(plan, list(inputs.headers), claim.part):
        return Verdict.INVALID, claim.aggregator, claim.part, None
    if hashlib.sha256(acc.output).digest() != claim.output:
        return Verdict.INVALID, claim.aggregator, claim.part, None
    used = sorted(set(inputs.headers) - set(claim.missing))
    if set(acc.inputs) != set(used):
        return Verdict.INVALID, claim.aggregator, claim.part, None
    for peer in used:
        h = inputs.headers[peer]
        try:
            acc.inputs[peer].check(h.root, claim.part, h.parts)
        except merkle.MerkleError:
            return Verdict.INVALID, claim.aggregator, claim.part, None
    f = round_f(cfg, len(inputs.headers))
    if len(set(claim.missing)) > f or not set(claim.missing) <= set(inputs.headers):
        # leaving out more than f inputs is not a timeout an honest aggregator may claim
        fixed = _recompute_or_none(cfg, plan, claim.part, acc, sorted(inputs.headers), center)
        return Verdict.LIED, claim.aggregator, claim.part, fixed
    right = _recompute_or_none(cfg, plan, claim.part, acc, used, center)
    if right is None:
        return Verdict.INVALID, claim.aggregator, claim.part, None
    if right == acc.output or _agree(cfg, plan, claim.part, acc.output, right):
        return Verdict.FALSE, claim.aggregator, claim.part, None
    return Verdict.LIED, claim.aggregator, claim.part, right


def _recompute_or_none(
    cfg: SwarmConfig,
    plan: PartPlan,
    part: int,
    acc: Accusation,
    peers: Sequence[str],
    center: Tensor | None,
) -> bytes | None:
    chunks = {p: acc.inputs[p].chunk for p in peers if p in acc.inputs}
    try:
        return recompute(cfg, plan, part, chunks, center)
    except AggregationError:
        return None


def _agree(cfg: SwarmConfig, plan: PartPlan, part: int, claimed: bytes, right: bytes) -> bool:
    a, b = plan.bounds[part]
    try:
        got = decode(claimed, max_numel=b - a).reshape(-1).float()
    except CodecError:
        return False
    return got.numel() == b - a and outputs_agree(got, decode(right).reshape(-1).float())


# -- applying ----------------------------------------------------------------------------------
def apply_aggregate(
    engine: RoundEngine,
    round: int,
    agg: Tensor,
    *,
    accepted: Sequence[str],
    invalid: dict[str, str],
    members: Sequence[str],
    present: set[str],
    lr: float,
) -> RoundReport:
    """Advance ``engine`` by round ``round`` whose aggregate the aggregators computed part by
    part (joined: ``agg``, float32 ``(d,)``). The consensus-state bookkeeping the layout can
    do without whole updates: membership, invalid entries (halved), absence (x 0.9 after the
    join grace), accepted peers back towards 1; the centre of centered clipping is the joined
    aggregate; then the mode's outer step. Deterministic like :meth:`RoundEngine.apply`."""
    if round != engine.round + 1:
        raise SwarmError(f"round {round} cannot follow our last applied round {engine.round}")
    if agg.shape != (engine.d,):
        raise SwarmError(f"aggregate has shape {tuple(agg.shape)}, expected ({engine.d},)")
    report = RoundReport(round, len(present))
    report.accepted = sorted(accepted)
    report.invalid = dict(invalid)
    report.absent = sorted(set(members) - present)
    engine._track_membership(round, members, present)
    rep = engine.reputation
    for peer in invalid:
        rep[peer] = rep.get(peer, INITIAL_REPUTATION) * 0.5
    for peer in report.absent:
        since = engine.awaiting_first.get(peer)
        if since is None or round - since >= engine.cfg.join_grace_rounds:
            rep[peer] = rep.get(peer, INITIAL_REPUTATION) * 0.9
    for peer in accepted:
        score = rep.get(peer, INITIAL_REPUTATION)
        rep[peer] = score + 0.1 * (1.0 - score)
        engine.last_seen[peer] = round
    with single_thread():
        if engine.cfg.aggregator == "centered_clip":
            engine.center = agg.clone()
        report.aggregate_norm = float(agg.norm())
        if isinstance(engine.outer, FlatAdamW):
            engine.outer.step(engine.params, agg, lr)
        else:
            engine.outer.step(engine.params, agg)
    report.applied = True
    engine.round = round
    engine._changed()
    return report


# -- the round, on a node ------------------------------------------------------------------------
@dataclass
class _Applied:
    """A tentatively applied round, kept until the next decision settles its accusations."""

    inputs: RoundInputs
    before: bytes  # state blob before it (to rewind)
    digest_after: bytes  # the tentative state digest round r + 1's headers carry
    outputs: dict[int, bytes]
    claims: dict[int, Claim]
    lr: float
    report: RoundReport


@dataclass
class PartitionedStats:
    parts_aggregated: int = 0
    parts_verified: int = 0
    accusations_sent: int = 0
    replacements: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)


class PartitionedRounds:
    """The partitioned round loop of one :class:`SwarmNode` (genesis members from round 1;
    joiners, resume and catch-up are not supported in this layout yet: the node refuses
    them with a message). Blocking work runs through the node's runner, time through its
    clock, randomness through ``rng``: the loop runs unchanged in the simulator."""

    def __init__(self, node: SwarmNode, rng: random.Random | None = None) -> None:
        assert node.worker is not None
        assert node.proto is not None
        self.node = node
        self.worker = node.worker
        self.proto = node.proto
        self.cfg = node.cfg.swarm
        self.engine: RoundEngine = node.worker.engine
        self.me = node.identity.node_id
        self.encoder = PartEncoder(self.cfg)
        # private coins for verification; the simulator's node carries a seeded RNG
        node_rng = getattr(node.node, "rng", None)
        self.rng = rng or (node_rng if isinstance(node_rng, random.Random) else random.Random())
        self.update_bytes = 0  # our encoded parts, the payload all-to-all would send
        self.momentum: Tensor | None = None
        self.claims: dict[tuple[int, int], list[Claim]] = {}
        self._claim_event = asyncio.Event()
        self.accusations: list[tuple[int, Accusation]] = []  # (part, evidence)
        self.applied: _Applied | None = None
        self.stats = PartitionedStats()
        self._round_blobs: dict[int, list[bytes]] = {}
        self._round = 0
        self._verifying: asyncio.Task[None] | None = None
        self.verify_wait_s = 0.0  # how long the last contribution waited for verification
        node.node.on(CLAIM_KIND, self._on_claim)

    # -- inbound claims ------------------------------------------------------------------
    def _on_claim(self, msg: SignedMessage, peer: str) -> None:
        claim = Claim.parse(msg)
        if not self.proto.last_decided - 2 <= claim.round <= self.proto.last_decided + 2:
            return  # far from our rounds: not stored (bounded memory)
        members = self.proto.members(claim.round)
        if members is None:
            return  # a round we do not know the membership of yet: not stored
        if claim.aggregator not in members or claim.part >= len(members):
            # k = |M_r| parts: anything else is not a claim of this round (bounded memory)
            raise MessageRejectedError(
                "invalid",
                f"part_claim for part {claim.part} of round {claim.round} from "
                f"{claim.aggregator[:12]}: not a member's part",
            )
        held = self.claims.setdefault((claim.round, claim.part), [])
        if any(c.aggregator == claim.aggregator for c in held) or len(held) > 8:
            return
        held.append(claim)
        self._claim_event.set()

    def _keep(self, digest: bytes, data: bytes | None = None) -> None:
        """Remember a blob this round put in our store; forgotten 3 rounds later."""
        if data is not None:
            self.node.node.blobs.put(digest, data)
        self._round_blobs.setdefault(self._round, []).append(digest)

    def _forget_old(self, r: int) -> None:
        for old in [x for x in self._round_blobs if x < r - 3]:
            self.node.node.blobs.forget(set(self._round_blobs.pop(old)))

    async def _fetch(self, digest: bytes, peers: list[str]) -> bytes:
        have = self.node.node.blobs.get(digest)
        if have is not None:
            return bytes(have)
        self._keep(digest)
        timeout = self.node.cfg.p2p.fetch_timeout
        if peers:  # the peer that holds it first: asking others costs a wait each
            with contextlib.suppress(TransportError):
                return bytes(await self.node.node.fetch(digest, peers, timeout))
        members = self.proto.members(self.proto.last_decided + 1) or []
        others = [p for p in members if p not in peers]
        return bytes(await self.node.node.fetch(digest, others, timeout))

    # -- the loop ------------------------------------------------------------------------
    async def run(self, start: int) -> None:
        if start != 1:
            raise SwarmError(
                "swarm.aggregation_layout=partitioned runs genesis members from round 1 only: "
                "joining, --resume and catch-up are not supported in this layout yet"
            )
        worker, sw = self.worker, self.cfg
        for r in range(start, sw.rounds + 1):
            base = await self.node._run(self.engine.state_digest)
            t0 = self.node._clock()
            start_params = self.engine.params
            if sw.mode == "diloco" and sw.keep_unsent and self.encoder.residual is not None:
                start_params = start_params - self.encoder.residual
            update = await self.node._run(worker.local_phase, start_params)
            t_compute = self.node._clock() - t0
            members = self.proto.members(r) or []
            if self.me not in members:
                raise SwarmError(f"round {r}: this node is not a member (partitioned layout)")
            t_verify = self.node._clock()
            if self._verifying is not None:
                await self._verifying  # its accusations ride in this contribution
                self._verifying = None
            self.verify_wait_s = self.node._clock() - t_verify
            payload = await self.node._run(self._contribution, r, update, base, len(members))
            t_wait = self.node._clock()
            decision = await self.node._decide(r, payload)
            t_decided = self.node._clock()
            if not await self._settle(r, decision, payload, t_compute, t_wait, t_decided):
                return

    def _contribution(self, r: int, update: Tensor, base: bytes, k: int) -> bytes:
        beta = self.cfg.worker_momentum
        if beta > 0.0:  # worker momentum, kept locally (docs/partitioned-aggregation.md)
            m = self.momentum
            self.momentum = update.clone() if m is None else m * beta + update * (1 - beta)
            update = self.momentum
        if self.cfg.attack == "sign_flip":
            update = -self.cfg.attack_scale * update
        chunks = self.encoder.encode(update, bounds_of(self.engine.d, k))
        self.update_bytes = sum(len(c) for c in chunks)
        root, blobs = tree_blobs(chunks)
        self._round = r
        for digest, blob in blobs.items():
            self._keep(digest, blob)
        self._forget_old(r)
        attachment = encode_accusations(
            [a for _, a in sorted(self.accusations, key=lambda x: x[0])]
        )
        self.stats.accusations_sent += len(self.accusations)
        self.accusations = []
        self.worker.last_update = update
        return encode_part_header(
            r,
            self.engine.state_digest(),
            self.worker.last_samples,
            k,
            root,
            base,
            self.worker.last_seconds,
            attachment,
        )

    def _inputs(
        self, r: int, decision: Any, headers: list[tuple[str, bytes]], expected: bytes
    ) -> RoundInputs:
        parsed: dict[str, PartHeader] = {}
        invalid: dict[str, str] = {}
        for peer, data in headers:
            try:
                h = decode_part_header(peer, data)
                if h.round != r:
                    raise ContributionError(peer, f"made for round {h.round}, not {r}")
                if h.parts != len(decision.members):
                    raise ContributionError(
                        peer, f"{h.parts} parts, the round has {len(decision.members)} members"
                    )
                parsed[peer] = h
            except ContributionError as exc:
                invalid[peer] = exc.reason
        digests = [h.state_digest for h in parsed.values()]
        if digests and expected not in digests:
            agreed = max(set(digests), key=lambda d: (digests.count(d), d))
            raise SwarmError(
                f"round {r}: the decided contributions were made from state "
                f"{agreed.hex()[:12]}, ours is {expected.hex()[:12]}; a partitioned swarm "
                "cannot resynchronise a peer yet"
            )
        stale = sorted(p for p, h in parsed.items() if h.state_digest != expected)
        current = {p: h for p, h in parsed.items() if h.state_digest == expected}
        rep = self.engine.reputation
        excluded = sorted(
            p for p in current if rep.get(p, INITIAL_REPUTATION) < self.cfg.exclude_below
        )
        use = {p: h for p, h in current.items() if p not in excluded}
        entries = [(e.peer, e.digest) for e in decision.entries]
        k = len(decision.members)
        seed = plan_seed(r, entries)
        plan = plan_parts(r, self.engine.d, sorted(use) or [self.me], seed, parts=k)
        return RoundInputs(
            r,
            use,
            plan,
            invalid,
            stale,
            excluded,
            {e.peer for e in decision.entries},
            list(decision.members),
        )

    async def _settle(
        self,
        r: int,
        decision: Any,
        payload: bytes,
        compute_s: float,
        t_wait: float,
        t_decided: float,
    ) -> bool:
        node, engine = self.node, self.engine
        raw: list[tuple[str, bytes]] = []
        for e in decision.entries:
            data = await self.proto.fetch(e.digest, timeout=node.cfg.p2p.fetch_timeout)
            raw.append((e.peer, bytes(data)))
        # 1. round r - 1's accusations, carried by round r's decided contributions
        verdicts = await self._judge_previous(raw)
        expected = self.applied.digest_after if self.applied is not None else engine.state_digest()
        inputs = self._inputs(r, decision, raw, expected)
        if not inputs.headers:
            raise SwarmError(f"round {r}: no usable contribution in the decision")
        # 2. aggregate our parts, 3. collect every part's output
        outputs, claims = await self._aggregate_round(inputs)
        t_outputs = node._clock()
        agg = torch.cat(
            [
                decode(outputs[i], max_numel=b - a).reshape(-1).float()
                for i, (a, b) in enumerate(inputs.plan.bounds)
            ]
        )
        before = await node._run(engine.state_blob)
        lr = self.worker.trainer.schedule.lr(r - 1)
        report = await node._run(self._apply, inputs, agg, lr)
        self.applied = _Applied(inputs, before, engine.state_digest(), outputs, claims, lr, report)
        # 4. verify a random sample of the parts others aggregated (private coins), while
        # the next local phase runs; the next contribution waits for it
        self._verifying = asyncio.create_task(
            self._verify(inputs, outputs, claims, self._center_before)
        )
        params_hash = await node._run(self.worker.params_sha256)
        node._publish_state()
        node._vote_evictions(decision)
        t_applied = node._clock()
        loss = None
        if r % self.cfg.eval_every == 0 or r == self.cfg.rounds:
            loss = await node._run(self.worker.evaluate)
            node.result.last_loss = loss
        node.result.rounds = r
        node._emit(
            "round",
            round=r,
            layout="partitioned",
            params_sha256=params_hash,
            state=engine.state_digest().hex(),
            val_loss=loss,
            train_loss=self.worker.last_loss,
            resynced=False,
            caught_up=False,
            view=decision.view,
            members_next=len(decision.members_next),
            compute_s=round(compute_s, 3),
            wait_s=round(t_decided - t_wait, 3),
            apply_s=round(t_applied - t_decided, 3),
            outputs_s=round(t_outputs - t_decided, 3),  # decision -> every part's output
            verify_wait_s=round(self.verify_wait_s, 3),
            bytes_sent=node.node.bytes_sent,
            blob_bytes_sent=node.node.bytes_sent_by_kind["blob"],
            bytes_sent_by_kind=dict(node.node.bytes_sent_by_kind),
            fetch_bytes_served=node.node.counters["fetch_bytes_served"],
            payload_bytes=len(payload),
            update_bytes=self.update_bytes,
            parts=len(inputs.plan),
            parts_aggregated=self.stats.parts_aggregated,
            parts_verified=self.stats.parts_verified,
            replacements=self.stats.replacements,
            accusations=verdicts,
            entries=len(decision.entries),
            accepted=len(inputs.headers),
            stale=[p[:12] for p in inputs.stale],
            invalid={p[:12]: why for p, why in inputs.invalid.items()},
            excluded=[p[:12] for p in inputs.excluded],
            absent=[p[:12] for p in report.absent],
            reputation={p[:12]: round(v, 4) for p, v in sorted(engine.reputation.items())},
        )
        me = self.me
        if me in decision.members and me not in decision.members_next:
            log.warning("round %d removed us from the membership; stopping", r)
            return False
        return True

    def _apply(self, inputs: RoundInputs, agg: Tensor, lr: float) -> RoundReport:
        with self.worker._busy:
            report = apply_aggregate(
                self.engine,
                inputs.round,
                agg,
                accepted=sorted(inputs.headers),
                invalid=inputs.invalid,
                members=inputs.members,
                present=inputs.present,
                lr=lr,
            )
            load_flat_params(self.worker.model, self.worker.layout, self.engine.params)
        return report

    def _rewind(self, prev: _Applied, agg: Tensor) -> None:
        """Round ``prev`` again from the state before it, with the corrected aggregate."""
        with self.worker._busy:
            self.engine.load_state(prev.before, None)
        self._apply(prev.inputs, agg, prev.lr)

    # -- aggregation ---------------------------------------------------------------------
    async def _gather(self, inputs: RoundInputs, part: int) -> dict[str, PartInput]:
        """Part ``part`` of every input that serves it within the fetch timeout."""

        async def one(peer: str) -> tuple[str, PartInput | None]:
            h = inputs.headers[peer]

            async def fetch(digest: bytes, _: list[str]) -> bytes:
                return await self._fetch(digest, [peer])

            try:
                return peer, await walk_to_part(h.root, part, h.parts, fetch)
            except (TransportError, SwarmError, merkle.MerkleError) as exc:
                log.warning("round %d part %d: input of %s: %s", inputs.round, part, peer[:12], exc)
                return peer, None

        got = await asyncio.gather(*(one(p) for p in sorted(inputs.headers)))
        return {p: i for p, i in got if i is not None}

    async def _aggregate_part(self, inputs: RoundInputs, part: int) -> None:
        parts = await self._gather(inputs, part)
        missing = sorted(set(inputs.headers) - set(parts))
        center = self.engine.center
        chunks = {p: i.chunk for p, i in parts.items()}
        try:
            out = await self.node._run(recompute, self.cfg, inputs.plan, part, chunks, center)
        except AggregationError as exc:
            log.warning("round %d part %d: %s", inputs.round, part, exc)
            return
        if self.cfg.attack == "lying_aggregator":
            a, b = inputs.plan.bounds[part]
            fake = decode(out, max_numel=b - a).reshape(-1) + self.cfg.attack_scale
            out = get_codec(self.cfg.codec, **self.cfg.codec_kwargs()).encode(fake.contiguous())
        digest = hashlib.sha256(out).digest()
        self._keep(digest, out)
        msg = self.node.node.sign(CLAIM_KIND, claim_body(part, missing, digest), inputs.round)
        self._on_claim(msg, self.me)
        self.node.node.broadcast(msg, [p for p in inputs.members if p != self.me])
        self.stats.parts_aggregated += 1

    async def _aggregate_round(
        self, inputs: RoundInputs
    ) -> tuple[dict[int, bytes], dict[int, Claim]]:
        plan, r = inputs.plan, inputs.round
        mine = plan.parts_of(self.me)
        tasks = [asyncio.create_task(self._aggregate_part(inputs, i)) for i in mine]
        outputs: dict[int, bytes] = {}
        claims: dict[int, Claim] = {}
        timeout = self.cfg.partition_timeout
        pending = set(range(len(plan)))
        started = self.node._clock()
        replaced: set[int] = set()
        fetching: dict[int, tuple[Claim, asyncio.Task[bytes | None]]] = {}
        tried: set[tuple[int, str]] = set()
        try:
            while pending:
                for i in sorted(pending):
                    if i in fetching:
                        c, t = fetching[i]
                        if not t.done():
                            continue
                        del fetching[i]
                        out = t.result()
                        if out is not None and hashlib.sha256(out).digest() == c.output:
                            outputs[i], claims[i] = out, c
                            pending.discard(i)
                            continue
                    cands = candidates(plan, list(inputs.headers), i)
                    waited = self.node._clock() - started
                    # the planned aggregator first; after each timeout, one more candidate
                    allowed = cands[: 1 + int(waited // timeout)]
                    for c in self.claims.get((r, i), []):
                        if c.aggregator in allowed and (i, c.aggregator) not in tried:
                            tried.add((i, c.aggregator))
                            task = asyncio.create_task(self._fetch_or_none(c.output, c.aggregator))
                            fetching[i] = (c, task)
                            break
                    if i not in fetching and len(allowed) > 1 and i not in replaced:
                        replaced.add(i)
                        self.stats.replacements += 1
                        log.warning(
                            "round %d part %d: %s silent, %s aggregates it",
                            r,
                            i,
                            cands[0][:12],
                            allowed[-1][:12],
                        )
                    if i not in fetching and self.me in allowed[1:] and i not in mine:
                        mine.append(i)
                        tasks.append(asyncio.create_task(self._aggregate_part(inputs, i)))
                if not pending:
                    break
                if self.node._clock() - started > timeout * (len(inputs.headers) + 1):
                    raise SwarmError(
                        f"round {r}: parts {sorted(pending)} got no output from any candidate"
                    )
                # wake on a new claim, a finished fetch, or to let the next candidate in
                self._claim_event.clear()
                woken = asyncio.create_task(self._claim_event.wait())
                await asyncio.wait(
                    [woken, *(t for _, t in fetching.values())],
                    timeout=min(timeout / 4, 0.5),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                woken.cancel()
        finally:
            for t in [*tasks, *(t for _, t in fetching.values())]:
                if not t.done():
                    t.cancel()
        for key in [k for k in self.claims if k[0] < r - 2]:
            del self.claims[key]
        return outputs, claims

    async def _fetch_or_none(self, digest: bytes, peer: str) -> bytes | None:
        try:
            return await self._fetch(digest, [peer])
        except TransportError:
            return None

    # -- verification --------------------------------------------------------------------
    async def _verify(
        self,
        inputs: RoundInputs,
        outputs: dict[int, bytes],
        claims: dict[int, Claim],
        center: Tensor | None,
    ) -> None:
        """Recompute the parts our private coins pick (drawn in part order, so a seeded RNG
        gives the same picks), concurrently; runs while the next local phase computes and
        must end before the next contribution, which carries its accusations."""
        others = max(len(inputs.members) - 1, 1)
        p = min(1.0, self.cfg.partition_verifiers / others)
        picked = [
            (i, c)
            for i, c in sorted(claims.items())
            if c.aggregator != self.me and self.rng.random() < p
        ]
        await asyncio.gather(*(self._verify_part(inputs, outputs, i, c, center) for i, c in picked))

    async def _verify_part(
        self,
        inputs: RoundInputs,
        outputs: dict[int, bytes],
        i: int,
        claim: Claim,
        center: Tensor | None,
    ) -> None:
        self.stats.parts_verified += 1
        used = sorted(set(inputs.headers) - set(claim.missing))
        parts = await self._gather(inputs, i)
        if not set(used) <= set(parts):
            return  # we could not fetch them all: no evidence, no accusation
        acc = Accusation(claim.signed.to_wire(), outputs[i], {q: parts[q] for q in used})
        verdict, *_ = await self.node._run(judge_accusation, acc, inputs, self.cfg, center)
        if self.cfg.attack == "false_accuser":
            verdict = Verdict.LIED
        if verdict != Verdict.FALSE:
            log.warning(
                "round %d part %d: %s's claim fails verification (%s): accusing",
                inputs.round,
                i,
                claim.aggregator[:12],
                verdict,
            )
            self.accusations.append((i, acc))

    # the centered-clipping centre the round being settled is aggregated around (the state
    # before it, which the rewind blob holds): verification and judging recompute with it
    _center_before: Tensor | None = None

    async def _judge_previous(self, raw: list[tuple[str, bytes]]) -> dict[str, int]:
        """Judge the accusations about the previous round that this round's decided
        contributions carry; on a proven lie rewind that round and apply it again."""
        prev = self.applied
        out: dict[str, int] = {}
        if prev is None:
            self._center_before = self.engine.center
            return out
        found: list[tuple[str, Accusation]] = []
        for peer, data in sorted(raw):
            try:
                h = decode_part_header(peer, data)
            except ContributionError:
                continue
            found.extend((peer, a) for a in decode_accusations(h.attachment))
        fixes: dict[int, bytes] = {}
        liars: set[str] = set()
        penalties: list[str] = []
        center = self._center_before
        for accuser, acc in found:
            verdict, accused, part, fixed = await self.node._run(
                judge_accusation, acc, prev.inputs, self.cfg, center
            )
            out[verdict] = out.get(verdict, 0) + 1
            self.stats.verdicts[verdict] = self.stats.verdicts.get(verdict, 0) + 1
            if verdict == Verdict.LIED and fixed is not None:
                liars.add(accused)
                # the first proven fix of a part wins (accusers in sorted order): same everywhere
                fixes.setdefault(part, fixed)
            else:
                penalties.append(accuser)
            log.warning(
                "round %d: accusation by %s against %s (part %d): %s",
                prev.inputs.round,
                accuser[:12],
                accused[:12],
                part,
                verdict,
            )
        if fixes:
            outputs = dict(prev.outputs)
            changed = False
            for part, fixed in fixes.items():
                if outputs.get(part) != fixed:
                    outputs[part], changed = fixed, True
            if changed:
                agg = torch.cat(
                    [
                        decode(outputs[i], max_numel=b - a).reshape(-1).float()
                        for i, (a, b) in enumerate(prev.inputs.plan.bounds)
                    ]
                )
                await self.node._run(self._rewind, prev, agg)
        for liar in sorted(liars):
            self.engine.reputation[liar] = 0.0  # consensus state: every member votes it out
            self.proto.vote_evict(liar)
        for accuser in penalties:
            rep = self.engine.reputation
            rep[accuser] = rep.get(accuser, INITIAL_REPUTATION) * 0.5
        if liars or penalties:
            self.engine._changed()
        self._center_before = self.engine.center
        return out
