"""The data package's exception family: every message names the file, shard, field or split."""

from __future__ import annotations

__all__ = [
    "CorruptShardError",
    "DataError",
    "EmptyCorpusError",
    "InputFormatError",
    "TokenizerError",
]


class DataError(ValueError):
    """Base class: bad input or output of the data pipeline (never a bug in the caller)."""


class InputFormatError(DataError):
    """An input file is missing, of an unsupported type, or malformed (message names file:line)."""


class EmptyCorpusError(DataError):
    """The inputs hold no usable text (after decoding, filtering and deduplication)."""


class TokenizerError(DataError):
    """A tokenizer file is unreadable or lacks what swarmlm needs (message names the file)."""


class CorruptShardError(DataError):
    """A prepared shard or meta.json fails its size or checksum check (message names the file)."""
