"""Byte-level BPE: lossless round trips, special tokens, identical save/load."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.data import Tokenizer, TokenizerError
from swarmlm.data.tokenizer import MIN_VOCAB_SIZE


@pytest.fixture(scope="module")
def tok(small_tokenizer: Path) -> Tokenizer:
    return Tokenizer.load(small_tokenizer)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_unicode_text_round_trips(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_have_fixed_ids_and_raw_text_cannot_forge_them(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = tok.encode("end <|eos|> of <|bos|> text <|pad|>")
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == "end <|eos|> of <|bos|> text <|pad|>"
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
    assert tok.decode([tok.eos_id], skip_special_tokens=False) == "<|eos|>"


def test_training_learns_merges_up_to_the_requested_size(
    tok: Tokenizer, docs: Callable[..., list[str]]
) -> None:
    assert tok.vocab_size == 400
    text = docs(1, seed=999)[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2  # merges compress common words


def test_saved_tokenizer_loads_back_identically(
    tok: Tokenizer, tmp_path: Path, docs: Callable[..., list[str]]
) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.to_json() == tok.to_json()
    texts = [*docs(5, seed=4), "ünïcödé ✓ 🚀\n\t"]
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert [tok.encode(t) for t in texts] == tok.encode_batch(texts)
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temporary behind


def test_load_errors_name_the_file_and_the_missing_token(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"absent\.json: no such file"):
        Tokenizer.load(tmp_path / "absent.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(TokenizerError, match=r"garbage\.json: not a valid tokenizer\.json"):
        Tokenizer.load(garbage)
    spec = json.loads(tok.to_json())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|pad|>"]
    del spec["model"]["vocab"]["<|pad|>"]
    nopad = tmp_path / "nopad.json"
    nopad.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"nopad.json: lacks the special token '<\|pad\|>'"):
        Tokenizer.load(nopad)


def test_vocab_smaller_than_bytes_plus_specials_is_refused() -> None:
    with pytest.raises(TokenizerError, match=f"at least {MIN_VOCAB_SIZE}"):
        Tokenizer.train(["abc"], vocab_size=MIN_VOCAB_SIZE - 1)
