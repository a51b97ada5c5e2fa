"""Reading raw corpora: files and directories of .txt/.md/.jsonl, optionally gzip/zstd-compressed.

Everything streams in fixed-size blocks (``READ_BLOCK_BYTES``) so memory does not grow with file
size. Text is decoded as UTF-8 (a leading BOM is dropped); undecodable bytes become U+FFFD and
are counted per file (``ReadStats.replaced_bytes``), never fatal.

Documents and units. A ``.txt``/``.md`` file is one document; a ``.jsonl`` record (its ``text``
field) is one document. Each document is cut into *units* of at most ``max_unit_chars``
characters, preferably after a blank line (paragraph), else after a line end, else anywhere (a
single enormous line). A unit is the granule of deduplication and of the train/validation split;
concatenating a document's units gives back its text exactly. ``TextUnit.doc_end`` marks the last
unit of a document, after which the token stream gets an end-of-sequence token.

Supervised fine-tuning (``fmt="sft"``): each non-empty line of a ``.txt``/``.md`` file is one
example ``prompt|target`` split at the first ``|`` (``I like to cook in the |kitchen``); a
``.jsonl`` record carries ``prompt`` and ``target`` string fields. One example is one unit.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, cast

import zstandard

from swarmlm.data.errors import InputFormatError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_UNIT_CHARS",
    "MAX_RECORD_CHARS",
    "TEXT_SUFFIXES",
    "InputFile",
    "ReadStats",
    "TextUnit",
    "discover_inputs",
    "iter_units",
]

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
_COMPRESSIONS: dict[str, Literal["gzip", "zstd"]] = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
READ_BLOCK_BYTES = 1 << 20
DEFAULT_MAX_UNIT_CHARS = 16_384
# A single JSONL record is held in memory whole; beyond this it is an error, not an OOM.
MAX_RECORD_CHARS = 64 * 1024 * 1024

Format = Literal["text", "sft"]


@dataclass(frozen=True)
class InputFile:
    """One input file: what it holds (``kind``) and how it is compressed."""

    path: Path
    kind: Literal["text", "jsonl"]
    compression: Literal["gzip", "zstd"] | None
    size: int  # bytes on disk (compressed size for compressed files)


@dataclass(frozen=True)
class TextUnit:
    """A piece of a document (or one SFT example).

    For ``fmt="text"`` the loss covers all of ``text`` and ``prompt`` is empty. For ``fmt="sft"``
    ``prompt`` is conditioning only (no loss) and ``text`` is the target.
    """

    text: str
    doc_end: bool
    source: str  # "path" or "path:line", for log and error messages
    prompt: str = ""


@dataclass
class ReadStats:
    """Counters filled while reading; ``replaced_by_file`` names every file with bad UTF-8."""

    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    units: int = 0
    replaced_bytes: int = 0
    replaced_by_file: dict[str, int] = field(default_factory=dict)


def _classify(path: Path) -> tuple[Literal["text", "jsonl"], Literal["gzip", "zstd"] | None] | None:
    name = path.name.lower()
    compression: Literal["gzip", "zstd"] | None = None
    for suffix, comp in _COMPRESSIONS.items():
        if name.endswith(suffix):
            compression = comp
            name = name[: -len(suffix)]
            break
    if name.endswith(".jsonl"):
        return "jsonl", compression
    if name.endswith((".txt", ".md")):
        return "text", compression
    return None


def discover_inputs(paths: Sequence[Path]) -> list[InputFile]:
    """Expand files and directories (recursively, sorted, hidden entries skipped) into inputs.

    A file named explicitly must have a supported suffix; files of other types found inside a
    directory are skipped with a debug log. Raises InputFormatError naming a missing path or an
    unsupported explicit file.
    """
    found: list[InputFile] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputFormatError(f"input {path}: no such file or directory")
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    child = Path(root) / name
                    cls = _classify(child)
                    if cls is None:
                        logger.debug(
                            "skipping %s: not .txt/.md/.jsonl (optionally .gz/.zst)", child
                        )
                        continue
                    found.append(InputFile(child, cls[0], cls[1], child.stat().st_size))
        else:
            cls = _classify(path)
            if cls is None:
                raise InputFormatError(
                    f"input {path}: unsupported file type (expected .txt, .md or .jsonl, "
                    "optionally compressed as .gz or .zst)"
                )
            found.append(InputFile(path, cls[0], cls[1], path.stat().st_size))
    return found


class _CountingReader(io.RawIOBase):
    """Passes reads through and reports on-disk bytes consumed (for progress in MB/s)."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        if self._on_bytes is not None and n:
            self._on_bytes(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextlib.contextmanager
def _open_binary(f: InputFile, on_bytes: Callable[[int], None] | None) -> Iterator[IO[bytes]]:
    """The decompressed byte stream of ``f``; closes the file and the decompressor on exit."""
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(open(f.path, "rb"))
        raw = stack.enter_context(_CountingReader(fh, on_bytes))
        stream: IO[bytes]
        if f.compression == "gzip":
            stream = cast(IO[bytes], stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        elif f.compression == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(
                cast(IO[bytes], raw), read_across_frames=True, closefd=False
            )
            stream = cast(IO[bytes], stack.enter_context(reader))
        else:
            stream = stack.enter_context(io.BufferedReader(raw, buffer_size=READ_BLOCK_BYTES))
        yield stream


# Undecodable bytes are replaced (like errors="replace") and counted in a per-thread counter.
_replace_counter = threading.local()
_ERROR_HANDLER = "swarmlm-count-replace"


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _replace_counter.n = getattr(_replace_counter, "n", 0) + (exc.end - exc.start)
    return "\ufffd", exc.end


codecs.register_error(_ERROR_HANDLER, _count_and_replace)


def _iter_lines(
    f: InputFile,
    stats: ReadStats,
    on_bytes: Callable[[int], None] | None,
    *,
    max_line_chars: int,
    cut_long_lines: bool,
) -> Iterator[str]:
    """Yield the decoded file as lines ending in "\\n" (the last may lack it).

    Lines longer than ``max_line_chars`` are cut into pieces when ``cut_long_lines`` else raise.
    Only "\\n" separates lines (JSON strings may legally hold U+2028 and friends).
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=_ERROR_HANDLER)
    replaced = 0
    pending = ""
    lineno = 0
    try:
        with _open_binary(f, on_bytes) as stream:
            while True:
                try:
                    block = stream.read(READ_BLOCK_BYTES)
                except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
                    raise InputFormatError(
                        f"input {f.path}: cannot decompress/read ({f.compression or 'plain'}): {e}"
                    ) from e
                # The generator may resume on another thread: count per decode call.
                before = getattr(_replace_counter, "n", 0)
                text = decoder.decode(block, final=not block)
                replaced += getattr(_replace_counter, "n", 0) - before
                if text:
                    pieces = (pending + text).split("\n")
                    pending = pieces.pop()
                    for piece in pieces:
                        lineno += 1
                        yield from _bounded(piece + "\n", f, lineno, max_line_chars, cut_long_lines)
                    if len(pending) > max_line_chars:
                        if not cut_long_lines:
                            raise InputFormatError(
                                f"input {f.path}:{lineno + 1}: line longer than "
                                f"{max_line_chars} characters"
                            )
                        cut = len(pending) - len(pending) % max_line_chars
                        yield from _bounded(pending[:cut], f, lineno, max_line_chars, True)
                        pending = pending[cut:]
                if not block:
                    break
            if pending:
                yield from _bounded(pending, f, lineno + 1, max_line_chars, cut_long_lines)
    finally:
        if replaced:
            stats.replaced_bytes += replaced
            stats.replaced_by_file[str(f.path)] = replaced
            logger.warning(
                "%s: replaced %d undecodable (non-UTF-8) bytes with U+FFFD", f.path, replaced
            )


def _bounded(line: str, f: InputFile, lineno: int, max_chars: int, cut: bool) -> Iterator[str]:
    if len(line) <= max_chars:
        yield line
        return
    if not cut:
        raise InputFormatError(f"input {f.path}:{lineno}: line longer than {max_chars} characters")
    for start in range(0, len(line), max_chars):
        yield line[start : start + max_chars]


def _segment(lines: Iterator[str], max_chars: int, source: str) -> Iterator[TextUnit]:
    """Group lines into units of <= max_chars, cutting after a blank line when one is buffered.

    Precondition: every line is <= max_chars. The last unit carries ``doc_end=True``.
    """
    buf: list[str] = []
    size = 0
    last_break = 0  # buf[:last_break] ends right after a blank line
    for line in lines:
        while buf and size + len(line) > max_chars:
            cut = last_break if last_break > 0 else len(buf)
            yield TextUnit("".join(buf[:cut]), False, source)
            buf = buf[cut:]
            size = sum(len(x) for x in buf)
            last_break = 0
        buf.append(line)
        size += len(line)
        if not line.strip():
            last_break = len(buf)
    if buf:  # never empty after a line was seen: the last line is always appended
        yield TextUnit("".join(buf), True, source)


def _split_keep_newlines(text: str) -> Iterator[str]:
    start = 0
    while True:
        end = text.find("\n", start)
        if end < 0:
            if start < len(text):
                yield text[start:]
            return
        yield text[start : end + 1]
        start = end + 1


def _text_units(
    f: InputFile, stats: ReadStats, on_bytes: Callable[[int], None] | None, max_chars: int
) -> Iterator[TextUnit]:
    if f.kind == "text":
        lines = _iter_lines(f, stats, on_bytes, max_line_chars=max_chars, cut_long_lines=True)
        yield from _document(_segment(lines, max_chars, str(f.path)), stats)
        return
    for lineno, line in enumerate(
        _iter_lines(f, stats, on_bytes, max_line_chars=MAX_RECORD_CHARS, cut_long_lines=False),
        start=1,
    ):
        if not line.strip():
            continue
        record = _json_record(f, lineno, line)
        text = record.get("text")
        if not isinstance(text, str):
            raise InputFormatError(
                f"input {f.path}:{lineno}: record has no string field 'text' "
                f"(keys: {sorted(record)[:10]})"
            )
        pieces = (
            piece
            for line_piece in _split_keep_newlines(text)
            for piece in _bounded(line_piece, f, lineno, max_chars, True)
        )
        yield from _document(_segment(pieces, max_chars, f"{f.path}:{lineno}"), stats)


def _document(units: Iterator[TextUnit], stats: ReadStats) -> Iterator[TextUnit]:
    """Count the document; drop it (as empty) when all of it is whitespace."""
    held: list[TextUnit] = []
    nonblank = False
    for unit in units:
        if nonblank:
            stats.units += 1
            yield unit
            continue
        held.append(unit)
        if unit.text.strip():
            nonblank = True
            stats.documents += 1
            stats.units += len(held)
            yield from held
            held.clear()
    if not nonblank:
        stats.empty_documents += 1


def _json_record(f: InputFile, lineno: int, line: str) -> dict[str, object]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputFormatError(f"input {f.path}:{lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(record, dict):
        raise InputFormatError(f"input {f.path}:{lineno}: expected a JSON object per line")
    return record


def _sft_units(
    f: InputFile, stats: ReadStats, on_bytes: Callable[[int], None] | None
) -> Iterator[TextUnit]:
    lines = _iter_lines(f, stats, on_bytes, max_line_chars=MAX_RECORD_CHARS, cut_long_lines=False)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = f"{f.path}:{lineno}"
        if f.kind == "jsonl":
            record = _json_record(f, lineno, line)
            prompt, target = record.get("prompt"), record.get("target")
            if not isinstance(prompt, str) or not isinstance(target, str):
                raise InputFormatError(
                    f"input {source}: SFT record needs string fields 'prompt' and 'target'"
                )
        else:
            body = line[:-1] if line.endswith("\n") else line
            body = body[:-1] if body.endswith("\r") else body
            if "|" not in body:
                raise InputFormatError(
                    f"input {source}: SFT line has no '|' between prompt and target "
                    "(expected e.g. 'I like to cook in the |kitchen')"
                )
            prompt, target = body.split("|", 1)
        if not target.strip():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        stats.units += 1
        yield TextUnit(target, True, source, prompt=prompt)


def iter_units(
    files: Sequence[InputFile],
    stats: ReadStats,
    *,
    fmt: Format = "text",
    max_unit_chars: int = DEFAULT_MAX_UNIT_CHARS,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[TextUnit]:
    """Stream the units of all files in order; fills ``stats`` as it goes.

    ``on_bytes(n)`` is called with on-disk bytes consumed (progress reporting).
    """
    if max_unit_chars < 1:
        raise ValueError(f"max_unit_chars must be >= 1, got {max_unit_chars}")
    for f in files:
        stats.files += 1
        if fmt == "sft":
            yield from _sft_units(f, stats, on_bytes)
        else:
            yield from _text_units(f, stats, on_bytes, max_unit_chars)
