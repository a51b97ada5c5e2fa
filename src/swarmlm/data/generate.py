"""``generate_corpus``: a mixed, deduplicated, provenance-tracked corpus of the 8 content types.

Pipeline (seeded; the same arguments give byte-identical output):

1. Draw records from each type's sources (``content``) until the type has
   ``share * size * OVERSAMPLE`` bytes, types interleaved in a fixed order.
2. Drop exact duplicates (blake2b of the text) and near duplicates (MinHash-LSH, Jaccard of
   5-byte shingles >= ``near_dup_threshold``) across the whole corpus, first seen kept;
   counts per type. Every generated problem is re-checked (``problems.check_problem``).
3. Train a byte-level BPE on the kept records (or load ``tokenizer_path``) and encode them.
4. Select records per type in drawn order until the type has ``share * T`` tokens, where
   ``T`` is the requested size in tokens, lowered when a type has too little data so that
   the shares still hold (a warning names the limiting type).
5. Difficulty in [0, 1]: generated problems carry their generator's level; natural text gets
   its percentile, within its type, of mean unigram surprisal per token.
6. Records are split train/val per type (an evenly spread ``val_fraction``), shuffled, and
   written as ordinary token shards (``<|eos|>`` after each record), so ``TokenShards`` and
   ``BatchLoader`` read a generated corpus like a prepared one. Beside them:
   ``mixture.json`` (shares asked and realised, per-type counts, dedup and skip counts) and
   ``records.jsonl.zst`` (per record: split, type, difficulty, source, licence, token span,
   problems), which ``MixtureIndex`` reads for online mixing and the curriculum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from swarmlm.atomic import atomic_write_text, current_umask
from swarmlm.data.content import (
    CONTENT_TYPES,
    Record,
    SkipStats,
    builtin_source,
    parse_shares,
    user_source,
)
from swarmlm.data.dedup import ExactDeduplicator, MinHashDeduplicator
from swarmlm.data.errors import DataError, EmptyCorpusError
from swarmlm.data.prepare import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VOCAB_SIZE,
    TOKENIZER_FILE,
    _check_out_dir,
    _install,
    _ShardWriter,
)
from swarmlm.data.problems import check_problem
from swarmlm.data.shards import META_FILE, CorpusMeta, SplitMeta
from swarmlm.data.tokenizer import Tokenizer, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "MIXTURE_FILE",
    "RECORDS_FILE",
    "GenerateReport",
    "generate_corpus",
    "read_mixture",
    "read_records",
]

MIXTURE_FILE = "mixture.json"
RECORDS_FILE = "records.jsonl.zst"
MIXTURE_FORMAT = 1
OVERSAMPLE = 1.25  # draw this much more than needed: dedup and token-exact selection eat some
ENCODE_BATCH = 512

ProgressFn = Callable[[str, int, int], None]


@dataclass
class GenerateReport:
    """What ``generate_corpus`` did (also written into ``mixture.json``)."""

    shares: dict[str, float]
    realised_shares: dict[str, float]
    tokens_by_type: dict[str, int]
    records_by_type: dict[str, int]
    drawn_by_type: dict[str, int]
    exact_duplicates_by_type: dict[str, int]
    near_duplicates_by_type: dict[str, int]
    problems_checked: int
    problems_passed: int
    skipped_files: dict[str, int]
    skipped_examples: dict[str, list[str]]
    limiting_type: str | None
    text_bytes: int
    total_tokens: int
    seconds: float
    sources: dict[str, list[str]] = field(default_factory=dict)

    @property
    def share_max_abs_err(self) -> float:
        return max(abs(self.realised_shares[t] - self.shares[t]) for t in self.shares)

    @property
    def dedup_removed_fraction(self) -> float:
        drawn = sum(self.drawn_by_type.values())
        removed = sum(self.exact_duplicates_by_type.values()) + sum(
            self.near_duplicates_by_type.values()
        )
        return removed / drawn if drawn else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shares": self.shares,
            "realised_shares": self.realised_shares,
            "share_max_abs_err": self.share_max_abs_err,
            "tokens_by_type": self.tokens_by_type,
            "records_by_type": self.records_by_type,
            "drawn_by_type": self.drawn_by_type,
            "exact_duplicates_by_type": self.exact_duplicates_by_type,
            "near_duplicates_by_type": self.near_duplicates_by_type,
            "dedup_removed_fraction": self.dedup_removed_fraction,
            "problems_checked": self.problems_checked,
            "problems_passed": self.problems_passed,
            "skipped_files": self.skipped_files,
            "skipped_examples": self.skipped_examples,
            "limiting_type": self.limiting_type,
            "text_bytes": self.text_bytes,
            "total_tokens": self.total_tokens,
            "seconds": self.seconds,
            "sources": self.sources,
        }


@dataclass
class _Kept:
    record: Record
    ids: list[int] = field(default_factory=list)
    difficulty: float = 0.0
    truncated: bool = False


def _sources_for(
    content_type: str,
    user: Mapping[str, Sequence[Path | str]],
    seed: int,
    skips: SkipStats,
    licences: Mapping[str, str],
) -> tuple[Iterator[Record], list[str]]:
    paths = list(user.get(content_type, ()))
    if not paths:
        return builtin_source(content_type, seed), ["builtin"]
    iters = [
        user_source(content_type, p, seed, skips, licence=licences.get(content_type)) for p in paths
    ]

    def chained() -> Iterator[Record]:
        for it in iters:
            yield from it

    return chained(), [str(p) for p in paths]


def _draw(
    shares: dict[str, float],
    size_bytes: int,
    seed: int,
    user: Mapping[str, Sequence[Path | str]],
    licences: Mapping[str, str],
    near_dup_threshold: float | None,
    skips: SkipStats,
    progress: ProgressFn | None,
) -> tuple[
    dict[str, list[_Kept]], dict[str, int], dict[str, int], dict[str, int], dict[str, list[str]]
]:
    exact = ExactDeduplicator()
    near = (
        MinHashDeduplicator(threshold=near_dup_threshold, seed=seed)
        if near_dup_threshold is not None
        else None
    )
    budgets = {t: int(s * size_bytes * OVERSAMPLE) for t, s in shares.items() if s > 0}
    kept: dict[str, list[_Kept]] = {t: [] for t in budgets}
    drawn = dict.fromkeys(budgets, 0)
    exact_d = dict.fromkeys(budgets, 0)
    near_d = dict.fromkeys(budgets, 0)
    sources: dict[str, list[str]] = {}
    iters: dict[str, Iterator[Record]] = {}
    for t in budgets:
        iters[t], sources[t] = _sources_for(t, user, seed, skips, licences)
    got = dict.fromkeys(budgets, 0)
    total = sum(budgets.values())
    live = list(budgets)
    # Round-robin over types so cross-type duplicates are attributed fairly, not by type order.
    while live:
        for t in list(live):
            rec = next(iters[t], None)
            if rec is None:
                logger.warning("content type %s: sources exhausted after %d bytes", t, got[t])
                live.remove(t)
                continue
            drawn[t] += 1
            if exact.is_duplicate(rec.text):
                exact_d[t] += 1
                continue
            if near is not None and near.is_duplicate(rec.text):
                near_d[t] += 1
                continue
            kept[t].append(_Kept(rec))
            got[t] += len(rec.text.encode("utf-8"))
            if got[t] >= budgets[t]:
                live.remove(t)
        if progress is not None:
            progress("draw", sum(min(got[t], budgets[t]) for t in budgets), total)
    return kept, drawn, exact_d, near_d, sources


def _difficulties(kept: dict[str, list[_Kept]], vocab: int) -> None:
    """Natural text: percentile within its type of mean unigram surprisal (corpus counts)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for items in kept.values():
        for k in items:
            if k.ids:
                counts += np.bincount(np.asarray(k.ids, dtype=np.int64), minlength=vocab)[:vocab]
    n = int(counts.sum())
    surprisal = -np.log((counts + 1.0) / (n + vocab))
    for items in kept.values():
        natural = [k for k in items if k.record.difficulty is None]
        for k in items:
            if k.record.difficulty is not None:
                k.difficulty = float(k.record.difficulty)
        if not natural:
            continue
        scores = np.array(
            [
                float(surprisal[np.asarray(k.ids, dtype=np.int64)].mean()) if k.ids else 0.0
                for k in natural
            ]
        )
        ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
        denom = max(1, len(natural) - 1)
        for k, r in zip(natural, ranks.tolist(), strict=True):
            k.difficulty = r / denom


def _select(
    kept: dict[str, list[_Kept]], shares: dict[str, float], target_tokens: int
) -> tuple[dict[str, list[_Kept]], str | None, int]:
    available = {t: sum(len(k.ids) + 1 for k in items) for t, items in kept.items()}
    total = target_tokens
    limiting = None
    for t in kept:
        if available[t] == 0:
            raise EmptyCorpusError(
                f"content type {t!r} (share {shares[t]:g}) has no usable records after "
                "deduplication and skips: give it a source or set its share to 0"
            )
        cap = int(available[t] / shares[t])
        if cap < total:
            total, limiting = cap, t
    if limiting is not None:
        logger.warning(
            "content type %s has only %d tokens: corpus lowered to %d tokens to keep the shares",
            limiting,
            available[limiting],
            total,
        )
    chosen: dict[str, list[_Kept]] = {}
    for t, items in kept.items():
        budget = shares[t] * total
        acc, out, rest = 0, [], []
        for k in items:
            n = len(k.ids) + 1
            if acc + n > budget:
                rest.append(k)
                continue
            out.append(k)
            acc += n
        # Top up with the head of the first record that did not fit: shares are then exact to
        # a token, whatever the record sizes (the cut is marked in the manifest).
        room = round(budget) - acc - 1
        if rest and room >= 1:
            k = rest[0]
            k.ids, k.truncated = k.ids[:room], True
            out.append(k)
        chosen[t] = out
    return chosen, limiting, total


def generate_corpus(
    out_dir: Path | str,
    *,
    size_mb: float = 8.0,
    shares: Mapping[str, float] | str | None = None,
    seed: int = 0,
    sources: Mapping[str, Sequence[Path | str]] | None = None,
    licences: Mapping[str, str] | None = None,
    vocab_size: int | None = None,
    tokenizer_path: Path | str | None = None,
    val_fraction: float = 0.02,
    near_dup_threshold: float | None = 0.8,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> GenerateReport:
    """Generate a corpus into ``out_dir`` (see the module docstring); returns the report.

    ``size_mb``: megabytes (1e6) of UTF-8 text wanted; ``shares`` by type (default the
    original design's); ``sources`` maps a type to user paths that replace its built-in
    sources; ``near_dup_threshold=None`` keeps exact dedup only.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    share_map = parse_shares(dict(shares) if isinstance(shares, Mapping) else shares)
    user = dict(sources or {})
    for t in user:
        if t not in CONTENT_TYPES:
            raise DataError(f"unknown content type {t!r} (known: {', '.join(CONTENT_TYPES)})")
    if not size_mb > 0 or math.isinf(size_mb):
        raise DataError(f"size_mb must be a positive number, got {size_mb}")
    if not 0.0 <= val_fraction < 0.5:
        raise DataError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    if vocab_size is not None and tokenizer_path is not None:
        raise DataError("give either vocab_size (train a tokenizer) or tokenizer_path, not both")
    if near_dup_threshold is not None and not 0.0 < near_dup_threshold < 1.0:
        raise DataError(f"near_dup_threshold must be in (0, 1), got {near_dup_threshold}")
    _check_out_dir(out_dir, overwrite)
    size_bytes = int(size_mb * 1e6)
    skips = SkipStats()
    kept, drawn, exact_d, near_d, used_sources = _draw(
        share_map, size_bytes, seed, user, licences or {}, near_dup_threshold, skips, progress
    )
    active = {t: s for t, s in share_map.items() if s > 0}
    checked = passed = 0
    for items in kept.values():
        for k in items:
            for p in k.record.problems:
                checked += 1
                passed += check_problem(p)
    if checked != passed:
        raise DataError(f"{checked - passed} of {checked} generated problems failed their check")

    if tokenizer_path is not None:
        tokenizer = Tokenizer.load(Path(tokenizer_path))
    else:
        texts = (k.record.text for items in kept.values() for k in items)
        tokenizer = Tokenizer.train(texts, vocab_size or DEFAULT_VOCAB_SIZE)
    flat = [k for items in kept.values() for k in items]
    for i in range(0, len(flat), ENCODE_BATCH):
        batch = flat[i : i + ENCODE_BATCH]
        for k, ids in zip(
            batch, tokenizer.encode_batch([k.record.text for k in batch]), strict=True
        ):
            k.ids = list(ids)
        if progress is not None:
            progress("encode", min(i + ENCODE_BATCH, len(flat)), len(flat))
    kept_bytes = sum(len(k.record.text.encode("utf-8")) for k in flat)
    kept_tokens = sum(len(k.ids) + 1 for k in flat)
    target_tokens = int(kept_tokens / max(kept_bytes, 1) * size_bytes)
    _difficulties(kept, tokenizer.vocab_size)
    chosen, limiting, _ = _select(kept, active, target_tokens)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        report = _write(
            staging,
            chosen,
            tokenizer,
            share_map,
            seed=seed,
            val_fraction=val_fraction,
            shard_tokens=shard_tokens,
            near=near_dup_threshold is not None,
        )
        report.drawn_by_type = {t: drawn.get(t, 0) for t in CONTENT_TYPES}
        report.exact_duplicates_by_type = {t: exact_d.get(t, 0) for t in CONTENT_TYPES}
        report.near_duplicates_by_type = {t: near_d.get(t, 0) for t in CONTENT_TYPES}
        report.problems_checked, report.problems_passed = checked, passed
        report.skipped_files = dict(skips.skipped)
        report.skipped_examples = dict(skips.examples)
        report.limiting_type = limiting
        report.sources = used_sources
        report.seconds = time.perf_counter() - start
        mixture = {
            "format_version": MIXTURE_FORMAT,
            "content_types": list(CONTENT_TYPES),
            "seed": seed,
            "size_mb": size_mb,
            **report.as_dict(),
        }
        atomic_write_text(staging / MIXTURE_FILE, json.dumps(mixture, indent=2))
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "generated %d tokens (%.1f MB of text) in %.1f s; share error %.4f",
        report.total_tokens,
        report.text_bytes / 1e6,
        report.seconds,
        report.share_max_abs_err,
    )
    return report


def _write(
    out: Path,
    chosen: dict[str, list[_Kept]],
    tokenizer: Tokenizer,
    shares: dict[str, float],
    *,
    seed: int,
    val_fraction: float,
    shard_tokens: int,
    near: bool,
) -> GenerateReport:
    # Evenly spread val_fraction of each type's records; at least one when the type has two.
    split_of: dict[int, str] = {}
    phi = random.Random(seed).random()
    for items in chosen.values():
        n_val = 0
        for j, k in enumerate(items):
            is_val = math.floor((j + 1) * val_fraction + phi) > math.floor(j * val_fraction + phi)
            split_of[id(k)] = "val" if is_val else "train"
            n_val += is_val
        if val_fraction > 0 and n_val == 0 and len(items) >= 2:
            split_of[id(items[-1])] = "val"
    order = [(t, k) for t, items in chosen.items() for k in items]
    random.Random(f"{seed}:order").shuffle(order)

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32).newbyteorder("<")
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens, mask=False) for s in ("train", "val")}
    counts = {s: {"bytes": 0, "docs": 0} for s in ("train", "val")}
    tokens_by_type = dict.fromkeys(CONTENT_TYPES, 0)
    records_by_type = dict.fromkeys(CONTENT_TYPES, 0)
    cctx = zstandard.ZstdCompressor(level=10)
    with open(out / RECORDS_FILE, "wb") as raw, cctx.stream_writer(raw) as manifest:
        try:
            for rid, (t, k) in enumerate(order):
                split = split_of[id(k)]
                w = writers[split]
                start = w.tokens
                arr = np.asarray([*k.ids, tokenizer.eos_id], dtype=dtype)
                w.write(arr, None)
                text = tokenizer.decode(k.ids) if k.truncated else k.record.text
                nbytes = len(text.encode("utf-8"))
                counts[split]["bytes"] += nbytes
                counts[split]["docs"] += 1
                tokens_by_type[t] += arr.size
                records_by_type[t] += 1
                entry = {
                    "id": rid,
                    "split": split,
                    "type": t,
                    "difficulty": round(k.difficulty, 6),
                    "source": k.record.source,
                    "licence": k.record.licence,
                    "start": start,
                    "tokens": int(arr.size),
                    "bytes": nbytes,
                    "sha1": hashlib.sha1(text.encode("utf-8")).hexdigest(),
                }
                if k.truncated:
                    entry["truncated"] = True
                if k.record.problems:
                    entry["problems"] = [p.as_dict() for p in k.record.problems]
                manifest.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
            shard_infos = {s: w.finish() for s, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
    total_tokens = sum(tokens_by_type.values())
    if total_tokens == 0:
        raise EmptyCorpusError("generated corpus is empty (no records selected)")
    tokenizer.save(out / TOKENIZER_FILE)
    meta = CorpusMeta(
        format="text",
        dtype="uint16" if dtype.itemsize == 2 else "uint32",
        vocab_size=tokenizer.vocab_size,
        tokenizer=TOKENIZER_FILE,
        tokenizer_sha256=sha256_file(out / TOKENIZER_FILE),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        seed=seed,
        val_fraction=val_fraction,
        max_unit_chars=0,
        minhash=near,
        splits={
            s: SplitMeta(
                tokens=writers[s].tokens,
                loss_tokens=writers[s].tokens,
                bytes=counts[s]["bytes"],
                documents=counts[s]["docs"],
                units=counts[s]["docs"],
                shards=shard_infos[s],
            )
            for s in ("train", "val")
        },
        stats={"records": len(order), "text_bytes": sum(c["bytes"] for c in counts.values())},
        replaced_bytes_by_file={},
        sources=["swarmlm data generate"],
    )
    atomic_write_text(out / META_FILE, meta.model_dump_json(indent=2))
    return GenerateReport(
        shares=shares,
        realised_shares={t: tokens_by_type[t] / total_tokens for t in CONTENT_TYPES},
        tokens_by_type=tokens_by_type,
        records_by_type=records_by_type,
        drawn_by_type={},
        exact_duplicates_by_type={},
        near_duplicates_by_type={},
        problems_checked=0,
        problems_passed=0,
        skipped_files={},
        skipped_examples={},
        limiting_type=None,
        text_bytes=sum(c["bytes"] for c in counts.values()),
        total_tokens=total_tokens,
        seconds=0.0,
    )


def read_mixture(data_dir: Path | str) -> dict[str, Any]:
    """``mixture.json`` of a generated corpus; a clear error for a prepared (non-mixed) one."""
    path = Path(data_dir) / MIXTURE_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: missing: {data_dir} was not written by `swarmlm data generate` "
            "(online mixing and the adaptive curriculum need a generated corpus)"
        )
    try:
        mix: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if mix.get("format_version") != MIXTURE_FORMAT:
        raise DataError(f"{path}: format_version {mix.get('format_version')!r} is not supported")
    return mix


def read_records(data_dir: Path | str) -> Iterator[dict[str, Any]]:
    """The provenance manifest, one dict per record (see the module docstring)."""
    path = Path(data_dir) / RECORDS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (not a generated corpus?)")
    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as raw, dctx.stream_reader(raw) as reader:
        buf = b""
        lineno = 0
        try:
            while chunk := reader.read(1 << 20):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    lineno += 1
                    yield json.loads(line)
        except (zstandard.ZstdError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: corrupt at record {lineno + 1}: {e}") from e
        if buf.strip():
            raise DataError(f"{path}: truncated (last record has no line end)")
