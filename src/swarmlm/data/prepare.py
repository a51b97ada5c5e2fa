"""``prepare_corpus``: raw text -> deduplicated, tokenized, checksummed train/val token shards.

Pipeline (all streaming; memory is fixed buffers plus the dedup index, see ``dedup``):

1. ``discover_inputs`` expands files/directories; ``iter_units`` decodes and cuts documents
   into units (``sources``).
2. Exact duplicates (and, with ``minhash=True``, near duplicates) are dropped, the first
   occurrence kept. When a tokenizer is trained, this pass feeds ``Tokenizer.train`` and records
   each unit's keep/drop decision (one byte per unit) so the second pass need not re-hash.
3. Kept units are assigned to a split: unit ``j`` goes to validation when
   ``floor((j+1)*f + phi) > floor(j*f + phi)`` with ``phi`` drawn from ``seed``, i.e. an evenly
   spread, exact fraction ``f`` of units. The last unit is held back one step so that a
   non-empty corpus with ``f > 0`` and at least two units always has a validation split.
4. Units are encoded in batches with ``encode_batch`` (parallel over all cores in Rust) and
   appended to shard writers through fixed-size numpy buffers. Plain text: ``ids`` then
   ``<|eos|>`` after a document's last unit. SFT: ``<|bos|> prompt target <|eos|>`` with a
   parallel uint8 loss mask (1 on target and ``<|eos|>``).
5. Everything is written into a staging directory beside ``out_dir`` and renamed into place
   at the end, so a crash never leaves a half-written corpus under ``out_dir``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.typing import NDArray

from swarmlm.atomic import atomic_write_text, current_umask
from swarmlm.data.dedup import ExactDeduplicator, MinHashDeduplicator
from swarmlm.data.errors import DataError, EmptyCorpusError
from swarmlm.data.shards import META_FILE, CorpusMeta, ShardInfo, SplitMeta
from swarmlm.data.sources import (
    DEFAULT_MAX_UNIT_CHARS,
    Format,
    InputFile,
    ReadStats,
    TextUnit,
    discover_inputs,
    iter_units,
)
from swarmlm.data.tokenizer import Tokenizer, sha256_file

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SHARD_TOKENS", "DEFAULT_VOCAB_SIZE", "ProgressFn", "prepare_corpus"]

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB per uint16 shard
WRITE_BUFFER_TOKENS = 1 << 20
ENCODE_BATCH_CHARS = 1 << 20  # text handed to one encode_batch call
TOKENIZER_FILE = "tokenizer.json"

ProgressFn = Callable[[str, int, int], None]
"""progress(phase, on-disk bytes done, on-disk bytes total); phases "tokenizer", "tokenize"."""


class _ShardWriter:
    """Appends token ids (and SFT loss masks) to ``<split>_NNNNN.bin`` files of fixed capacity."""

    def __init__(
        self, out_dir: Path, split: str, dtype: np.dtype[np.generic], shard_tokens: int, mask: bool
    ) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self._buf = np.empty(min(WRITE_BUFFER_TOKENS, shard_tokens), dtype=dtype)
        self._mask = np.empty(self._buf.size, dtype=np.uint8) if mask else None
        self._n = 0
        self._in_shard = 0
        self._files: tuple[IO[bytes], IO[bytes] | None] | None = None
        self._sha: tuple[hashlib._Hash, hashlib._Hash] | None = None
        self.shards: list[ShardInfo] = []
        self.tokens = 0

    def _name(self, ext: str) -> str:
        return f"{self.split}_{len(self.shards):05d}.{ext}"

    def write(self, tokens: NDArray[np.generic], mask: NDArray[np.uint8] | None) -> None:
        pos = 0
        while pos < tokens.size:
            room = min(self._buf.size - self._n, self.shard_tokens - self._in_shard - self._n)
            take = min(room, tokens.size - pos)
            self._buf[self._n : self._n + take] = tokens[pos : pos + take]
            if self._mask is not None:
                assert mask is not None
                self._mask[self._n : self._n + take] = mask[pos : pos + take]
            self._n += take
            pos += take
            if self._n == self._buf.size or self._in_shard + self._n == self.shard_tokens:
                self._flush()
        self.tokens += tokens.size

    def _flush(self) -> None:
        if self._n == 0:
            return
        if self._files is None:
            tok_f = open(self.out_dir / self._name("bin"), "wb")  # noqa: SIM115
            mask_f = (
                open(self.out_dir / self._name("mask"), "wb")  # noqa: SIM115
                if self._mask is not None
                else None
            )
            self._files = (tok_f, mask_f)
            self._sha = (hashlib.sha256(), hashlib.sha256())
        assert self._sha is not None
        data = self._buf[: self._n].tobytes()
        self._files[0].write(data)
        self._sha[0].update(data)
        if self._mask is not None and self._files[1] is not None:
            mdata = self._mask[: self._n].tobytes()
            self._files[1].write(mdata)
            self._sha[1].update(mdata)
        self._in_shard += self._n
        self._n = 0
        if self._in_shard == self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._files is not None
        assert self._sha is not None
        for fh in self._files:
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        has_mask = self._files[1] is not None
        self.shards.append(
            ShardInfo(
                file=self._name("bin"),
                tokens=self._in_shard,
                sha256=self._sha[0].hexdigest(),
                mask_file=self._name("mask") if has_mask else None,
                mask_sha256=self._sha[1].hexdigest() if has_mask else None,
            )
        )
        self._files, self._sha, self._in_shard = None, None, 0

    def finish(self) -> list[ShardInfo]:
        self._flush()
        if self._files is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._files is not None:
            for fh in self._files:
                if fh is not None:
                    fh.close()


@dataclass
class _SplitCounts:
    loss_tokens: int = 0
    bytes: int = 0
    documents: int = 0
    units: int = 0


class _Dedup:
    """Exact then (optionally) near-duplicate filter; counts what it drops."""

    def __init__(self, minhash: bool, threshold: float, seed: int) -> None:
        self.exact = ExactDeduplicator()
        self.near = MinHashDeduplicator(threshold=threshold, seed=seed) if minhash else None
        self.exact_dropped = 0
        self.near_dropped = 0

    def keep(self, unit: TextUnit) -> bool:
        key = f"{unit.prompt}\x00{unit.text}" if unit.prompt else unit.text
        if self.exact.is_duplicate(key):
            self.exact_dropped += 1
            return False
        if self.near is not None and self.near.is_duplicate(unit.prompt + unit.text):
            self.near_dropped += 1
            return False
        return True


def _validate_args(
    vocab_size: int | None,
    tokenizer_path: Path | None,
    val_fraction: float,
    shard_tokens: int,
    fmt: str,
) -> None:
    if vocab_size is not None and tokenizer_path is not None:
        raise DataError("give either vocab_size (train a tokenizer) or tokenizer_path, not both")
    if not 0.0 <= val_fraction < 1.0 or math.isnan(val_fraction):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if fmt not in ("text", "sft"):
        raise DataError(f"format must be 'text' or 'sft', got {fmt!r}")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"output {out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise DataError(f"output {out_dir}: directory is not empty (pass overwrite to replace)")


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished staging directory to ``out_dir`` with renames only."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out_dir)


def prepare_corpus(
    inputs: Sequence[Path | str],
    out_dir: Path | str,
    *,
    vocab_size: int | None = None,
    tokenizer_path: Path | str | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    minhash: bool = False,
    minhash_threshold: float = 0.8,
    fmt: Format = "text",
    max_unit_chars: int = DEFAULT_MAX_UNIT_CHARS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> CorpusMeta:
    """Prepare a corpus for ``TokenShards``/``BatchLoader``; returns the written ``meta.json``.

    With neither ``vocab_size`` nor ``tokenizer_path`` a BPE tokenizer of ``DEFAULT_VOCAB_SIZE``
    is trained on the (deduplicated) inputs. Raises ``EmptyCorpusError`` when nothing usable
    remains, ``InputFormatError`` naming file:line for malformed input, ``DataError`` for bad
    arguments or a non-empty ``out_dir`` without ``overwrite``.
    """
    out_dir = Path(out_dir)
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else None
    _validate_args(vocab_size, tok_path, val_fraction, shard_tokens, fmt)
    files = discover_inputs([Path(p) for p in inputs])
    if not files:
        raise EmptyCorpusError(
            f"no .txt/.md/.jsonl input files found in {', '.join(str(p) for p in inputs)}"
        )
    _check_out_dir(out_dir, overwrite)
    tokenizer = Tokenizer.load(tok_path) if tok_path is not None else None
    total_bytes = sum(f.size for f in files)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        meta = _prepare_into(
            files,
            staging,
            tokenizer=tokenizer,
            tokenizer_source=tok_path,
            vocab_size=vocab_size or DEFAULT_VOCAB_SIZE,
            val_fraction=val_fraction,
            seed=seed,
            minhash=minhash,
            minhash_threshold=minhash_threshold,
            fmt=fmt,
            max_unit_chars=max_unit_chars,
            shard_tokens=shard_tokens,
            total_bytes=total_bytes,
            progress=progress,
            sources=[str(p) for p in inputs],
        )
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def _prepare_into(
    files: list[InputFile],
    out: Path,
    *,
    tokenizer: Tokenizer | None,
    tokenizer_source: Path | None,
    vocab_size: int,
    val_fraction: float,
    seed: int,
    minhash: bool,
    minhash_threshold: float,
    fmt: Format,
    max_unit_chars: int,
    shard_tokens: int,
    total_bytes: int,
    progress: ProgressFn | None,
    sources: list[str],
) -> CorpusMeta:
    keep_flags: bytearray | None = None
    pass1_dedup: _Dedup | None = None

    def reporter(phase: str) -> Callable[[int], None] | None:
        if progress is None:
            return None
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            progress(phase, done[0], total_bytes)

        return on_bytes

    if tokenizer is None:
        flags = bytearray()
        stats1 = ReadStats()
        dedup1 = pass1_dedup = _Dedup(minhash, minhash_threshold, seed)

        def training_texts() -> Iterator[str]:
            units = iter_units(
                files,
                stats1,
                fmt=fmt,
                max_unit_chars=max_unit_chars,
                on_bytes=reporter("tokenizer"),
            )
            for unit in units:
                keep = dedup1.keep(unit)
                flags.append(keep)
                if keep:
                    yield unit.prompt + unit.text if unit.prompt else unit.text

        tokenizer = Tokenizer.train(training_texts(), vocab_size)
        if not any(flags):
            raise _empty_error(files, stats1, dedup1)
        keep_flags = flags
        tokenizer.save(out / TOKENIZER_FILE)
    elif tokenizer_source is not None:
        shutil.copyfile(tokenizer_source, out / TOKENIZER_FILE)

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32).newbyteorder("<")
    stats = ReadStats()
    dedup = _Dedup(minhash, minhash_threshold, seed)
    writers = {
        split: _ShardWriter(out, split, dtype, shard_tokens, mask=fmt == "sft")
        for split in ("train", "val")
    }
    counts = {split: _SplitCounts() for split in ("train", "val")}
    units = iter_units(
        files, stats, fmt=fmt, max_unit_chars=max_unit_chars, on_bytes=reporter("tokenize")
    )
    try:
        for batch in _batches(_assign_splits(_kept(units, dedup, keep_flags), val_fraction, seed)):
            _encode_and_write(batch, tokenizer, writers, counts, dtype, fmt)
        shards = {split: w.finish() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if keep_flags is not None and stats.units != len(keep_flags):
        raise DataError(
            f"inputs changed while preparing: {len(keep_flags)} units in the first pass, "
            f"{stats.units} in the second"
        )
    decided_by = pass1_dedup if pass1_dedup is not None else dedup  # pass 1 decided when run
    exact_dropped, near_dropped = decided_by.exact_dropped, decided_by.near_dropped
    if writers["train"].tokens + writers["val"].tokens == 0:
        raise _empty_error(files, stats, decided_by)
    if val_fraction > 0 and writers["val"].tokens == 0:
        logger.warning("corpus has a single unit: no validation split was written")

    tok_file = out / TOKENIZER_FILE
    if not tok_file.exists():
        tokenizer.save(tok_file)
    meta = CorpusMeta(
        format=fmt,
        dtype="uint16" if dtype.itemsize == 2 else "uint32",
        vocab_size=tokenizer.vocab_size,
        tokenizer=TOKENIZER_FILE,
        tokenizer_sha256=sha256_file(tok_file),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        seed=seed,
        val_fraction=val_fraction,
        max_unit_chars=max_unit_chars,
        minhash=minhash,
        splits={
            split: SplitMeta(
                tokens=writers[split].tokens,
                loss_tokens=counts[split].loss_tokens,
                bytes=counts[split].bytes,
                documents=counts[split].documents,
                units=counts[split].units,
                shards=shards[split],
            )
            for split in ("train", "val")
        },
        stats={
            "files": stats.files,
            "input_bytes": total_bytes,
            "documents": stats.documents,
            "empty_documents": stats.empty_documents,
            "units": stats.units,
            "exact_duplicates_removed": exact_dropped,
            "near_duplicates_removed": near_dropped,
            "replaced_bytes": stats.replaced_bytes,
        },
        replaced_bytes_by_file=stats.replaced_by_file,
        sources=sources,
    )
    atomic_write_text(out / META_FILE, meta.model_dump_json(indent=2))
    logger.info(
        "prepared %d train / %d val tokens from %d documents (%d exact, %d near duplicates "
        "removed, %d bytes replaced)",
        writers["train"].tokens,
        writers["val"].tokens,
        stats.documents,
        exact_dropped,
        near_dropped,
        stats.replaced_bytes,
    )
    return meta


def _empty_error(files: list[InputFile], stats: ReadStats, dedup: _Dedup) -> EmptyCorpusError:
    names = ", ".join(str(f.path) for f in files[:5]) + (" ..." if len(files) > 5 else "")
    return EmptyCorpusError(
        f"empty corpus: {len(files)} file(s) ({names}) hold no usable text "
        f"({stats.empty_documents} empty documents, {dedup.exact_dropped} exact and "
        f"{dedup.near_dropped} near duplicates)"
    )


def _kept(units: Iterator[TextUnit], dedup: _Dedup, flags: bytearray | None) -> Iterator[TextUnit]:
    for i, unit in enumerate(units):
        if flags is not None:
            if i >= len(flags):
                raise DataError("inputs changed while preparing: more units than in pass 1")
            if flags[i]:
                yield unit
        elif dedup.keep(unit):
            yield unit


def _assign_splits(
    units: Iterator[TextUnit], val_fraction: float, seed: int
) -> Iterator[tuple[TextUnit, str]]:
    phi = float(np.random.default_rng(seed).random())
    pending: tuple[TextUnit, str] | None = None
    j = 0
    n_val = 0
    for unit in units:
        if pending is not None:
            yield pending
        is_val = math.floor((j + 1) * val_fraction + phi) > math.floor(j * val_fraction + phi)
        pending = (unit, "val" if is_val else "train")
        n_val += is_val
        j += 1
    if pending is not None:
        if val_fraction > 0 and n_val == 0 and j > 1:
            pending = (pending[0], "val")
        yield pending


def _batches(
    items: Iterator[tuple[TextUnit, str]],
) -> Iterator[list[tuple[TextUnit, str]]]:
    batch: list[tuple[TextUnit, str]] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item[0].text) + len(item[0].prompt)
        if chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_and_write(
    batch: list[tuple[TextUnit, str]],
    tokenizer: Tokenizer,
    writers: dict[str, _ShardWriter],
    counts: dict[str, _SplitCounts],
    dtype: np.dtype[np.generic],
    fmt: Format,
) -> None:
    targets = tokenizer.encode_batch([u.text for u, _ in batch])
    prompts = tokenizer.encode_batch([u.prompt for u, _ in batch]) if fmt == "sft" else None
    eos = tokenizer.eos_id
    for i, (unit, split) in enumerate(batch):
        c = counts[split]
        c.units += 1
        c.documents += unit.doc_end
        c.bytes += len(unit.text.encode("utf-8", "surrogatepass"))
        if prompts is None:
            ids = targets[i] + [eos] if unit.doc_end else targets[i]
            writers[split].write(np.asarray(ids, dtype=dtype), None)
            c.loss_tokens += len(ids)
        else:
            head = [tokenizer.bos_id, *prompts[i]]
            tail = [*targets[i], eos]
            mask = np.concatenate(
                [np.zeros(len(head), dtype=np.uint8), np.ones(len(tail), dtype=np.uint8)]
            )
            writers[split].write(np.asarray(head + tail, dtype=dtype), mask)
            c.loss_tokens += len(tail)
