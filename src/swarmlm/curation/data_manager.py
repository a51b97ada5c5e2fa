"""The data manager: every task of a task set, filtered, searched, sorted and paged, the
view of one task with everything known about it, and bulk actions on a selection.

Shaped after Label Studio's data manager (filters ANDed over columns, an ordering, and a
selection that is either explicit ids or "everything the filter matches") and Argilla's
record search (a text query over the content next to structured filters). What differs is
speed: at 100,000 tasks a filtered, sorted page is a few index walks, not a scan in Python.
Every query is prepared SQL with ``?`` placeholders (no user text is ever spliced into a
statement); sorts on agreement and confidence walk ``ix_tasks_set_agreement`` /
``ix_tasks_set_confidence``.

Bulk actions go through the store's group commit (:meth:`CurationStore.run_write`), so they
keep the counters the lease queue depends on (``n_leased``, ``needed``, ``status``) exact.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Literal

from swarmlm.curation.db import RawSql
from swarmlm.curation.errors import CurationError, NotFoundError
from swarmlm.curation.group_commit import WriteTx
from swarmlm.curation.quality import agrees
from swarmlm.curation.schema import LabelSchema
from swarmlm.curation.store import CurationStore, TaskSetInfo

#: Sort keys the data manager offers (a leading ``-`` means descending) -> column.
SORTS: dict[str, str] = {
    "id": "id",
    "agreement": "agreement",
    "confidence": "confidence",
    "annotations": "n_annotations",
}
STATUSES = ("open", "finalised", "leased", "unstarted")
BULK_ACTIONS = ("release", "raise_redundancy", "mark_gold", "unmark_gold", "delete")
MAX_PAGE = 200
#: Counting stops here: past it the page says "10,000+" (an exact count of a search over
#: 100k contents would cost more than the page itself).
COUNT_CAP = 10_000
MAX_BULK = 100_000


@dataclass(frozen=True)
class TaskFilter:
    """Conditions ANDed together; ``None`` means "any"."""

    status: str | None = None
    label: str | None = None
    confidence_min: float | None = None
    confidence_max: float | None = None
    agreement_min: float | None = None
    agreement_max: float | None = None
    annotator: str | None = None
    gold: bool | None = None
    created_from: date | None = None
    created_to: date | None = None
    search: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise CurationError(f"status must be one of {list(STATUSES)}, got {self.status!r}")
        for name in ("confidence_min", "confidence_max", "agreement_min", "agreement_max"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise CurationError(f"{name} must be between 0 and 1, got {v}")
        if self.search is not None and len(self.search) > 500:
            raise CurationError("search text is longer than 500 characters")


@dataclass(frozen=True)
class TaskRow:
    id: int
    external_id: str
    preview: str
    status: str
    is_gold: bool
    n_annotations: int
    needed: int
    n_leased: int
    consensus: Any
    agreement: float | None
    confidence: float | None
    created_at: datetime


@dataclass(frozen=True)
class TaskPage:
    rows: list[TaskRow]
    total: int
    total_capped: bool
    page: int
    per_page: int
    sort: str

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))


@dataclass(frozen=True)
class AnnotationView:
    id: int
    annotator_id: int
    username: str
    reputation: float
    value: Any
    time_spent_ms: int
    created_at: datetime
    agrees: bool | None
    review: str | None


@dataclass(frozen=True)
class HistoryEntry:
    at: datetime
    event: str
    who: str
    detail: str


@dataclass
class TaskDetail:
    task_set: TaskSetInfo
    id: int
    external_id: str
    content: Any
    outputs: list[str] | None
    gold: Any
    is_gold: bool
    status: str
    needed: int
    n_annotations: int
    n_leased: int
    consensus: Any
    agreement: float | None
    confidence: float | None
    created_at: datetime
    annotations: list[AnnotationView] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)


def _preview(sql_content: Any, limit: int = 140) -> str:
    content = sql_content
    if isinstance(content, dict):
        for key in ("prompt", "text", "question"):
            if isinstance(content.get(key), str):
                content = content[key]
                break
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _like_pattern(text: str, encode: bool) -> str:
    # Contents are stored as json.dumps text (non-ASCII and quotes escaped), so the needle
    # is encoded the same way before LIKE; %, _ and \ are escaped for LIKE ... ESCAPE '\'.
    encoded = json.dumps(text)[1:-1] if encode else text
    escaped = encoded.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _day_start(d: date) -> datetime:
    return datetime.combine(d, time.min, tzinfo=timezone.utc)


def search_index(store: CurationStore, cur: Any) -> str | None:
    """The substring index the content search uses (migration 0008), or None for a scan:
    ``"fts5"`` (SQLite), ``"pg_trgm"`` (PostgreSQL). Looked up once per store."""
    if store not in _SEARCH_INDEX:
        if store.engines.is_sqlite:
            cur.execute("SELECT 1 FROM sqlite_master WHERE name = 'tasks_search'")
            kind = "fts5" if cur.fetchone() else ""
        else:
            cur.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'ix_tasks_content_trgm'")
            kind = "pg_trgm" if cur.fetchone() else ""
        _SEARCH_INDEX[store] = kind
    return _SEARCH_INDEX[store] or None


_SEARCH_INDEX: weakref.WeakKeyDictionary[CurationStore, str] = weakref.WeakKeyDictionary()


def bypass_search_index(store: CurationStore, bypass: bool) -> None:
    """Search ``store`` by a LIKE scan even when it has an index (to measure the index)."""
    if bypass:
        _SEARCH_INDEX[store] = ""
    else:
        _SEARCH_INDEX.pop(store, None)


def _fts_phrase(column: str, text: str) -> str:
    return f'{column} : "{text.replace(chr(34), chr(34) * 2)}"'


#: A search with at most this many index candidates filters by their ids; one with more
#: scans instead, since a common term's scan stops early at ``COUNT_CAP`` matches.
SELECTIVE_SEARCH = 2000


def search_candidates(store: CurationStore, cur: Any, f: TaskFilter) -> list[int] | None:
    """Ids of the tasks (of any set) whose content or external id may hold ``f.search``,
    from SQLite's FTS5 trigram table, when that list is short; None: search by scanning.

    Measured at 100k tasks: a rare term is 0.1-14 ms through the index against 45-50 ms by
    a scan, while a term in half the tasks is ~25 ms by a scan (it stops at ``COUNT_CAP``
    matches) and ~45 ms through every candidate. This probe (reading at most
    ``SELECTIVE_SEARCH + 1`` ids, ~1 ms) tells the two apart. Needles under 3 characters
    have no trigram to look up. PostgreSQL needs none of this: its planner weighs the
    trigram index against a scan itself.
    """
    if not f.search or len(f.search) < 3 or search_index(store, cur) != "fts5":
        return None
    encoded = json.dumps(f.search)[1:-1]
    cur.execute(
        "SELECT rowid FROM tasks_search WHERE tasks_search MATCH ? LIMIT ?",
        (
            f"{_fts_phrase('content', encoded)} OR {_fts_phrase('external_id', f.search)}",
            SELECTIVE_SEARCH + 1,
        ),
    )
    ids = [int(r[0]) for r in cur.fetchall()]
    return ids if len(ids) <= SELECTIVE_SEARCH else None


def _where(
    task_set_id: int, f: TaskFilter, sql: RawSql, search_ids: list[int] | None = None
) -> tuple[str, list[Any]]:
    """The WHERE clause and its parameters for ``f`` (every value a bound parameter).

    ``search_ids``: from :func:`search_candidates`; the search's LIKE then runs on those
    tasks only (it still decides: the index finds substrings of the stored text, the LIKE
    keeps the exact matching rules).
    """
    sql_is_sqlite = sql.is_sqlite
    # With an annotator, their few thousand task ids drive the query (rowid lookups);
    # "+" keeps SQLite from scanning the whole set through a task_set_id index instead.
    clauses = ["+task_set_id = ?" if f.annotator is not None else "task_set_id = ?"]
    params: list[Any] = [task_set_id]
    if f.status == "open":
        clauses.append("status = 'open'")
    elif f.status == "finalised":
        clauses.append("status = 'finalised'")
    elif f.status == "leased":
        clauses.append("n_leased > 0")
    elif f.status == "unstarted":
        clauses.append("n_annotations = 0 AND n_leased = 0")
    if f.label is not None:
        candidates = [json.dumps(f.label)]
        try:
            parsed = json.loads(f.label)
        except ValueError:
            parsed = None
        if parsed is not None and not isinstance(parsed, str):
            candidates.append(json.dumps(parsed))
        column = "consensus" if sql_is_sqlite else "CAST(consensus AS TEXT)"
        clauses.append(f"{column} IN ({', '.join('?' for _ in candidates)})")
        params += candidates
    for column, lo, hi in (
        ("confidence", f.confidence_min, f.confidence_max),
        ("agreement", f.agreement_min, f.agreement_max),
    ):
        if lo is not None:
            clauses.append(f"{column} >= ?")
            params.append(lo)
        if hi is not None:
            clauses.append(f"{column} <= ?")
            params.append(hi)
    if f.annotator is not None:
        # the account's id first (a scalar subquery, evaluated once): the task ids then come
        # straight from ix_annotations_annotator_id, with no join per annotation
        clauses.append(
            "id IN (SELECT task_id FROM annotations WHERE annotator_id ="
            " (SELECT id FROM annotators WHERE username = ?))"
        )
        params.append(f.annotator)
    if f.gold is not None:
        clauses.append("is_gold = ?")
        params.append(f.gold)
    if f.created_from is not None:
        clauses.append("created_at >= ?")
        params.append(sql.ts(_day_start(f.created_from)))
    if f.created_to is not None:
        clauses.append("created_at < ?")
        params.append(sql.ts(_day_start(f.created_to + timedelta(days=1))))
    if f.search:
        if search_ids is not None:
            if search_ids:
                clauses.append(f"id IN ({', '.join('?' for _ in search_ids)})")
                params += search_ids
            else:
                clauses.append("1 = 0")
        like = "LIKE" if sql_is_sqlite else "ILIKE"
        column = "content" if sql_is_sqlite else "CAST(content AS TEXT)"
        clauses.append(f"({column} {like} ? ESCAPE '\\' OR external_id {like} ? ESCAPE '\\')")
        params += [_like_pattern(f.search, encode=True), _like_pattern(f.search, encode=False)]
    return " AND ".join(clauses), params


def _order(sort: str) -> str:
    key = sort.lstrip("-")
    if key not in SORTS:
        raise CurationError(f"sort must be one of {sorted(SORTS)} (optionally with '-')")
    direction = "DESC" if sort.startswith("-") else "ASC"
    column = SORTS[key]
    if column == "id":
        return f"id {direction}"
    return f"{column} {direction}, id {direction}"


#: The index each sort walks when many tasks match (SQLite: named with INDEXED BY, since
#: without statistics its planner sometimes walks another index and sorts 100k rows).
SORT_INDEX = {
    "id": "ix_tasks_set_id",
    "agreement": "ix_tasks_set_agreement",
    "confidence": "ix_tasks_set_confidence",
    "annotations": "ix_tasks_set_annotations",
}


def query_tasks(
    store: CurationStore,
    task_set_id: int,
    f: TaskFilter | None = None,
    *,
    sort: str = "id",
    page: int = 1,
    per_page: int = 50,
) -> TaskPage:
    """One page of the task set's tasks matching ``f``, in ``sort`` order.

    One scan reads ``(id, sort key)`` of the matches, stopping after ``COUNT_CAP + 1``: it
    is the count. When that is all of them (few matches: a search, a rare label, gold),
    they are sorted here and the page's rows fetched by id, so a selective filter costs one
    scan, not a scan for the count and another for the page. When more match, matches are
    dense, and walking the sort's index while filtering reaches the page after a few
    thousand rows.
    """
    f = f or TaskFilter()
    if not 1 <= per_page <= MAX_PAGE:
        raise CurationError(f"per_page must be 1..{MAX_PAGE}, got {per_page}")
    if page < 1:
        raise CurationError(f"page must be at least 1, got {page}")
    order = _order(sort)  # validates the sort key
    key = sort.lstrip("-")
    column = SORTS[key]
    descending = sort.startswith("-")
    offset = (page - 1) * per_page
    store.get_task_set(task_set_id)  # 404 for an unknown set
    with store.read_cursor() as (cur, sql):
        where, params = _where(task_set_id, f, sql, search_candidates(store, cur, f))
        # Ids only: when the filter's columns are in an index (agreement, confidence, gold)
        # this scan never reads the table, and a dense filter (the page is then found by
        # walking the sort's index) pays nothing for sort keys it does not use.
        cur.execute(sql.q(f"SELECT id FROM tasks WHERE {where} LIMIT ?"), (*params, COUNT_CAP + 1))
        ids = [int(r[0]) for r in cur.fetchall()]
        total = len(ids)
        if total <= COUNT_CAP:
            keys: list[Any] = [(i, i) for i in ids] if column == "id" else []
            if column != "id":  # the sort keys of the few matches, by primary key
                for start in range(0, total, 900):
                    chunk = ids[start : start + 900]
                    marks = ", ".join("?" for _ in chunk)
                    cur.execute(
                        sql.q(f"SELECT id, {column} FROM tasks WHERE id IN ({marks})"), chunk
                    )
                    keys += cur.fetchall()
            # NULLs sort as the database sorts them: first ascending on SQLite, last on
            # PostgreSQL (so both paths agree on each backend).
            nulls_low = sql.is_sqlite

            def sort_key(r: Any) -> tuple[bool, Any, int]:
                missing = r[1] is None
                return (not missing if nulls_low else missing, 0 if missing else r[1], r[0])

            keys.sort(key=sort_key, reverse=descending)
            wanted = [int(r[0]) for r in keys[offset : offset + per_page]]
            found: dict[int, Any] = {}
            if wanted:
                marks = ", ".join("?" for _ in wanted)
                cur.execute(
                    sql.q(f"SELECT {_ROW_COLUMNS} FROM tasks WHERE id IN ({marks})"), wanted
                )
                found = {int(r[0]): r for r in cur.fetchall()}
            raw = [found[i] for i in wanted if i in found]
        else:
            hint = f" INDEXED BY {SORT_INDEX[key]}" if sql.is_sqlite else ""
            cur.execute(
                sql.q(
                    f"SELECT {_ROW_COLUMNS} FROM tasks{hint} WHERE {where}"
                    f" ORDER BY {order} LIMIT ? OFFSET ?"
                ),
                (*params, per_page, offset),
            )
            raw = cur.fetchall()
        rows = [
            TaskRow(
                id=int(r[0]),
                external_id=r[1],
                preview=_preview(sql.from_json(r[2])),
                status=r[3],
                is_gold=bool(r[4]),
                n_annotations=int(r[5]),
                needed=int(r[6]),
                n_leased=int(r[7]),
                consensus=sql.from_json(r[8]),
                agreement=r[9],
                confidence=r[10],
                created_at=sql.from_ts(r[11]),
            )
            for r in raw
        ]
    return TaskPage(
        rows=rows,
        total=min(total, COUNT_CAP),
        total_capped=total > COUNT_CAP,
        page=page,
        per_page=per_page,
        sort=sort,
    )


_ROW_COLUMNS = (
    "id, external_id, content, status, is_gold, n_annotations, needed, n_leased, consensus,"
    " agreement, confidence, created_at"
)


def matching_ids(store: CurationStore, task_set_id: int, f: TaskFilter) -> list[int]:
    """Ids of every task matching ``f`` (for a bulk action on "all matching")."""
    with store.read_cursor() as (cur, sql):
        where, params = _where(task_set_id, f, sql, search_candidates(store, cur, f))
        cur.execute(
            sql.q(f"SELECT id FROM tasks WHERE {where} ORDER BY id LIMIT ?"),
            (*params, MAX_BULK + 1),
        )
        ids = [int(r[0]) for r in cur.fetchall()]
    if len(ids) > MAX_BULK:
        raise CurationError(f"more than {MAX_BULK} tasks match; narrow the filter")
    return ids


def task_detail(store: CurationStore, task_id: int) -> TaskDetail:
    """A task with every annotation (annotator, time, reputation, agreement with the
    consensus, review verdict), its consensus and posterior, and its history."""
    with store.read_cursor() as (cur, sql):
        cur.execute(
            sql.q(
                "SELECT task_set_id, external_id, content, outputs, gold, is_gold, status,"
                " needed, n_annotations, n_leased, consensus, agreement, confidence,"
                " created_at FROM tasks WHERE id = ?"
            ),
            (task_id,),
        )
        t = cur.fetchone()
        if t is None:
            raise NotFoundError(f"task {task_id} does not exist")
        cur.execute(
            sql.q(
                "SELECT a.id, a.annotator_id, u.username, u.reputation, a.value,"
                " a.time_spent_ms, a.created_at_ms, r.verdict FROM annotations a"
                " JOIN annotators u ON u.id = a.annotator_id"
                " LEFT JOIN reviews r ON r.annotation_id = a.id"
                " WHERE a.task_id = ? ORDER BY a.id"
            ),
            (task_id,),
        )
        ann_rows = cur.fetchall()
        cur.execute(
            sql.q(
                "SELECT s.leased_at, s.state, u.username FROM assignments s"
                " JOIN annotators u ON u.id = s.annotator_id WHERE s.task_id = ? ORDER BY s.id"
            ),
            (task_id,),
        )
        leases = cur.fetchall()
        cur.execute(
            sql.q(
                "SELECT r.created_at, r.verdict, w.username, u.username, r.comment"
                " FROM reviews r JOIN annotators w ON w.id = r.reviewer_id"
                " JOIN annotators u ON u.id = r.annotator_id WHERE r.task_id = ? ORDER BY r.id"
            ),
            (task_id,),
        )
        reviews = cur.fetchall()
        cur.execute(
            sql.q(
                "SELECT p.created_at, p.delta, p.reason, u.username FROM points_ledger p"
                " JOIN annotators u ON u.id = p.annotator_id WHERE p.task_id = ? ORDER BY p.id"
            ),
            (task_id,),
        )
        points = cur.fetchall()
    ts = store.get_task_set(int(t[0]))
    schema: LabelSchema = ts.schema
    consensus = sql.from_json(t[10])
    detail = TaskDetail(
        task_set=ts,
        id=task_id,
        external_id=t[1],
        content=sql.from_json(t[2]),
        outputs=sql.from_json(t[3]),
        gold=sql.from_json(t[4]),
        is_gold=bool(t[5]),
        status=t[6],
        needed=int(t[7]),
        n_annotations=int(t[8]),
        n_leased=int(t[9]),
        consensus=consensus,
        agreement=t[11],
        confidence=t[12],
        created_at=sql.from_ts(t[13]),
    )
    reference = detail.gold if detail.is_gold else consensus
    # appended in causal order, so the stable sort keeps it for events in the same instant
    detail.history.append(HistoryEntry(detail.created_at, "imported", "", detail.external_id))
    for leased_at, state, who in leases:
        detail.history.append(HistoryEntry(sql.from_ts(leased_at), "leased", who, f"now {state}"))
    for a in ann_rows:
        value = sql.from_json(a[4])
        created = datetime.fromtimestamp(int(a[6]) / 1000, tz=timezone.utc)
        detail.annotations.append(
            AnnotationView(
                id=int(a[0]),
                annotator_id=int(a[1]),
                username=a[2],
                reputation=float(a[3]),
                value=value,
                time_spent_ms=int(a[5]),
                created_at=created,
                agrees=None if reference is None else agrees(schema, value, reference),
                review=a[7],
            )
        )
        detail.history.append(
            HistoryEntry(created, "annotated", a[2], json.dumps(value, ensure_ascii=False))
        )
    for at, verdict, reviewer, annotator, comment in reviews:
        text = f"{annotator}'s annotation" + (f": {comment}" if comment else "")
        detail.history.append(HistoryEntry(sql.from_ts(at), f"review: {verdict}", reviewer, text))
    for at, delta, reason, who in points:
        detail.history.append(
            HistoryEntry(sql.from_ts(at), "points", who, f"{int(delta):+d} ({reason})")
        )
    detail.history.sort(key=lambda h: h.at)
    return detail


BulkAction = Literal["release", "raise_redundancy", "mark_gold", "unmark_gold", "delete"]


def bulk_action(
    store: CurationStore,
    task_set_id: int,
    task_ids: list[int],
    action: str,
    amount: int = 1,
) -> int:
    """Apply ``action`` to the tasks of ``task_set_id`` among ``task_ids``; returns how many
    tasks it changed. Ids of other sets are ignored (a form cannot reach across sets).

    * ``release``: end their live leases (a late submission is refused as expired) so the
      slots go back to the queue; a finalised task reopens for one more annotation.
    * ``raise_redundancy``: ``needed`` grows by ``amount`` (1-10), up to the set's cap
      raised to match; finalised tasks reopen.
    * ``mark_gold`` / ``unmark_gold``: a task with a consensus becomes a honeypot whose
      answer is that consensus (tasks without one are skipped) / stops being one.
    * ``delete``: the tasks, their leases, annotations and reviews go; points already
      awarded stay in the ledger (detached from the task). Deletion is local: a replicating
      node keeps the records, so peers keep their copies.
    """
    if action not in BULK_ACTIONS:
        raise CurationError(f"unknown bulk action {action!r}; choose from {list(BULK_ACTIONS)}")
    if action == "raise_redundancy" and not 1 <= amount <= 10:
        raise CurationError(f"amount must be 1..10, got {amount}")
    ids = sorted({int(i) for i in task_ids})
    if len(ids) > MAX_BULK:
        raise CurationError(f"at most {MAX_BULK} tasks per bulk action")
    ts = store.get_task_set(task_set_id)
    if not ids:
        return 0

    def run(tx: WriteTx) -> int:
        changed = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = tx.execute(
                f"SELECT id FROM tasks WHERE task_set_id = ? AND id IN ({marks})",
                (task_set_id, *chunk),
            ).fetchall()
            mine = [int(r[0]) for r in rows]
            for tid in mine:
                changed += _apply_one(tx, ts, tid, action, amount)
        return changed

    return store.run_write(run)


def _apply_one(tx: WriteTx, ts: TaskSetInfo, task_id: int, action: str, amount: int) -> int:
    sql = tx.sql
    if action == "release":
        n = tx.execute(
            "UPDATE assignments SET state = 'expired' WHERE task_id = ? AND state = 'leased'",
            (task_id,),
        ).rowcount
        reopened = tx.execute(
            "UPDATE tasks SET status = 'open', needed = n_annotations + 1"
            " WHERE id = ? AND status = 'finalised' AND is_gold = ?",
            (task_id, False),
        ).rowcount
        tx.execute("UPDATE tasks SET n_leased = 0 WHERE id = ?", (task_id,))
        return int(bool(n or reopened))
    if action == "raise_redundancy":
        row = tx.one("SELECT needed, is_gold FROM tasks WHERE id = ?", (task_id,))
        if row is None or row[1]:
            return 0
        tx.execute(
            "UPDATE tasks SET needed = ?, status = 'open' WHERE id = ?",
            (int(row[0]) + amount, task_id),
        )
        tx.execute(
            "UPDATE task_sets SET max_annotations = ? WHERE id = ? AND max_annotations < ?",
            (int(row[0]) + amount, ts.id, int(row[0]) + amount),
        )
        return 1
    if action == "mark_gold":
        row = tx.one("SELECT consensus, is_gold FROM tasks WHERE id = ?", (task_id,))
        consensus = sql.from_json(row[0]) if row else None
        if row is None or row[1] or consensus is None:
            return 0
        tx.execute(
            "UPDATE tasks SET is_gold = ?, gold = ?json WHERE id = ?",
            (True, sql.json(consensus), task_id),
        )
        return 1
    if action == "unmark_gold":
        return int(
            tx.execute(
                "UPDATE tasks SET is_gold = ?, gold = ?json WHERE id = ? AND is_gold = ?",
                (False, sql.json(None), task_id, True),
            ).rowcount
        )
    # delete
    tx.execute("DELETE FROM reviews WHERE task_id = ?", (task_id,))
    tx.execute("UPDATE points_ledger SET task_id = NULL WHERE task_id = ?", (task_id,))
    tx.execute("DELETE FROM annotations WHERE task_id = ?", (task_id,))
    tx.execute("DELETE FROM assignments WHERE task_id = ?", (task_id,))
    return int(tx.execute("DELETE FROM tasks WHERE id = ?", (task_id,)).rowcount)
