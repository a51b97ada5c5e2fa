"""Prepared corpora on disk: ``meta.json`` plus raw token shards read through ``numpy.memmap``.

Layout of a data directory (written by ``prepare_corpus``)::

    meta.json            CorpusMeta (below): dtype, counts, bytes, per-shard sha256
    tokenizer.json       the tokenizer that produced the ids
    train_00000.bin ...  little-endian uint16 (vocab <= 65536) or uint32 token ids
    train_00000.mask     (SFT only) uint8, 1 where the token is a target (loss counted)
    val_00000.bin ...

A split is the concatenation of its shards in order. ``TokenShards.open`` checks every file's
size and sha256 before anything is read, and names the file at fault.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import ConfigDict, Field, ValidationError, field_validator

from swarmlm.config import StrictModel
from swarmlm.data.cache import ByteCache
from swarmlm.data.codecs import ChunkedReader, resolve_codec, write_chunked
from swarmlm.data.errors import CorruptShardError, DataError
from swarmlm.data.tokenizer import Tokenizer, sha256_file

logger = logging.getLogger(__name__)

__all__ = ["META_FILE", "CorpusMeta", "ShardInfo", "SplitMeta", "TokenShards"]

META_FILE = "meta.json"
FORMAT_VERSION = 1
Split = Literal["train", "val"]


class _Manifest(StrictModel):
    """A part of ``meta.json``: strict like every model of outside input, and frozen
    because a manifest read from disk is never edited in place."""

    model_config = ConfigDict(frozen=True)


def _bare_file_name(name: str | None) -> str | None:
    """Files named in meta.json must live in the data directory itself: a data directory
    received from someone else must not make us open paths elsewhere."""
    if name is not None and (
        not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
    ):
        raise ValueError(f"{name!r} is not a plain file name inside the data directory")
    return name


_SHA256 = r"^[0-9a-f]{64}$"


class ShardInfo(_Manifest):
    """One shard file (and its loss mask for SFT data)."""

    file: str
    tokens: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256)
    mask_file: str | None = None
    mask_sha256: str | None = Field(default=None, pattern=_SHA256)
    # None: raw little-endian ids (memmapped). Otherwise a chunked compressed file (codecs.py)
    # of ``file_bytes`` bytes whose sha256 is ``sha256``; ids are read through a chunk cache.
    codec: str | None = None
    file_bytes: int | None = Field(default=None, ge=0)

    _check_names = field_validator("file", "mask_file")(_bare_file_name)


class SplitMeta(_Manifest):
    """Counts of one split. ``bytes`` are raw UTF-8 bytes of the text whose tokens carry loss.

    bits per byte = mean loss (nats/token) * loss_tokens / bytes / ln 2. For plain text
    ``loss_tokens == tokens``; for SFT only target tokens (and their end-of-sequence) count.
    """

    tokens: int = Field(ge=0)
    loss_tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    documents: int = Field(ge=0)
    units: int = Field(ge=0)
    shards: list[ShardInfo]


class CorpusMeta(_Manifest):
    """Contents of ``meta.json``."""

    format_version: int = FORMAT_VERSION
    format: Literal["text", "sft"]
    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(gt=0)
    tokenizer: str  # file name inside the data directory
    tokenizer_sha256: str = Field(pattern=_SHA256)
    bos_id: int
    eos_id: int
    pad_id: int
    seed: int
    val_fraction: float
    max_unit_chars: int
    minhash: bool
    splits: dict[str, SplitMeta]
    stats: dict[str, int]
    replaced_bytes_by_file: dict[str, int]
    sources: list[str]

    _check_tokenizer = field_validator("tokenizer")(_bare_file_name)

    @classmethod
    def read(cls, data_dir: Path) -> CorpusMeta:
        """Parse ``data_dir/meta.json``; errors name the file and the field."""
        path = Path(data_dir) / META_FILE
        if not path.is_file():
            raise DataError(f"{path}: no meta.json (run `swarmlm data prepare` first)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptShardError(f"{path}: not valid JSON: {e}") from e
        try:
            meta = cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CorruptShardError(f"{path}: field {where!r}: {first['msg']}") from e
        if meta.format_version != FORMAT_VERSION:
            raise DataError(
                f"{path}: format_version {meta.format_version} is not supported "
                f"(this swarmlm reads {FORMAT_VERSION})"
            )
        return meta


def _verify_file(path: Path, expected_bytes: int, expected_sha: str) -> None:
    if not path.is_file():
        raise CorruptShardError(f"shard {path}: missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise CorruptShardError(
            f"shard {path}: size {size} bytes, meta.json says {expected_bytes} (truncated?)"
        )
    actual = sha256_file(path)
    if actual != expected_sha:
        raise CorruptShardError(
            f"shard {path}: sha256 {actual[:16]}... does not match meta.json "
            f"{expected_sha[:16]}... (corrupted)"
        )


DEFAULT_CHUNK_CACHE_BYTES = 64 << 20


class _CompressedTokens:
    """Slicing view of a compressed shard: ``view[a:b]`` decodes only the chunks needed."""

    def __init__(self, reader: ChunkedReader, dtype: np.dtype[Any]) -> None:
        self.reader, self.dtype = reader, dtype

    def __getitem__(self, sl: slice) -> NDArray[Any]:
        size = self.dtype.itemsize
        data = self.reader.read(sl.start * size, (sl.stop - sl.start) * size)
        return np.frombuffer(data, dtype=self.dtype)


def compress_corpus(
    data_dir: Path | str, codec: str = "auto", *, chunk_bytes: int = 1 << 18
) -> dict[str, str]:
    """Rewrite a data directory's raw token shards as chunked compressed files in place;
    returns {shard file: codec chosen}. ``auto`` measures the codecs on each shard's first
    chunk. Masks (SFT) stay raw. ``meta.json`` is rewritten last (atomically), so an
    interrupted run leaves a readable corpus (new files are written beside the old)."""
    from swarmlm.atomic import atomic_write_text

    data_dir = Path(data_dir)
    meta = CorpusMeta.read(data_dir)
    chosen: dict[str, str] = {}
    splits = {}
    old_files = []
    for name, info in meta.splits.items():
        shards = []
        for sh in info.shards:
            if sh.codec is not None or not sh.tokens:
                shards.append(sh)
                continue
            src = data_dir / sh.file
            raw = src.read_bytes()
            if sha256_bytes(raw) != sh.sha256:
                raise CorruptShardError(f"shard {src}: sha256 does not match meta.json")
            c = resolve_codec(codec, raw[:chunk_bytes])
            dst_name = f"{Path(sh.file).stem}.{c}.swz"
            size = write_chunked(data_dir / dst_name, raw, c, chunk_bytes=chunk_bytes)
            chosen[sh.file] = c
            old_files.append(src)
            shards.append(
                sh.model_copy(
                    update={
                        "file": dst_name,
                        "sha256": sha256_file(data_dir / dst_name),
                        "codec": c,
                        "file_bytes": size,
                    }
                )
            )
        splits[name] = info.model_copy(update={"shards": shards})
    new_meta = meta.model_copy(update={"splits": splits})
    atomic_write_text(data_dir / META_FILE, new_meta.model_dump_json(indent=2))
    for f in old_files:
        f.unlink()
    return chosen


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class TokenShards:
    """One split of a prepared corpus as a single random-access token array (memmapped)."""

    def __init__(
        self, data_dir: Path, split: Split, meta: CorpusMeta, chunk_cache: ByteCache | None = None
    ) -> None:
        self.data_dir = data_dir
        self.split = split
        self.meta = meta
        info = meta.splits[split]
        self.info = info
        self.dtype = np.dtype(meta.dtype).newbyteorder("<")
        self._chunk_cache = chunk_cache
        self._readers: list[ChunkedReader] = []
        self._tokens: list[Any] = []
        for s in info.shards:
            if not s.tokens:
                self._tokens.append(None)
            elif s.codec is None:
                self._tokens.append(np.memmap(data_dir / s.file, dtype=self.dtype, mode="r"))
            else:
                reader = ChunkedReader(data_dir / s.file, chunk_cache)
                self._readers.append(reader)
                self._tokens.append(_CompressedTokens(reader, self.dtype))
        self._masks = [
            np.memmap(data_dir / s.mask_file, dtype=np.uint8, mode="r")
            if s.mask_file and s.tokens
            else None
            for s in info.shards
        ]
        self.has_loss_mask = meta.format == "sft"
        counts = np.array([s.tokens for s in info.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = int(self._starts[-1])

    @classmethod
    def open(
        cls,
        data_dir: Path | str,
        split: Split = "train",
        *,
        verify: bool = True,
        chunk_cache: ByteCache | None = None,
    ) -> TokenShards:
        """Open a split; with ``verify`` (default) check every shard's size and sha256 first.

        Compressed shards are read through ``chunk_cache`` (default: a 64 MiB LRU of their
        own); each chunk's crc32 is checked whenever it is decompressed."""
        data_dir = Path(data_dir)
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        meta = CorpusMeta.read(data_dir)
        info = meta.splits.get(split)
        if info is None or info.tokens == 0:
            raise DataError(
                f"{data_dir}: split {split!r} is empty (prepared with "
                f"val_fraction={meta.val_fraction})"
            )
        itemsize = np.dtype(meta.dtype).itemsize
        if sum(s.tokens for s in info.shards) != info.tokens:
            raise CorruptShardError(f"{data_dir / META_FILE}: shard token counts do not add up")
        if verify:
            for s in info.shards:
                size = s.file_bytes if s.codec is not None else s.tokens * itemsize
                _verify_file(data_dir / s.file, size or 0, s.sha256)
                if meta.format == "sft":
                    if s.mask_file is None or s.mask_sha256 is None:
                        raise CorruptShardError(f"shard {data_dir / s.file}: SFT shard has no mask")
                    _verify_file(data_dir / s.mask_file, s.tokens, s.mask_sha256)
        if chunk_cache is None and any(s.codec for s in info.shards):
            chunk_cache = ByteCache(DEFAULT_CHUNK_CACHE_BYTES, "lru", name=f"shards-{split}")
        return cls(data_dir, split, meta, chunk_cache)

    @property
    def bytes(self) -> int:
        """Raw UTF-8 bytes of the loss-carrying text of this split (for bits per byte)."""
        return self.info.bytes

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.meta.tokenizer

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer that produced these ids (its sha256 is checked against meta.json)."""
        path = self.tokenizer_path
        if not path.is_file() or sha256_file(path) != self.meta.tokenizer_sha256:
            raise CorruptShardError(f"tokenizer {path}: missing or sha256 differs from meta.json")
        return Tokenizer.load(path)

    def __len__(self) -> int:
        return self.num_tokens

    def _gather(
        self,
        arrays: list[np.memmap | None],
        start: int,
        length: int,
        dtype: type[np.generic],
        out: NDArray[np.generic] | None = None,
    ) -> NDArray[np.generic]:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"{self.split}: window [{start}, {start + length}) outside 0..{self.num_tokens}"
            )
        if out is None:
            out = np.empty(length, dtype=dtype)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            arr = arrays[shard]
            local = start + filled - int(self._starts[shard])
            take = min(length - filled, int(self._starts[shard + 1]) - (start + filled))
            if take > 0:
                assert arr is not None
                out[filled : filled + take] = arr[local : local + take]
                filled += take
            shard += 1
        return out

    def read(self, start: int, length: int) -> NDArray[np.int64]:
        """Tokens ``[start, start + length)`` of the split as int64, across shard boundaries."""
        return self._gather(self._tokens, start, length, np.int64)  # type: ignore[return-value]

    def read_into(self, start: int, out: NDArray[np.int64]) -> NDArray[np.int64]:
        """Like ``read(start, len(out))`` but into ``out`` (1-D int64): no allocation."""
        if out.ndim != 1 or out.dtype != np.int64:
            raise DataError(f"read_into needs a 1-D int64 array, got {out.dtype} {out.shape}")
        return self._gather(self._tokens, start, out.shape[0], np.int64, out)  # type: ignore[return-value]

    def read_mask(self, start: int, length: int) -> NDArray[np.bool_] | None:
        """Loss mask for the same range (True = loss counted), or None for plain text."""
        if not self.has_loss_mask:
            return None
        return self._gather(self._masks, start, length, np.bool_)  # type: ignore[return-value]
