"""Reading preference files: the platform's export, TRL's formats, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmlm.rlhf.errors import PreferenceFormatError
from swarmlm.rlhf.preferences import (
    PreferencePair,
    read_preferences,
    tokenize_pairs,
    write_preferences,
)


def test_malformed_line_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path.write_text(f"{good}\n\n{good}\n{{not json\n")
    with pytest.raises(PreferenceFormatError, match=r"prefs\.jsonl line 4: invalid JSON"):
        read_preferences(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}, "'margin'"),
        (["p", "a", "b"], "expected a JSON object"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(obj) + "\n")
    with pytest.raises(PreferenceFormatError, match=message) as info:
        read_preferences(path)
    assert "bad.jsonl line 1" in str(info.value)


def test_missing_and_empty_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PreferenceFormatError, match="cannot read"):
        read_preferences(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceFormatError, match="no preference pairs"):
        read_preferences(tmp_path / "empty.jsonl")


def test_trl_conversational_and_implicit_prompt_formats_are_read(tmp_path: Path) -> None:
    path = tmp_path / "trl.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": "Say hi"}],
            "chosen": [{"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green", "margin": 2},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = read_preferences(path)
    assert pairs[0] == PreferencePair("Say hi", "Hi!", "No.")
    assert pairs[1] == PreferencePair("Q: sky? A: ", "blue", "green", margin=2.0)


def test_written_preferences_read_back_identically(tmp_path: Path) -> None:
    pairs = [PreferencePair("p", "good", "bad"), PreferencePair("q", "x", "y", margin=1.5)]
    path = tmp_path / "out" / "prefs.jsonl"
    assert write_preferences(pairs, path) == 2
    assert read_preferences(path) == pairs
    assert not list(path.parent.glob(".*tmp*"))


def test_tokenized_pairs_end_with_eos_and_keep_the_response_when_too_long() -> None:
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    pairs = [PreferencePair("abcdefgh", "xy", "zzz")]
    data = tokenize_pairs(pairs, encode, eos_id=1, pad_id=0, max_len=7)
    # responses + EOS take 3 and 4 tokens; the prompt keeps its last 3 tokens
    assert data.prompt_lengths.tolist() == [3]
    assert data.chosen_ids[0, : data.chosen_lengths[0]].tolist() == [*encode("fgh"), 120, 121, 1]
    assert data.rejected_ids[0].tolist() == [*encode("fgh"), 122, 122, 122, 1]
    assert data.chosen_lengths.tolist() == [6]
    assert data.rejected_lengths.tolist() == [7]
