"""Editing a task set's label configuration after creation: versions, compatibility checks,
and the replicated record of each edit.

A set's label schema is versioned (:class:`swarmlm.curation.models.LabelConfig`): version 1
is the schema it was created with, each edit adds the next. Rules of an edit:

- The kind never changes, nor a ranking's ``k``: the tasks (their outputs) and every stored
  value depend on them. A new task set is the way to do that.
- A change that leaves every stored annotation and gold answer valid (adding a choice,
  widening a rating scale, raising a text limit, reordering choices) applies at once.
- A change that would make stored annotations invalid (removing a used choice, narrowing a
  rating scale past used values, lowering a text limit under used lengths) is refused with
  the offending labels and their counts, unless the caller confirms it. Once confirmed,
  those annotations stay stored (and exported) with the version they were validated against,
  but consensus leaves values outside the schema in force out (``quality``).
- A change that would make a gold answer invalid is always refused: the honeypot could no
  longer be answered correctly. Fix or delete those tasks first.

Worker processes: every process caches parsed schemas keyed by ``(set, config_digest)``, and
reads ``config_digest`` in the same transaction as the write it validates (lease, submit,
merge), so an edit committed by one process is in force in all of them from their next
transaction; no process keeps validating against an old schema.

Replication: the set's definition (and its digest, which task batches are pinned to) never
changes. An edit is a signed ``label_config`` record (set name, definition digest, version,
schema). Every node applies the same rule, a pure function of the records held: the config
in force is the highest version, ties (two nodes editing at once) to the smaller record
digest. A record of version n waits (parked) until version n-1 is held, so nobody can jump a
set to version 100,000 without the versions before it. Receivers do not re-run the
compatibility check against their own annotations (that would make acceptance depend on
local state, and nodes would diverge); annotations a remote edit invalidated here stay
stored and are counted as such on the set's admin page.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from swarmlm.curation.errors import ConflictError, LabelSchemaError, NotFoundError
from swarmlm.curation.group_commit import WriteTx
from swarmlm.curation.replica import ReplicaRecord, make_record
from swarmlm.curation.schema import (
    FreeTextSchema,
    LabelSchema,
    MultipleChoiceSchema,
    RankingSchema,
    SingleChoiceSchema,
    parse_schema,
    schema_to_dict,
    validate_value,
)
from swarmlm.curation.store_base import StoreBase

# (sql with ? placeholders, params) -> rows
Fetch = Callable[[str, Sequence[Any]], list[Any]]


@dataclass(frozen=True)
class LabelUse:
    """A stored label the new schema would refuse, and how often it is used."""

    label: str
    annotations: int = 0
    gold: int = 0


@dataclass(frozen=True)
class ConfigImpact:
    """What a schema would do to the values stored in a set."""

    invalidated: list[LabelUse] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return not self.invalidated

    @property
    def n_annotations(self) -> int:
        return sum(u.annotations for u in self.invalidated)

    @property
    def gold_conflicts(self) -> list[LabelUse]:
        return [u for u in self.invalidated if u.gold]

    def describe(self) -> str:
        parts = []
        for u in self.invalidated:
            counts = []
            if u.annotations:
                counts.append(f"{u.annotations} annotation{'s' if u.annotations != 1 else ''}")
            if u.gold:
                counts.append(f"{u.gold} gold answer{'s' if u.gold != 1 else ''}")
            parts.append(f"{u.label!r} ({', '.join(counts)})")
        return "; ".join(parts)


@dataclass(frozen=True)
class LabelConfigVersion:
    version: int
    schema: LabelSchema
    record_digest: str | None
    created_at: datetime
    in_force: bool
    n_annotations: int


@dataclass(frozen=True)
class LabelConfigChange:
    """The outcome of :meth:`LabelConfigStore.update_label_config`."""

    task_set_id: int
    version: int  # the version in force after the call
    schema: LabelSchema
    changed: bool  # the schema differs from the one in force
    saved: bool  # a new version was written (False for a dry run or no change)
    impact: ConfigImpact


class LabelConfigConflictError(ConflictError):
    """An edit would invalidate stored values; ``impact`` names them."""

    def __init__(self, message: str, impact: ConfigImpact) -> None:
        super().__init__(message)
        self.impact = impact


def check_edit_allowed(current: LabelSchema, new: LabelSchema) -> None:
    """Refuse edits no confirmation can make safe: another kind, another ranking size."""
    if new.kind != current.kind:
        raise LabelSchemaError(
            f"label schema kind cannot change from {current.kind!r} to {new.kind!r}: tasks and "
            "stored annotations depend on it; create a new task set instead"
        )
    if isinstance(current, RankingSchema) and isinstance(new, RankingSchema) and new.k != current.k:
        raise LabelSchemaError(
            f"a ranking's k cannot change ({current.k} -> {new.k}): every task has "
            f"{current.k} outputs; create a new task set instead"
        )


def _offending_labels(schema: LabelSchema, value: Any) -> list[str]:
    """The parts of a stored ``value`` that ``schema`` refuses (empty: it is valid)."""
    try:
        validate_value(schema, value)
        return []
    except LabelSchemaError:
        pass
    if isinstance(schema, SingleChoiceSchema):
        return [str(value)]
    if isinstance(schema, MultipleChoiceSchema) and isinstance(value, list):
        return [str(c) for c in value if c not in schema.choices] or [json.dumps(value)]
    if isinstance(schema, FreeTextSchema) and isinstance(value, str):
        return [f"answers over {schema.max_length} characters"]
    return [json.dumps(value)]


def config_impact(
    schema: LabelSchema,
    annotation_values: Counter[str],
    gold_values: Counter[str],
    baseline: LabelSchema | None = None,
) -> ConfigImpact:
    """Which stored values ``schema`` would refuse. Values are keyed by their JSON text.

    With ``baseline`` (the schema in force), values it already refuses are not counted: an
    edit is charged only with what it newly invalidates.
    """
    ann: Counter[str] = Counter()
    gold: Counter[str] = Counter()
    for values, into in ((annotation_values, ann), (gold_values, gold)):
        for text, n in values.items():
            value = json.loads(text)
            if baseline is not None and _offending_labels(baseline, value):
                continue
            for label in _offending_labels(schema, value):
                into[label] += n
    labels = sorted(set(ann) | set(gold))
    return ConfigImpact([LabelUse(lab, ann[lab], gold[lab]) for lab in labels])


def stored_values(fetch: Fetch, task_set_id: int) -> tuple[Counter[str], Counter[str]]:
    """Distinct annotation values and gold answers of a set, as JSON text -> count."""
    # CAST to text: PostgreSQL's json type has no equality, so it cannot be grouped as is.
    ann_rows = fetch(
        "SELECT CAST(a.value AS TEXT), COUNT(*) FROM annotations a"
        " JOIN tasks t ON t.id = a.task_id WHERE t.task_set_id = ?"
        " GROUP BY CAST(a.value AS TEXT)",
        (task_set_id,),
    )
    gold_rows = fetch(
        "SELECT CAST(gold AS TEXT), COUNT(*) FROM tasks WHERE task_set_id = ? AND is_gold = ?"
        " GROUP BY CAST(gold AS TEXT)",
        (task_set_id, True),
    )
    return (
        Counter({_normal_json(v): int(n) for v, n in ann_rows if v is not None}),
        Counter({_normal_json(v): int(n) for v, n in gold_rows if v is not None}),
    )


def _normal_json(text: str) -> str:
    return json.dumps(json.loads(text))


def apply_config_in_force(tx: WriteTx, task_set_id: int) -> None:
    """Make the set's config in force the highest version held, ties to the smaller digest.

    A pure function of the ``label_configs`` rows, so every node holding the same records
    ends with the same schema whatever order they arrived in.
    """
    version, raw, digest = tx.one(
        "SELECT version, label_schema, record_digest FROM label_configs WHERE task_set_id = ?"
        " ORDER BY version DESC, record_digest ASC LIMIT 1",
        (task_set_id,),
    )
    tx.execute(
        "UPDATE task_sets SET label_schema = ?json, config_version = ?, config_digest = ?"
        " WHERE id = ?",
        (tx.sql.json(tx.sql.from_json(raw)), int(version), digest, task_set_id),
    )


def held_schemas(tx: WriteTx, task_set_id: int) -> list[tuple[int, LabelSchema]]:
    """Every held version of a set's schema, newest first."""
    rows = tx.execute(
        "SELECT version, label_schema FROM label_configs WHERE task_set_id = ?"
        " ORDER BY version DESC, record_digest ASC",
        (task_set_id,),
    ).fetchall()
    return [(int(v), parse_schema(tx.sql.from_json(raw))) for v, raw in rows]


def insert_config_row(
    tx: WriteTx,
    task_set_id: int,
    version: int,
    schema: LabelSchema,
    record_digest: str | None,
    now: datetime,
) -> None:
    tx.execute(
        "INSERT INTO label_configs (task_set_id, version, label_schema, record_digest,"
        " created_at) VALUES (?, ?, ?json, ?, ?)",
        (task_set_id, version, tx.sql.json(schema_to_dict(schema)), record_digest, tx.sql.ts(now)),
    )


class LabelConfigStore(StoreBase):
    """The label configuration part of :class:`swarmlm.curation.store.CurationStore`."""

    def label_config_history(self, task_set_id: int) -> list[LabelConfigVersion]:
        """Every version of the set's label schema, newest first, with annotation counts."""
        ts = self.get_task_set(task_set_id)
        with self.read_cursor() as (cur, sql):
            cur.execute(
                sql.q(
                    "SELECT c.version, c.label_schema, c.record_digest, c.created_at,"
                    " s.config_version, s.config_digest FROM label_configs c"
                    " JOIN task_sets s ON s.id = c.task_set_id WHERE c.task_set_id = ?"
                    " ORDER BY c.version DESC, c.record_digest ASC"
                ),
                (task_set_id,),
            )
            rows = cur.fetchall()
            cur.execute(
                sql.q(
                    "SELECT a.config_version, COUNT(*) FROM annotations a"
                    " JOIN tasks t ON t.id = a.task_id WHERE t.task_set_id = ?"
                    " GROUP BY a.config_version"
                ),
                (task_set_id,),
            )
            counts = {int(v): int(n) for v, n in cur.fetchall()}
        out = []
        for version, raw, digest, created, in_version, in_digest in rows:
            out.append(
                LabelConfigVersion(
                    version=int(version),
                    schema=parse_schema(sql.from_json(raw)),
                    record_digest=digest,
                    created_at=sql.from_ts(created),
                    in_force=int(version) == int(in_version) and digest == in_digest,
                    n_annotations=counts.get(int(version), 0),
                )
            )
        if not out:  # pragma: no cover - every set has its version 1 row
            out.append(LabelConfigVersion(1, ts.schema, None, self.now(), True, 0))
        return out

    def label_config_impact(
        self, task_set_id: int, schema: Any, baseline: LabelSchema | None = None
    ) -> ConfigImpact:
        """What ``schema`` would do to the values stored in the set (read only).

        Without ``baseline``, and with ``schema`` the config in force: the stored values it
        refuses (left by a confirmed or replicated edit), as flagged on the admin page.
        """
        parsed = parse_schema(schema)
        self.get_task_set(task_set_id)  # NotFoundError for an unknown set
        with self.read_cursor() as (cur, sql):

            def fetch(q: str, params: Sequence[Any]) -> list[Any]:
                cur.execute(sql.q(q), params)
                return list(cur.fetchall())

            ann, gold = stored_values(fetch, task_set_id)
        return config_impact(parsed, ann, gold, baseline)

    def update_label_config(
        self,
        task_set_id: int,
        schema: Any,
        *,
        confirm: bool = False,
        dry_run: bool = False,
        expected_version: int | None = None,
    ) -> LabelConfigChange:
        """Make ``schema`` the set's label configuration (a new version), or say why not.

        Raises :class:`LabelSchemaError` for an invalid schema or a change of kind (or of a
        ranking's k), :class:`LabelConfigConflictError` when stored values would become
        invalid (always for gold answers; for annotations unless ``confirm``), and
        :class:`ConflictError` when ``expected_version`` is given and another version is in
        force (someone else edited meanwhile). ``dry_run`` checks everything and saves
        nothing. The check and the write run in one write transaction, so no annotation
        can slip in between them.
        """
        parsed = parse_schema(schema)
        ts = self.get_task_set(task_set_id)
        check_edit_allowed(ts.schema, parsed)
        if dry_run:
            impact = self.label_config_impact(task_set_id, parsed, baseline=ts.schema)
            return self._check_edit(
                task_set_id,
                parsed,
                ts.config_version,
                ts.schema,
                confirm=confirm,
                expected_version=expected_version,
                impact=impact,
            )
        # The definition record must exist before an edit record can refer to it.
        ts_digest = self._task_set_digest(task_set_id)
        made: list[ReplicaRecord] = []

        def write(tx: WriteTx) -> LabelConfigChange:
            row = tx.one(
                "SELECT name, label_schema, config_version FROM task_sets WHERE id = ?",
                (task_set_id,),
            )
            if row is None:
                raise NotFoundError(f"task set {task_set_id} does not exist")
            name, raw, version = row[0], tx.sql.from_json(row[1]), int(row[2])
            current = parse_schema(raw)

            def fetch(q: str, params: Sequence[Any]) -> list[Any]:
                return list(tx.execute(q, params).fetchall())

            ann, gold = stored_values(fetch, task_set_id)
            change = self._check_edit(
                task_set_id,
                parsed,
                version,
                current,
                confirm=confirm,
                expected_version=expected_version,
                impact=config_impact(parsed, ann, gold, current),
            )
            if not change.changed:
                return change
            (top,) = tx.one(
                "SELECT MAX(version) FROM label_configs WHERE task_set_id = ?", (task_set_id,)
            )
            new_version = max(int(top or 1), version) + 1
            rec = make_record(
                self.identity,
                "label_config",
                {
                    "task_set": name,
                    "task_set_digest": ts_digest,
                    "version": new_version,
                    "schema": schema_to_dict(parsed),
                },
            )
            now = self.now()
            insert_config_row(tx, task_set_id, new_version, parsed, rec.hex, now)
            apply_config_in_force(tx, task_set_id)
            self._insert_record_tx(tx, rec, int(now.timestamp() * 1000))
            made.append(rec)
            return LabelConfigChange(task_set_id, new_version, parsed, True, True, change.impact)

        result = self.run_write(write)
        self._notify(made)
        return result

    @staticmethod
    def _check_edit(
        task_set_id: int,
        new: LabelSchema,
        version: int,
        current: LabelSchema,
        *,
        confirm: bool,
        expected_version: int | None,
        impact: ConfigImpact,
    ) -> LabelConfigChange:
        if expected_version is not None and expected_version != version:
            raise ConflictError(
                f"task set {task_set_id}: label configuration version {version} is in force, "
                f"but the edit was made against version {expected_version}; reload and retry"
            )
        if impact.gold_conflicts:
            raise LabelConfigConflictError(
                f"task set {task_set_id}: the new label configuration refuses gold answers "
                f"in use: {ConfigImpact(impact.gold_conflicts).describe()}; change or delete "
                "those gold tasks first",
                impact,
            )
        if impact.invalidated and not confirm:
            raise LabelConfigConflictError(
                f"task set {task_set_id}: the new label configuration refuses labels already "
                f"used: {impact.describe()}; confirm to keep those annotations stored but "
                "left out of consensus",
                impact,
            )
        changed = schema_to_dict(new) != schema_to_dict(current)
        return LabelConfigChange(task_set_id, version, new if changed else current, changed,
                                 False, impact)  # fmt: skip
