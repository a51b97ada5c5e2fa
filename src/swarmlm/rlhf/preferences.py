"""Preference pairs: reading ``{"prompt", "chosen", "rejected"}`` JSONL and tokenising it.

Accepted line formats (one JSON object per line, blank lines skipped):

* the curation platform's export and TRL's explicit-prompt format:
  ``{"prompt": str, "chosen": str, "rejected": str}``;
* TRL's conversational format: ``prompt`` a list of ``{"role", "content"}`` messages and
  ``chosen`` / ``rejected`` lists of assistant messages; contents are joined with newlines;
* TRL's implicit-prompt format: only ``chosen`` and ``rejected`` (each a full text); the prompt
  is their longest common prefix.

Extra keys (``id``, ``margin``, metadata) are allowed; a numeric ``margin`` is kept for the
Bradley-Terry loss. Any malformed line raises :class:`PreferenceFormatError` naming file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from swarmlm.atomic import atomic_open
from swarmlm.rlhf.errors import PreferenceFormatError

MAX_PREFERENCE_FILE_BYTES = 1 << 30


@dataclass(frozen=True)
class PreferencePair:
    """One human judgement: ``chosen`` is preferred to ``rejected`` as a reply to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


def _text(value: Any, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value
    ):
        return "\n".join(str(m["content"]) for m in value)
    raise PreferenceFormatError(
        f"{where}: field {field!r} must be a string or a list of {{'role', 'content'}} "
        f"messages, got {type(value).__name__}"
    )


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def parse_preference_line(line: str, where: str) -> PreferencePair:
    """One JSONL line -> a pair; ``where`` (``file line N``) prefixes every error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PreferenceFormatError(
            f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    if not isinstance(obj, dict):
        raise PreferenceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise PreferenceFormatError(f"{where}: missing field {key!r}")
    chosen = _text(obj["chosen"], "chosen", where)
    rejected = _text(obj["rejected"], "rejected", where)
    if "prompt" in obj:
        prompt = _text(obj["prompt"], "prompt", where)
    else:  # implicit prompt: the shared beginning of both texts
        prompt = _common_prefix(chosen, rejected)
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    if not chosen or not rejected:
        raise PreferenceFormatError(f"{where}: 'chosen' and 'rejected' must be non-empty")
    if chosen == rejected:
        raise PreferenceFormatError(f"{where}: 'chosen' and 'rejected' are identical")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise PreferenceFormatError(f"{where}: field 'margin' must be a number")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=float(margin))


def parse_preferences(lines: Iterable[str], source: str = "<jsonl>") -> list[PreferencePair]:
    pairs = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            pairs.append(parse_preference_line(line, f"{source} line {lineno}"))
    return pairs


def read_preferences(path: Path) -> list[PreferencePair]:
    """Every pair of a JSONL file; an empty file is an error (nothing to learn from)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PreferenceFormatError(f"cannot read preference file {path}: {exc}") from exc
    if size > MAX_PREFERENCE_FILE_BYTES:
        raise PreferenceFormatError(f"{path} is {size} bytes, over {MAX_PREFERENCE_FILE_BYTES}")
    try:
        with path.open(encoding="utf-8") as fh:
            pairs = parse_preferences(fh, str(path))
    except UnicodeDecodeError as exc:
        raise PreferenceFormatError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not pairs:
        raise PreferenceFormatError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def write_preferences(pairs: Iterable[PreferencePair], path: Path) -> int:
    """Write pairs as JSONL atomically (temp file + rename); returns the line count."""
    rows = [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        | ({"margin": p.margin} if p.margin else {})
        for p in pairs
    ]
    return write_jsonl_atomic(rows, path)


def write_jsonl_atomic(rows: Sequence[dict[str, Any]], path: Path) -> int:
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return len(rows)


@dataclass
class TokenizedPairs:
    """Right-padded token batches for chosen and rejected sequences (prompt + response).

    ``*_ids`` are (n, seq) long tensors padded with ``pad_id``; ``*_lengths`` (n,) count real
    tokens; ``*_prompt_lengths`` (n,) count the prompt's tokens, so response tokens are at
    positions ``prompt_len .. length - 1``. ``margins`` is (n,) float.
    """

    chosen_ids: Tensor
    chosen_lengths: Tensor
    rejected_ids: Tensor
    rejected_lengths: Tensor
    prompt_lengths: Tensor
    margins: Tensor

    def __len__(self) -> int:
        return int(self.chosen_ids.shape[0])

    def select(self, index: Tensor) -> TokenizedPairs:
        return TokenizedPairs(
            self.chosen_ids[index],
            self.chosen_lengths[index],
            self.rejected_ids[index],
            self.rejected_lengths[index],
            self.prompt_lengths[index],
            self.margins[index],
        )


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(n, max_len) ids padded on the right, and (n,) lengths."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    encode: Any,
    *,
    eos_id: int,
    pad_id: int,
    max_len: int,
    bos_id: int | None = None,
) -> TokenizedPairs:
    """Tokenise prompt and responses separately (so the response boundary is exact) and end
    each response with ``eos_id``. Sequences longer than ``max_len`` keep their end: the prompt
    is cut from the left, since the reward is read at the last token."""
    if not pairs:
        raise PreferenceFormatError("no preference pairs to tokenise")
    chosen: list[list[int]] = []
    rejected: list[list[int]] = []
    prompt_lens: list[int] = []
    for pair in pairs:
        prompt = ([bos_id] if bos_id is not None else []) + list(encode(pair.prompt))
        c = [*encode(pair.chosen), eos_id]
        r = [*encode(pair.rejected), eos_id]
        longest = max(len(c), len(r))
        if longest >= max_len:  # responses alone fill the window: keep their heads
            c, r = c[: max_len - 1], r[: max_len - 1]
            longest = max_len - 1
        keep_prompt = max(1, min(len(prompt), max_len - longest)) if prompt else 0
        prompt = prompt[len(prompt) - keep_prompt :]
        chosen.append(prompt + c)
        rejected.append(prompt + r)
        prompt_lens.append(len(prompt))
    c_ids, c_len = right_pad(chosen, pad_id)
    r_ids, r_len = right_pad(rejected, pad_id)
    return TokenizedPairs(
        c_ids,
        c_len,
        r_ids,
        r_len,
        torch.tensor(prompt_lens, dtype=torch.long),
        torch.tensor([p.margin for p in pairs], dtype=torch.float32),
    )
