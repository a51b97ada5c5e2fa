"""The eight content types of a generated corpus and the sources that fill them offline.

A source is an iterator of :class:`Record` for one content type, drawn in a seeded order, so
that taking records until a byte budget is met gives a seeded random sample. Built-in
sources need nothing but this package and the Python installation that runs it:

================  ==========================================================================
type              built-in sources (licence)
================  ==========================================================================
technical         docstrings of the Python standard library, per module (PSF-2.0)
scientific        numpy's docstrings (BSD-3-Clause) and kinematics / unit problems (generated)
code              Python standard library source, cut at top-level definitions (PSF-2.0)
mathematics       arithmetic, linear equations, gcd, modular powers, sequences, sum
                  identities with induction proofs (generated, checked)
philosophy        KJV wisdom books and epistles (public domain) and logic problems:
                  propositional formulas, syllogisms, knights and knaves (generated, checked)
creative          KJV narrative, poetry and prophetic books (public domain)
conversational    user/assistant dialogues built from generated problems and stdlib docstrings
multilingual      French, German, Spanish number words and word problems (generated; thin)
================  ==========================================================================

Generated text carries the licence ``CC0-1.0`` (it is ours and we waive it). User sources
(``user_source``) replace the built-in ones of their type: folders of text files, JSONL with
a ``text`` field (optional ``licence``/``source`` fields), or a Hugging Face dataset saved
with ``save_to_disk`` (needs the ``datasets`` package). Binary and non-UTF-8 files in a
folder are skipped and counted, never decoded into garbage.
"""

from __future__ import annotations

import ast
import functools
import gzip
import json
import logging
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from swarmlm.data.errors import DataError, InputFormatError
from swarmlm.data.multilingual import multilingual_arithmetic
from swarmlm.data.problems import KINDS_BY_TYPE, Problem, check_problem, generate_problem

logger = logging.getLogger(__name__)

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_SHARES",
    "GENERATED_LICENCE",
    "Record",
    "SkipStats",
    "builtin_source",
    "parse_shares",
    "user_source",
]

CONTENT_TYPES = (
    "technical",
    "scientific",
    "code",
    "mathematics",
    "philosophy",
    "creative",
    "conversational",
    "multilingual",
)
# The original design's mixture (fractions of the corpus's tokens).
DEFAULT_SHARES: dict[str, float] = {
    "technical": 0.20,
    "scientific": 0.15,
    "code": 0.15,
    "mathematics": 0.10,
    "philosophy": 0.08,
    "creative": 0.12,
    "conversational": 0.10,
    "multilingual": 0.10,
}
GENERATED_LICENCE = "CC0-1.0"
MAX_RECORD_CHARS = 6000
SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Record:
    """One document of the corpus with its provenance.

    ``difficulty`` in [0, 1] is set by problem generators; ``None`` for natural text, whose
    difficulty is computed after tokenization (percentile of unigram surprisal within type).
    """

    text: str
    content_type: str
    source: str
    licence: str
    difficulty: float | None = None
    problems: tuple[Problem, ...] = ()


@dataclass
class SkipStats:
    """Files a user source skipped, by reason (``binary``, ``non_utf8``, ``empty``)."""

    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: Path) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(str(path))
        logger.warning("skipping %s: %s", path, reason.replace("_", "-"))


def parse_shares(spec: dict[str, float] | str | None) -> dict[str, float]:
    """Validated shares over ``CONTENT_TYPES`` (missing types get 0).

    ``spec`` is a dict or ``"technical=0.2,code=0.3,..."``; ``None`` gives ``DEFAULT_SHARES``.
    Raises ``DataError`` naming an unknown type, a negative or non-number share, or a sum
    other than 1.
    """
    if spec is None:
        return dict(DEFAULT_SHARES)
    if isinstance(spec, str):
        parsed: dict[str, float] = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise DataError(f"shares: {part!r} is not TYPE=FRACTION")
            key, text = part.split("=", 1)
            try:
                parsed[key.strip()] = float(text)
            except ValueError:
                raise DataError(
                    f"shares: {key.strip()!r} has a non-number share {text!r}"
                ) from None
        spec = parsed
    shares = {t: 0.0 for t in CONTENT_TYPES}
    for name, raw in spec.items():
        value = float(raw)
        if name not in shares:
            raise DataError(f"unknown content type {name!r} (known: {', '.join(CONTENT_TYPES)})")
        if not value >= 0.0:  # also catches NaN
            raise DataError(f"share of {name!r} must be >= 0, got {value}")
        shares[name] = value
    total = sum(shares.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise DataError(
            f"shares must sum to 1, they sum to {total:.6g} "
            f"({', '.join(f'{k}={v:g}' for k, v in shares.items() if v)})"
        )
    return shares


# ---- chunking ------------------------------------------------------------------------------


def chunk_text(text: str, max_chars: int = MAX_RECORD_CHARS) -> list[str]:
    """Cut ``text`` into pieces of <= max_chars, preferably at blank lines, else line ends."""
    pieces: list[str] = []
    buf: list[str] = []
    size = 0
    for para in re.split(r"(?<=\n\n)", text):
        while len(para) > max_chars:  # an enormous paragraph: cut at line ends, else anywhere
            cut = para.rfind("\n", 0, max_chars) + 1 or max_chars
            if buf:
                pieces.append("".join(buf))
                buf, size = [], 0
            pieces.append(para[:cut])
            para = para[cut:]
        if size + len(para) > max_chars and buf:
            pieces.append("".join(buf))
            buf, size = [], 0
        buf.append(para)
        size += len(para)
    if buf:
        pieces.append("".join(buf))
    return [p for p in pieces if p.strip()]


# ---- Python standard library and numpy ----------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _python_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(files) if f.endswith(".py"))
    return found


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def numpy_root() -> Path | None:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return Path(numpy.__file__).parent


def _read_python(path: Path) -> tuple[str, ast.Module] | None:
    try:
        source = path.read_text(encoding="utf-8")
        return source, ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
        return None


def _module_name(path: Path, root: Path, prefix: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([prefix, *parts] if prefix else parts)


def _docstring_doc(module: str, tree: ast.Module) -> str:
    """Module, class and function docstrings as a reference page (public names only)."""
    lines: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        lines.append(f"Module {module}\n\n{doc}\n")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("_"):
                continue
            d = ast.get_docstring(node)
            if d:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                lines.append(f"{module}.{node.name} ({kind})\n\n{d}\n")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        sd = ast.get_docstring(sub)
                        if sd and not sub.name.startswith("_"):
                            lines.append(f"{module}.{node.name}.{sub.name} (method)\n\n{sd}\n")
    return "\n".join(lines)


@functools.lru_cache(maxsize=4096)
def _docstring_page(path: Path, root: Path, prefix: str) -> tuple[str, str] | None:
    """(module name, reference page) of one file; cached: parsing is most of the cost and the
    technical and conversational sources read the same files."""
    parsed = _read_python(path)
    if parsed is None:
        return None
    module = _module_name(path, root, prefix)
    return module, _docstring_doc(module, parsed[1])


def _docstring_records(
    root: Path, prefix: str, content_type: str, licence: str, rng: random.Random
) -> Iterator[Record]:
    files = _python_files(root)
    rng.shuffle(files)
    for path in files:
        page = _docstring_page(path, root, prefix)
        if page is None:
            continue
        module, text = page
        for i, piece in enumerate(chunk_text(text)):
            yield Record(piece, content_type, f"{prefix or 'python'}-docs:{module}#{i}", licence)


def _code_records(root: Path, rng: random.Random) -> Iterator[Record]:
    files = _python_files(root)
    rng.shuffle(files)
    for path in files:
        parsed = _read_python(path)
        if parsed is None:
            continue
        source, tree = parsed
        lines = source.splitlines(keepends=True)
        # Cut at top-level statements so a record never starts inside a definition.
        starts = sorted(
            {0, *(n.lineno - 1 - len(getattr(n, "decorator_list", [])) for n in tree.body)}
        )
        blocks = [
            "".join(lines[a:b]) for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)
        ]
        rel = path.relative_to(root).as_posix()
        buf: list[str] = []
        size = part = 0
        for block in blocks:
            if size + len(block) > MAX_RECORD_CHARS and buf:
                yield Record("".join(buf), "code", f"python-stdlib:{rel}#{part}", "PSF-2.0")
                buf, size, part = [], 0, part + 1
            for piece in chunk_text(block) if len(block) > MAX_RECORD_CHARS else [block]:
                buf.append(piece)
                size += len(piece)
        if buf and "".join(buf).strip():
            yield Record("".join(buf), "code", f"python-stdlib:{rel}#{part}", "PSF-2.0")


# ---- KJV ------------------------------------------------------------------------------------

KJV_PATH = Path(__file__).resolve().parents[3] / "data" / "kjv.txt.gz"
_WISDOM = {"Job", "Psa", "Prv", "Eccl"}
_EPISTLES = {
    "Rom", "1Cor", "2Cor", "Gal", "Eph", "Phi", "Col", "1Th", "2Th", "1Tim", "2Tim",
    "Titus", "Phmn", "Heb", "Jas", "1Pet", "2Pet", "1Jn", "2Jn", "3Jn", "Jude",
}  # fmt: skip
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


@functools.lru_cache(maxsize=2)
def kjv_chapters(path: Path = KJV_PATH) -> list[tuple[str, int, str]]:
    """(book, chapter, text) of the bundled KJV, in order; raises if the file is missing."""
    if not path.is_file():
        raise InputFormatError(f"bundled corpus {path}: missing (reinstall swarmlm from source)")
    chapters: dict[tuple[str, int], list[str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            m = _VERSE.match(line.rstrip("\n"))
            if m:
                chapters.setdefault((m.group(1), int(m.group(2))), []).append(m.group(4))
    return [(b, c, f"{b} {c}\n\n" + "\n".join(v) + "\n") for (b, c), v in chapters.items()]


def _kjv_records(content_type: str, rng: random.Random) -> Iterator[Record]:
    chapters = kjv_chapters()
    if content_type == "philosophy":
        chosen = [c for c in chapters if c[0] in _WISDOM | _EPISTLES]
    else:
        chosen = [c for c in chapters if c[0] not in _WISDOM | _EPISTLES]
    rng.shuffle(chosen)  # a new list: the cached one is never reordered
    for book, chapter, text in chosen:
        for i, piece in enumerate(chunk_text(text)):
            yield Record(piece, content_type, f"kjv:{book}{chapter}#{i}", "public-domain")


# ---- generated problems -------------------------------------------------------------------


def _problem_sets(content_type: str, rng: random.Random) -> Iterator[Record]:
    """Worksheets of 4-8 problems of one difficulty level (one record each, forever).

    Several problems per record keep templated problems from looking like near-duplicates
    of each other."""
    kinds = KINDS_BY_TYPE.get(content_type, ())
    n = 0
    while True:
        level = rng.random()
        probs = []
        for _ in range(rng.randint(4, 8)):
            if content_type == "multilingual":
                p = multilingual_arithmetic(rng, level)
            else:
                p = generate_problem(rng.choice(kinds), rng, level)
            probs.append(p)
        text = "".join(f"{i + 1}. " + p.as_text() + "\n" for i, p in enumerate(probs))
        yield Record(
            text,
            content_type,
            f"generated:{content_type}#{n}",
            GENERATED_LICENCE,
            level,
            tuple(probs),
        )
        n += 1


def _dialogues(rng: random.Random) -> Iterator[Record]:
    """User/assistant conversations: problems explained step by step, and API questions
    answered from stdlib docstrings, interleaved."""
    docs = _docstring_records(
        stdlib_root(), "", "technical", "PSF-2.0", random.Random(rng.random())
    )
    n = 0
    all_kinds = [k for kinds in KINDS_BY_TYPE.values() for k in kinds]
    while True:
        turns = []
        level = rng.random()
        probs = []
        for _ in range(rng.randint(2, 4)):
            p = generate_problem(rng.choice(all_kinds), rng, level)
            probs.append(p)
            turns.append(f"User: {p.question}\nAssistant: {p.solution} The answer is {p.answer}.\n")
        doc = next(docs, None)
        licence = GENERATED_LICENCE
        if doc is not None:
            head, _, body = doc.text.partition("\n\n")
            name = head.split(" (")[0].removeprefix("Module ")
            first = body.split("\n\n")[0].strip()
            if first:
                turns.append(f"User: What does {name} do in Python?\nAssistant: {first}\n")
                licence = f"{GENERATED_LICENCE} AND PSF-2.0"
        rng.shuffle(turns)
        yield Record(
            "\n".join(turns),
            "conversational",
            f"generated:dialogue#{n}",
            licence,
            level,
            tuple(probs),
        )
        n += 1


def _interleave(*sources: Iterator[Record], rng: random.Random) -> Iterator[Record]:
    live = list(sources)
    while live:
        src = rng.choice(live)
        rec = next(src, None)
        if rec is None:
            live.remove(src)
        else:
            yield rec


def builtin_source(content_type: str, seed: int) -> Iterator[Record]:
    """The built-in records of ``content_type`` in a seeded order (may be finite)."""
    rng = random.Random(f"{seed}:{content_type}")
    if content_type == "technical":
        return _docstring_records(stdlib_root(), "", "technical", "PSF-2.0", rng)
    if content_type == "code":
        return _code_records(stdlib_root(), rng)
    if content_type == "scientific":
        np_root = numpy_root()
        problems = _problem_sets("scientific", random.Random(rng.random()))
        if np_root is None:  # pragma: no cover
            return problems
        docs = _docstring_records(np_root, "numpy", "scientific", "BSD-3-Clause", rng)
        return _interleave(docs, problems, rng=random.Random(rng.random()))
    if content_type == "mathematics":
        return _problem_sets("mathematics", rng)
    if content_type == "philosophy":
        return _interleave(
            _kjv_records("philosophy", rng),
            _problem_sets("philosophy", random.Random(rng.random())),
            rng=random.Random(rng.random()),
        )
    if content_type == "creative":
        return _kjv_records("creative", rng)
    if content_type == "conversational":
        return _dialogues(rng)
    if content_type == "multilingual":
        return _problem_sets("multilingual", rng)
    raise DataError(f"unknown content type {content_type!r} (known: {', '.join(CONTENT_TYPES)})")


# ---- user sources ---------------------------------------------------------------------------

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _decode_file(path: Path, skips: SkipStats) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        skips.skip("binary", path)
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        skips.skip("non_utf8", path)
        return None
    if not text.strip():
        skips.skip("empty", path)
        return None
    return text


def user_source(
    content_type: str, path: Path | str, seed: int, skips: SkipStats, *, licence: str | None = None
) -> Iterator[Record]:
    """Records of a user-supplied source for ``content_type`` (seeded order).

    ``path``: a folder (every file not hidden; ``.jsonl`` files read as JSONL, others as
    text), a single text or ``.jsonl`` file, or a Hugging Face dataset directory. Binary,
    non-UTF-8 and empty files are skipped and counted in ``skips``. Malformed JSONL is an
    ``InputFormatError`` naming file:line.
    """
    if content_type not in CONTENT_TYPES:
        raise DataError(
            f"unknown content type {content_type!r} (known: {', '.join(CONTENT_TYPES)})"
        )
    path = Path(path)
    if not path.exists():
        raise InputFormatError(f"source for {content_type}: {path}: no such file or directory")
    default_licence = licence or "unstated (user-supplied)"
    rng = random.Random(f"{seed}:{content_type}:{path}")
    if _is_hf_dataset(path):
        return _hf_records(content_type, path, default_licence, rng)
    if path.is_dir():
        files: list[Path] = []
        for dirpath, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(Path(dirpath) / n for n in sorted(names) if not n.startswith("."))
    else:
        files = [path]
    rng.shuffle(files)
    return _file_records(content_type, files, default_licence, skips)


def _file_records(
    content_type: str, files: list[Path], licence: str, skips: SkipStats
) -> Iterator[Record]:
    for f in files:
        text = _decode_file(f, skips)
        if text is None:
            continue
        if f.suffix.lower() == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputFormatError(f"source {f}:{lineno}: invalid JSON: {e.msg}") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InputFormatError(
                        f"source {f}:{lineno}: expected an object with a string field 'text'"
                    )
                rec_licence = str(obj.get("licence") or obj.get("license") or licence)
                src = str(obj.get("source") or f"{f}:{lineno}")
                for i, piece in enumerate(chunk_text(obj["text"])):
                    yield Record(piece, content_type, f"{src}#{i}", rec_licence)
        else:
            for i, piece in enumerate(chunk_text(text)):
                yield Record(piece, content_type, f"{f}#{i}", licence)


def _hf_records(
    content_type: str, path: Path, licence: str, rng: random.Random
) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"source {path}: is a Hugging Face dataset directory, but the 'datasets' package "
            "is not installed (pip install datasets), or export it to JSONL"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" not in ds.column_names:
        raise InputFormatError(
            f"source {path}: Hugging Face dataset has no 'text' column ({ds.column_names[:10]})"
        )
    order = list(range(len(ds)))
    rng.shuffle(order)
    for idx in order:
        text = ds[idx]["text"]
        if isinstance(text, str):
            for i, piece in enumerate(chunk_text(text)):
                yield Record(piece, content_type, f"hf:{path.name}[{idx}]#{i}", licence)


def verify_record_problems(record: Record) -> tuple[int, int]:
    """(checked, passed) over the record's problems."""
    return len(record.problems), sum(check_problem(p) for p in record.problems)
