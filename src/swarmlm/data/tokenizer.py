"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with swarmlm's three special tokens.

Contract: ids 0, 1, 2 are ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` for a tokenizer trained here; a
loaded tokenizer may place them anywhere but must have all three. Encoding is lossless for any
Unicode text (``decode(encode(t)) == t``) and never produces a special id from raw text: a
literal ``<|eos|>`` in a document is encoded as ordinary bytes, so data cannot forge control
tokens. The file format is the standard ``tokenizer.json``, loadable by ``transformers``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from swarmlm.atomic import atomic_write_text
from swarmlm.data.errors import TokenizerError

logger = logging.getLogger(__name__)

__all__ = ["BOS", "EOS", "MIN_VOCAB_SIZE", "PAD", "SPECIAL_TOKENS", "Tokenizer", "sha256_file"]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
# Three specials plus the 256 byte symbols: the smallest vocabulary that can encode any text.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in fixed blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """Thin typed wrapper over ``tokenizers.Tokenizer``; construct with ``train`` or ``load``."""

    def __init__(self, hf: HFTokenizer, *, source: str = "<memory>") -> None:
        ids: list[int] = []
        for token in SPECIAL_TOKENS:
            tid = hf.token_to_id(token)
            if tid is None:
                raise TokenizerError(
                    f"tokenizer {source}: lacks the special token {token!r} "
                    f"(swarmlm needs {', '.join(SPECIAL_TOKENS)})"
                )
            ids.append(tid)
        hf.encode_special_tokens = True  # raw text can never yield a control token
        self._hf = hf
        self.bos_id, self.eos_id, self.pad_id = ids
        self.source = source

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on a stream of texts (memory grows with distinct words only).

        The result may have fewer than ``vocab_size`` entries when the corpus allows fewer merges.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise TokenizerError(
                f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        tok = cls(hf, source="<trained>")
        if tok.vocab_size < vocab_size:
            logger.warning(
                "tokenizer: corpus allowed only %d of the %d requested tokens",
                tok.vocab_size,
                vocab_size,
            )
        return tok

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Load a ``tokenizer.json``; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer {path}: no such file")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"tokenizer {path}: not a valid tokenizer.json: {e}") from e
        return cls(hf, source=str(path))

    def save(self, path: Path | str) -> None:
        """Write ``tokenizer.json`` atomically (temporary file in the same directory, renamed)."""
        atomic_write_text(Path(path), self.to_json())

    def to_json(self) -> str:
        """The canonical ``tokenizer.json`` text (equal for a saved and re-loaded tokenizer)."""
        return str(self._hf.to_str())

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; every id is < vocab_size."""
        return int(self._hf.get_vocab_size(with_added_tokens=True))

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (e.g. for ``transformers`` wrapping)."""
        return self._hf

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added."""
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel on all cores (the Rust side releases the GIL)."""
        encodings = self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens=False``."""
        return str(self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens))
