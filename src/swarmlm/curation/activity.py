"""Series over time for the admin pages: platform throughput, agreement and queue per day,
and one annotator's activity and reputation history.

Nothing here is stored for the purpose: every series is rebuilt from the rows the store
keeps anyway (annotations with their times, tasks with status and agreement, reviews). A
task's finalisation time is taken as its last annotation's (the store does not record the
moment itself), and an annotator's reputation history replays their checked answers in time
order through the same Beta formula the store uses, judging agreement against the task's
current consensus, so it can differ slightly from the values the store held at the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from swarmlm.curation import quality
from swarmlm.curation.schema import LabelSchema, parse_schema
from swarmlm.curation.store import CurationStore

DAY_MS = 86_400_000


@dataclass(frozen=True)
class DailySeries:
    """Per UTC day, oldest first: ``days`` (ms at midnight), annotations submitted, tasks
    finalised, their mean agreement (None on days without any) and open tasks at day's end."""

    days: list[int]
    annotations: list[int]
    finalised: list[int]
    agreement: list[float | None]
    queue: list[int]


def _day(ms: int) -> int:
    return ms - ms % DAY_MS


def daily_series(store: CurationStore, days: int = 30, now: datetime | None = None) -> DailySeries:
    """The platform's last ``days`` days (every task set)."""
    now = now or store.now()
    today = _day(int(now.timestamp() * 1000))
    start = today - (days - 1) * DAY_MS
    axis = [start + i * DAY_MS for i in range(days)]
    index = {d: i for i, d in enumerate(axis)}
    annotations = [0] * days
    finalised = [0] * days
    agree_sum = [0.0] * days
    agree_n = [0] * days
    created_before = 0
    created = [0] * days
    finalised_before = 0
    with store.read_cursor() as (cur, sql):
        cur.execute(
            sql.q(
                "SELECT created_at_ms - created_at_ms % ?, count(*) FROM annotations"
                " WHERE created_at_ms >= ? GROUP BY 1"
            ),
            (DAY_MS, start),
        )
        for day, n in cur.fetchall():
            if int(day) in index:
                annotations[index[int(day)]] += int(n)
        # finalisation time ~ the task's last annotation
        cur.execute(
            sql.q(
                "SELECT last_ms - last_ms % ?, count(*), sum(agreement), count(agreement) FROM"
                " (SELECT max(a.created_at_ms) AS last_ms, t.agreement AS agreement"
                "  FROM tasks t JOIN annotations a ON a.task_id = t.id"
                "  WHERE t.status = 'finalised' AND t.is_gold = ? GROUP BY t.id, t.agreement)"
                " AS f GROUP BY 1"
            ),
            (DAY_MS, False),
        )
        for day, n, s, na in cur.fetchall():
            d = int(day)
            if d < start:
                finalised_before += int(n)
            elif d in index:
                i = index[d]
                finalised[i] += int(n)
                agree_sum[i] += float(s or 0.0)
                agree_n[i] += int(na)
        cur.execute(sql.q("SELECT created_at FROM tasks WHERE is_gold = ?"), (False,))
        while rows := cur.fetchmany(10_000):
            for (at,) in rows:
                ms = int(sql.from_ts(at).timestamp() * 1000)
                d = _day(ms)
                if d < start:
                    created_before += 1
                elif d in index:
                    created[index[d]] += 1
    queue: list[int] = []
    open_now = created_before - finalised_before
    for i in range(days):
        open_now += created[i] - finalised[i]
        queue.append(max(0, open_now))
    return DailySeries(
        days=axis,
        annotations=annotations,
        finalised=finalised,
        agreement=[agree_sum[i] / agree_n[i] if agree_n[i] else None for i in range(days)],
        queue=queue,
    )


@dataclass(frozen=True)
class AnnotatorActivity:
    """``per_day``: annotations per UTC day over the window, oldest first; ``reputation``:
    ``(time ms, reputation)`` after each checked answer (at most ``max_points``, evenly
    thinned), starting from the prior; gold and review tallies."""

    days: list[int]
    per_day: list[int]
    reputation: list[tuple[int, float]]
    gold_correct: int
    gold_total: int
    reviews: dict[str, int]
    total_annotations: int
    mean_time_ms: float | None


def annotator_activity(
    store: CurationStore, annotator_id: int, days: int = 30, max_points: int = 500
) -> AnnotatorActivity:
    info = store.get_annotator(annotator_id)  # 404 for an unknown id
    today = _day(int(store.now().timestamp() * 1000))
    start = today - (days - 1) * DAY_MS
    axis = [start + i * DAY_MS for i in range(days)]
    per_day = [0] * days
    events: list[tuple[int, str, bool]] = []  # (ms, "gold" | "agree", correct)
    reviews = {"accepted": 0, "rejected": 0, "corrected": 0}
    total = 0
    spent = 0
    with store.read_cursor() as (cur, sql):
        cur.execute(
            sql.q(
                "SELECT a.created_at_ms, a.time_spent_ms, a.value, t.is_gold, t.gold,"
                " t.status, t.consensus, s.label_schema FROM annotations a"
                " JOIN tasks t ON t.id = a.task_id JOIN task_sets s ON s.id = t.task_set_id"
                " WHERE a.annotator_id = ? ORDER BY a.created_at_ms, a.id"
            ),
            (annotator_id,),
        )
        schemas: dict[str, LabelSchema] = {}
        for created, t_ms, value, is_gold, gold, status, consensus, raw_schema in cur.fetchall():
            total += 1
            spent += int(t_ms)
            d = _day(int(created))
            if d >= start:
                per_day[(d - start) // DAY_MS] += 1
            key = str(raw_schema)
            if key not in schemas:
                schemas[key] = parse_schema(sql.from_json(raw_schema))
            schema = schemas[key]
            v = sql.from_json(value)
            if is_gold:
                events.append(
                    (int(created), "gold", quality.agrees(schema, v, sql.from_json(gold)))
                )
            elif status == "finalised" and sql.from_json(consensus) is not None:
                ok = quality.agrees(schema, v, sql.from_json(consensus))
                events.append((int(created), "agree", ok))
        cur.execute(
            sql.q(
                "SELECT verdict, created_at, value, corrected FROM reviews WHERE annotator_id = ?"
            ),
            (annotator_id,),
        )
        for verdict, at, _value, _corrected in cur.fetchall():
            reviews[verdict] = reviews.get(verdict, 0) + 1
            ms = int(sql.from_ts(at).timestamp() * 1000)
            if verdict != "corrected":
                events.append((ms, "gold", verdict == "accepted"))
    events.sort(key=lambda e: e[0])
    gc = gt = ac = at_ = 0
    points = [(events[0][0] if events else today, quality.reputation_score(0, 0, 0, 0))]
    for ms, kind, ok in events:
        if kind == "gold":
            gt += 1
            gc += int(ok)
        else:
            at_ += 1
            ac += int(ok)
        points.append((ms, quality.reputation_score(gc, gt, ac, at_)))
    if len(points) > max_points:
        step = len(points) / max_points
        points = [points[int(i * step)] for i in range(max_points - 1)] + [points[-1]]
    return AnnotatorActivity(
        days=axis,
        per_day=per_day,
        reputation=points,
        gold_correct=info.gold_correct,
        gold_total=info.gold_total,
        reviews=reviews,
        total_annotations=total,
        mean_time_ms=spent / total if total else None,
    )


def day_label(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%m-%d")
