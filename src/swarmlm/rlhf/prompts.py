"""Prompt files for PPO and sampling: plain text (one prompt a line) or JSONL objects with a
``prompt`` (or ``content`` / ``text``) string; the curation task format works as is."""

from __future__ import annotations

import json
from pathlib import Path

from swarmlm.rlhf.errors import PreferenceFormatError


def read_prompts(path: Path) -> list[str]:
    """Prompts of a file; errors name the file and line. ``.jsonl`` files are JSON lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PreferenceFormatError(f"cannot read prompts file {path}: {exc}") from exc
    prompts: list[str] = []
    is_jsonl = path.suffix.lower() in (".jsonl", ".json")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append(line)
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PreferenceFormatError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise PreferenceFormatError(f"{where}: expected a JSON object")
        for key in ("prompt", "content", "text"):
            if isinstance(obj.get(key), str):
                prompts.append(obj[key])
                break
        else:
            raise PreferenceFormatError(f"{where}: needs a string field 'prompt' or 'content'")
    if not prompts:
        raise PreferenceFormatError(f"{path}: no prompts")
    return prompts
