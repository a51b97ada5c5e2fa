"""Import tasks (our JSONL, Label Studio JSON export) and export annotations and results.

Task JSONL, one object per line::

    {"id": "q17", "content": "text or JSON object", "outputs": ["resp A", "resp B"],
     "gold": "B"}

Only ``content`` is required; ``outputs`` is required by pairwise (2) and ranking (k)
schemas; ``gold`` makes the task a honeypot. Label Studio exports (a JSON list of
``{"id", "data": {...}, "annotations": [...]}``) import ``data`` as the content (its ``text``
field alone when that is all there is) and ``id`` as the external id; outputs can be taken
from ``data`` keys named by ``outputs_keys``.

Exports are JSONL written atomically (temp file + rename): signed annotations (what
``swarmlm curation verify`` checks), per-task consensus, and the reward-model preference
format ``{"prompt", "chosen", "rejected"}`` that TRL's reward and DPO trainers read.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from swarmlm.atomic import atomic_open
from swarmlm.curation import quality
from swarmlm.curation.errors import ImportFormatError
from swarmlm.curation.schema import PairwiseSchema, RankingSchema
from swarmlm.curation.store import CurationStore, TaskInput

MAX_IMPORT_BYTES = 512 * 1024 * 1024


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        for key in ("prompt", "text", "question"):
            if isinstance(content.get(key), str):
                return str(content[key])
    return json.dumps(content, ensure_ascii=False, sort_keys=True)


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which no JSON reader downstream does: a task
    # holding one would make every export of its set unreadable.
    raise ValueError(f"{name} is not valid JSON")


def strict_json_loads(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity (ValueError)."""
    return json.loads(text, parse_constant=_refuse_constant)


def parse_tasks_jsonl(lines: Iterable[str], source: str = "<jsonl>") -> Iterator[TaskInput]:
    """Parse task JSONL; errors name ``source``, the line and the field."""
    allowed = {"id", "external_id", "content", "outputs", "gold", "meta"}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        try:
            obj = strict_json_loads(line)
        except json.JSONDecodeError as e:
            raise ImportFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        except ValueError as e:
            raise ImportFormatError(f"{where}: {e}") from e
        if not isinstance(obj, dict):
            raise ImportFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise ImportFormatError(f"{where}: unknown fields {unknown}; allowed {sorted(allowed)}")
        if "content" not in obj:
            raise ImportFormatError(f"{where}: missing field 'content'")
        ext = obj.get("id", obj.get("external_id"))
        if ext is not None and not isinstance(ext, str | int):
            raise ImportFormatError(f"{where}: field 'id' must be a string or integer")
        yield TaskInput(
            content=obj["content"],
            outputs=obj.get("outputs"),
            gold=obj.get("gold"),
            external_id=None if ext is None else str(ext),
        )


def parse_label_studio(
    data: Any, source: str = "<label studio>", outputs_keys: list[str] | None = None
) -> list[TaskInput]:
    """Tasks from a Label Studio JSON export (the list of task objects).

    ``outputs_keys``: keys of ``data`` holding model outputs (e.g. ``["answer1", "answer2"]``
    for a pairwise project); they are moved from the content into ``outputs``. Existing Label
    Studio annotations are not imported as labels: they were not signed by any node.
    """
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ImportFormatError(f"{source}: expected a JSON list of Label Studio tasks")
    out: list[TaskInput] = []
    for i, task in enumerate(data):
        where = f"{source} task {i + 1}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise ImportFormatError(f"{where}: expected an object with a 'data' object")
        fields = dict(task["data"])
        outputs: list[str] | None = None
        if outputs_keys:
            missing = [k for k in outputs_keys if k not in fields]
            if missing:
                raise ImportFormatError(f"{where}: data has no output fields {missing}")
            outputs = [str(fields.pop(k)) for k in outputs_keys]
        content: Any = fields
        if list(fields) == ["text"] and isinstance(fields["text"], str):
            content = fields["text"]
        ext = task.get("id")
        out.append(
            TaskInput(
                content=content, outputs=outputs, external_id=None if ext is None else str(ext)
            )
        )
    return out


def parse_tasks_csv(text: str, source: str = "<csv>") -> list[TaskInput]:
    """Tasks from CSV with a header row, as Label Studio imports CSV: each column is a data
    field. ``id`` (or ``external_id``), ``gold``, ``outputs`` (a JSON list) and
    ``output_1``, ``output_2``.. are taken out; a single remaining ``text`` or ``content``
    column is the content as text, several make an object."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if not header:
        raise ImportFormatError(f"{source}: empty CSV (no header row)")
    if len(set(header)) != len(header):
        raise ImportFormatError(f"{source}: repeated column names in the header")
    numbered = sorted(
        (h for h in header if h.startswith("output_") and h[7:].isdigit()), key=lambda h: int(h[7:])
    )
    special = {"id", "external_id", "gold", "outputs", *numbered}
    data_cols = [h for h in header if h not in special]
    if not data_cols:
        raise ImportFormatError(f"{source}: no content column (e.g. 'text')")
    out: list[TaskInput] = []
    for lineno, row in enumerate(reader, start=2):
        where = f"{source} line {lineno}"
        if None in row:
            raise ImportFormatError(f"{where}: more fields than header columns")
        if not any((v or "").strip() for v in row.values()):
            continue
        outputs: list[str] | None = None
        if row.get("outputs"):
            try:
                outputs = strict_json_loads(row["outputs"])
            except ValueError as e:
                raise ImportFormatError(f"{where}: column 'outputs' is not a JSON list") from e
        elif numbered:
            outputs = [row[h] or "" for h in numbered]
        content: Any
        if len(data_cols) == 1 and data_cols[0] in ("text", "content"):
            content = row[data_cols[0]]
        else:
            content = {h: row[h] for h in data_cols}
        ext = row.get("id") or row.get("external_id") or None
        gold = row.get("gold") or None
        if gold is not None:
            # a rating, ranking or list of choices is JSON; a plain label stays text
            with contextlib.suppress(ValueError):
                gold = strict_json_loads(gold)
        out.append(TaskInput(content=content, outputs=outputs, gold=gold, external_id=ext))
    return out


def read_tasks_file(
    path: Path, fmt: str = "auto", outputs_keys: list[str] | None = None
) -> list[TaskInput]:
    """Read tasks from ``path``: ``fmt`` is ``jsonl``, ``label_studio`` or ``auto`` (by name)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImportFormatError(f"cannot read {path}: {e}") from e
    if size > MAX_IMPORT_BYTES:
        raise ImportFormatError(f"{path} is {size} bytes, more than {MAX_IMPORT_BYTES}")
    if fmt == "auto":
        fmt = guess_format(path.name)
    with path.open(encoding="utf-8") as fh:
        return parse_tasks_text(fh.read(), fmt, str(path), outputs_keys)


def guess_format(name: str) -> str:
    """Import format from a file name: ``.json`` Label Studio, ``.csv`` CSV, else JSONL."""
    lower = name.lower()
    if lower.endswith(".json"):
        return "label_studio"
    if lower.endswith(".csv"):
        return "csv"
    return "jsonl"


def parse_tasks_text(
    text: str, fmt: str, source: str, outputs_keys: list[str] | None = None
) -> list[TaskInput]:
    if fmt == "jsonl":
        return list(parse_tasks_jsonl(text.splitlines(), source))
    if fmt == "label_studio":
        try:
            data = strict_json_loads(text)
        except json.JSONDecodeError as e:
            raise ImportFormatError(f"{source}: invalid JSON ({e.msg} at line {e.lineno})") from e
        except ValueError as e:
            raise ImportFormatError(f"{source}: {e}") from e
        return parse_label_studio(data, source, outputs_keys)
    if fmt == "csv":
        return parse_tasks_csv(text, source)
    raise ImportFormatError(f"unknown import format {fmt!r}; use 'jsonl', 'label_studio' or 'csv'")


# -- export ----------------------------------------------------------------------------------


def annotation_rows(store: CurationStore, task_set_id: int) -> Iterator[dict[str, Any]]:
    """Signed annotation records with the task they cover (so the digest can be checked)."""
    ts = store.get_task_set(task_set_id)
    for task, ann in store.annotations(task_set_id):
        yield {
            "task_set": ts.name,
            "task": {
                "external_id": task.external_id,
                "content": task.content,
                "outputs": task.outputs,
            },
            "task_digest": task.digest,
            "annotator_id": ann.annotator_public_id,
            "value": ann.value,
            "time_spent_ms": ann.time_spent_ms,
            "created_at_ms": ann.created_at_ms,
            "signer": ann.signer_public_key,
            "signature": ann.signature,
        }


def consensus_rows(store: CurationStore, task_set_id: int) -> Iterator[dict[str, Any]]:
    """Per non-gold task: status, stored consensus and agreement, and every method's result."""
    ts = store.get_task_set(task_set_id)
    pairs = store.annotations(task_set_id)
    reps = {a.id: a.reputation for a in store.list_annotators()}
    triples = [(t.id, a.annotator_id, a.value) for t, a in pairs]
    gold = {t.id: t.gold for t, _ in pairs if t.is_gold}
    methods = quality.set_consensus(ts.schema, triples, reps, gold)
    for task in store.list_tasks(task_set_id):
        if task.is_gold:
            continue
        yield {
            "task_set": ts.name,
            "external_id": task.external_id,
            "content": task.content,
            "outputs": task.outputs,
            "status": task.status,
            "n_annotations": task.n_annotations,
            "consensus": task.consensus,
            "agreement": task.agreement,
            "methods": methods.get(task.id, {}),
        }


def preference_rows(store: CurationStore, task_set_id: int) -> Iterator[dict[str, str]]:
    """``{"prompt", "chosen", "rejected"}`` pairs from finalised pairwise or ranking tasks.

    Pairwise: one pair when the consensus is A or B (ties and "both bad" carry no
    preference). Ranking: every pair of the consensus order, better response as chosen.
    """
    ts = store.get_task_set(task_set_id)
    if not isinstance(ts.schema, PairwiseSchema | RankingSchema):
        raise ImportFormatError(
            f"task set {ts.name!r} has schema {ts.schema.kind}; preference export needs "
            "pairwise or ranking"
        )
    for task in store.list_tasks(task_set_id):
        if task.is_gold or task.status != "finalised" or not task.outputs:
            continue
        prompt = _content_text(task.content)
        if isinstance(ts.schema, PairwiseSchema):
            if task.consensus == "A":
                yield {"prompt": prompt, "chosen": task.outputs[0], "rejected": task.outputs[1]}
            elif task.consensus == "B":
                yield {"prompt": prompt, "chosen": task.outputs[1], "rejected": task.outputs[0]}
        else:
            order = task.consensus or []
            for i in range(len(order)):
                for j in range(i + 1, len(order)):
                    yield {
                        "prompt": prompt,
                        "chosen": task.outputs[order[i]],
                        "rejected": task.outputs[order[j]],
                    }


def _tasks_with_annotations(
    store: CurationStore, task_set_id: int
) -> Iterator[tuple[tuple[Any, ...], list[tuple[str, Any, int]]]]:
    """Each task row of the set, in id order, with its ``(username, value, created_at_ms)``
    annotations: two ordered scans merged, streamed (no ORM objects for 100k rows)."""
    with store.read_cursor() as (tasks, sql), store.read_cursor() as (anns, _):
        tasks.execute(
            sql.q(
                "SELECT id, external_id, content, outputs, status, n_annotations, consensus,"
                " agreement, confidence, is_gold, gold FROM tasks WHERE task_set_id = ?"
                " ORDER BY id"
            ),
            (task_set_id,),
        )
        anns.execute(
            sql.q(
                "SELECT a.task_id, u.username, a.value, a.created_at_ms FROM annotations a"
                " JOIN tasks t ON t.id = a.task_id JOIN annotators u ON u.id = a.annotator_id"
                " WHERE t.task_set_id = ? ORDER BY a.task_id, a.id"
            ),
            (task_set_id,),
        )
        pending = anns.fetchone()
        while rows := tasks.fetchmany(2000):
            for row in rows:
                mine: list[tuple[str, Any, int]] = []
                while pending is not None and pending[0] <= row[0]:
                    if pending[0] == row[0]:
                        mine.append((pending[1], sql.from_json(pending[2]), int(pending[3])))
                    pending = anns.fetchone()
                yield (
                    (
                        row[0],
                        row[1],
                        sql.from_json(row[2]),
                        sql.from_json(row[3]),
                        row[4],
                        row[5],
                        sql.from_json(row[6]),
                        row[7],
                        row[8],
                        bool(row[9]),
                        sql.from_json(row[10]),
                    ),
                    mine,
                )


def _ls_result(schema_kind: str, value: Any) -> dict[str, Any]:
    """A Label Studio ``result`` item for a value (choices, rating, text, pairwise, ranking)."""
    if schema_kind in ("single_choice", "multiple_choice"):
        choices = value if isinstance(value, list) else [value]
        return {"from_name": "label", "to_name": "text", "type": "choices",
                "value": {"choices": choices}}  # fmt: skip
    if schema_kind == "rating":
        return {"from_name": "rating", "to_name": "text", "type": "rating",
                "value": {"rating": value}}  # fmt: skip
    if schema_kind == "free_text":
        return {"from_name": "answer", "to_name": "text", "type": "textarea",
                "value": {"text": [value]}}  # fmt: skip
    if schema_kind == "pairwise":
        return {"from_name": "comparison", "to_name": "text", "type": "pairwise",
                "value": {"selected": value}}  # fmt: skip
    return {"from_name": "ranking", "to_name": "text", "type": "ranker",
            "value": {"ranker": {"rank": value}}}  # fmt: skip


def label_studio_rows(store: CurationStore, task_set_id: int) -> Iterator[dict[str, Any]]:
    """Label Studio tasks (the list its import reads): ``data`` is the content (``text`` for
    a string) plus ``output_1``.. for outputs; each annotation becomes a completed
    annotation by the annotator's name; the consensus travels as a prediction (score = its
    posterior) and in ``meta`` with status and agreement."""
    ts = store.get_task_set(task_set_id)
    kind = ts.schema.kind
    for row, anns in _tasks_with_annotations(store, task_set_id):
        tid, ext, content, outputs, status, _n, consensus, agreement, confidence, is_gold, gold = (
            row
        )
        data: dict[str, Any] = dict(content) if isinstance(content, dict) else {"text": content}
        for i, o in enumerate(outputs or []):
            data[f"output_{i + 1}"] = o
        item: dict[str, Any] = {
            "id": tid,
            "data": data,
            "annotations": [
                {
                    "completed_by": {"username": who},
                    "created_at": created_ms / 1000,
                    "result": [_ls_result(kind, value)],
                }
                for who, value, created_ms in anns
            ],
            "meta": {
                "external_id": ext,
                "status": status,
                "agreement": agreement,
                "confidence": confidence,
                "gold": gold if is_gold else None,
            },
        }
        if consensus is not None:
            item["predictions"] = [
                {"model_version": "swarmlm-consensus", "score": confidence,
                 "result": [_ls_result(kind, consensus)]}
            ]  # fmt: skip
        yield item


def table_rows(store: CurationStore, task_set_id: int) -> Iterator[dict[str, Any]]:
    """One flat row per task (the CSV export): content as text, consensus label, agreement,
    confidence, and every annotation as ``username=value`` pairs."""
    for row, anns in _tasks_with_annotations(store, task_set_id):
        tid, ext, content, outputs, status, n, consensus, agreement, confidence, is_gold, gold = row
        yield {
            "id": tid,
            "external_id": ext,
            "content": _content_text(content),
            "outputs": json.dumps(outputs, ensure_ascii=False) if outputs else "",
            "status": status,
            "n_annotations": n,
            "consensus": _cell(consensus),
            "agreement": "" if agreement is None else round(agreement, 6),
            "confidence": "" if confidence is None else round(confidence, 6),
            "gold": _cell(gold) if is_gold else "",
            "annotations": "; ".join(f"{who}={_cell(v)}" for who, v, _ in anns),
        }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


TABLE_COLUMNS = (
    "id",
    "external_id",
    "content",
    "outputs",
    "status",
    "n_annotations",
    "consensus",
    "agreement",
    "confidence",
    "gold",
    "annotations",
)

EXPORTERS = {
    "annotations": annotation_rows,
    "consensus": consensus_rows,
    "preferences": preference_rows,
    "label_studio": label_studio_rows,
    "csv": table_rows,
}


def serialize_export(kind: str, rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The export as text chunks: JSONL for most kinds, a JSON array for Label Studio (what
    its importer reads), CSV with a header row for ``csv``."""
    if kind == "label_studio":
        yield "["
        for i, row in enumerate(rows):
            yield ("," if i else "") + "\n" + json.dumps(row, ensure_ascii=False, sort_keys=True)
        yield "\n]\n"
        return
    if kind == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            if buf.tell() > 1 << 16:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()
        return
    for row in rows:
        yield json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False, sort_keys=True))
        out.write("\n")
        n += 1
    return n


def export_to_file(store: CurationStore, task_set_id: int, kind: str, path: Path) -> int:
    """Write an export atomically; returns the number of lines."""
    if kind not in EXPORTERS:
        raise ImportFormatError(f"unknown export kind {kind!r}; choose from {sorted(EXPORTERS)}")
    with atomic_open(path) as fh:
        n = write_jsonl(EXPORTERS[kind](store, task_set_id), fh)
    return n
