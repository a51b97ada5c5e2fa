"""Data pipeline: raw text -> tokenizer -> checksummed token shards -> training batches.

The trainer's whole interface::

    from swarmlm.data import Tokenizer, TokenShards, BatchLoader, prepare_corpus, eval_batches

See docs/data.md for formats, guarantees and operations.
"""

from swarmlm.data.errors import (
    CorruptShardError,
    DataError,
    EmptyCorpusError,
    InputFormatError,
    TokenizerError,
)
from swarmlm.data.loader import IGNORE_INDEX, BatchLoader, bits_per_byte, eval_batches
from swarmlm.data.prepare import DEFAULT_VOCAB_SIZE, prepare_corpus
from swarmlm.data.shards import CorpusMeta, TokenShards
from swarmlm.data.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "IGNORE_INDEX",
    "BatchLoader",
    "CorpusMeta",
    "CorruptShardError",
    "DataError",
    "EmptyCorpusError",
    "InputFormatError",
    "TokenShards",
    "Tokenizer",
    "TokenizerError",
    "bits_per_byte",
    "eval_batches",
    "prepare_corpus",
]
