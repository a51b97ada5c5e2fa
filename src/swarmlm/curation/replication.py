"""Everything the store does for replication: the signed record of every local change, the
listeners that publish them, anti-entropy reads, and merging peers' records (union by
digest, conflicts resolved the same way on every node).

The record format lives in ``replica.py`` (pure), the network side in
``swarmlm.node.replication.CurationReplicator``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from swarmlm.curation import quality
from swarmlm.curation.entities import (
    POINTS_FOR_AGREEMENT,
    POINTS_PER_ANNOTATION,
    USERNAME_ALLOWED,
    LocalChange,
    MergeResult,
    ScoreChange,
    T,
    _check_task_set_name,
    _score_agreement,
)
from swarmlm.curation.errors import (
    CurationError,
    NotFoundError,
)
from swarmlm.curation.group_commit import WriteTx
from swarmlm.curation.label_config import (
    apply_config_in_force,
    check_edit_allowed,
    held_schemas,
    insert_config_row,
)
from swarmlm.curation.models import (
    Annotation,
    Annotator,
    ReplicaRecordRow,
    Task,
    TaskSet,
)
from swarmlm.curation.replica import (
    KIND_ORDER,
    TASK_BATCH,
    RecordError,
    ReplicaRecord,
    annotation_record,
    definition_digest,
    make_record,
)
from swarmlm.curation.schema import (
    LabelSchema,
    parse_schema,
    schema_to_dict,
    validate_task,
    validate_value,
)
from swarmlm.curation.signing import signed_record, task_digest
from swarmlm.curation.store_base import StoreBase
from swarmlm.curation.task_set_settings import record_body, settings_of, settings_of_record

log = logging.getLogger(__name__)


def qualified_username(username: str, public_id: str) -> str:
    """The name a peer's account is held under when its own name is taken here.

    ``~`` is not allowed in registered names, so this never collides with one.
    """
    return f"{username[:57]}~{public_id[:6]}"


def _merge_order(r: ReplicaRecord) -> tuple[int, int, bytes]:
    """Dependencies first: by kind, label config versions in order, then by digest."""
    version = r.body["version"] if r.kind == "label_config" else 0
    return KIND_ORDER[r.kind], version, r.digest


class _NeedsDependencyError(Exception):
    """A record needs another record first (internal to the merge)."""


class _LostConflictError(Exception):
    """A record loses to one already applied (internal to the merge)."""


class ReplicationStore(StoreBase):
    # -- replication ----------------------------------------------------------------------
    # Every local change that other nodes need (task set, task batch, account, annotation)
    # writes its signed record into ``replica_records`` in the same transaction, so what the
    # store holds and what it can serve to peers never disagree. See docs/curation-replication.md.
    def add_listener(self, callback: Callable[[LocalChange], None]) -> None:
        """Call ``callback(change)`` after each committed local change, on the thread that
        made it (a worker thread or the event loop): it must be quick and thread-safe."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[LocalChange], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(
        self, records: list[ReplicaRecord], finalised: list[tuple[str, str]] | None = None
    ) -> None:
        if not records:
            return
        change = LocalChange(records, finalised or [])
        for cb in list(self._listeners):
            try:
                cb(change)
            except Exception:
                log.exception("replication listener %r failed", cb)

    def _add_record_rows(self, s: Session, records: list[ReplicaRecord]) -> None:
        now_ms = int(self._clock().timestamp() * 1000)
        for r in records:
            s.add(ReplicaRecordRow(digest=r.hex, kind=r.kind, payload=r.raw, created_at_ms=now_ms))

    @staticmethod
    def _insert_record_tx(tx: WriteTx, record: ReplicaRecord, now_ms: int) -> None:
        tx.execute(
            "INSERT INTO replica_records (digest, kind, payload, created_at_ms)"
            " VALUES (?, ?, ?, ?)",
            (record.hex, record.kind, record.raw, now_ms),
        )

    def _task_set_digest(self, task_set_id: int) -> str:
        """The set's definition record digest, making the record first for an old set."""
        with self._read() as s:
            d = s.scalar(select(TaskSet.record_digest).where(TaskSet.id == task_set_id))
        if d is None:
            self.ensure_records()
            with self._read() as s:
                d = s.scalar(select(TaskSet.record_digest).where(TaskSet.id == task_set_id))
        if d is None:
            raise NotFoundError(f"task set {task_set_id} does not exist")
        return str(d)

    def _task_batch_records(
        self, task_set_name: str, ts_digest: str, rows: list[dict[str, Any]]
    ) -> list[ReplicaRecord]:
        """Sign ``rows`` (task insert dicts) in batches; sets each row's ``record_digest``."""
        out: list[ReplicaRecord] = []
        for start in range(0, len(rows), TASK_BATCH):
            chunk = rows[start : start + TASK_BATCH]
            rec = make_record(
                self.identity,
                "tasks",
                {
                    "task_set": task_set_name,
                    "task_set_digest": ts_digest,
                    "tasks": [
                        {
                            "external_id": r["external_id"],
                            "content": r["content"],
                            "outputs": r["outputs"],
                            "gold": r["gold"],
                        }
                        for r in chunk
                    ],
                },
            )
            for r in chunk:
                r["record_digest"] = rec.hex
            out.append(rec)
        return out

    def ensure_records(self) -> int:
        """Sign records for rows made before replication existed; returns how many.

        Task sets, tasks and accounts made here are signed by this node; old annotations keep
        the signature they already carry. Idempotent (rows with a record are skipped).
        """
        made: list[ReplicaRecord] = []
        with self._write() as s:
            for ts in s.scalars(select(TaskSet).where(TaskSet.record_digest.is_(None))):
                body = record_body(ts.name, ts.description, ts.label_schema, settings_of(ts))
                rec = make_record(self.identity, "task_set", body)
                ts.record_digest = definition_digest(rec.body)
                made.append(rec)
            s.flush()
            sets = {ts.id: ts for ts in s.scalars(select(TaskSet))}
            by_set: dict[int, list[Task]] = {}
            for t in s.scalars(select(Task).where(Task.record_digest.is_(None)).order_by(Task.id)):
                by_set.setdefault(t.task_set_id, []).append(t)
            for ts_id, tasks in by_set.items():
                ts = sets[ts_id]
                rows = [
                    {
                        "external_id": t.external_id,
                        "content": t.content,
                        "outputs": t.outputs,
                        "gold": t.gold,
                    }
                    for t in tasks
                ]
                made += self._task_batch_records(ts.name, str(ts.record_digest), rows)
                for t, r in zip(tasks, rows, strict=True):
                    t.record_digest = r["record_digest"]
            for a in s.scalars(select(Annotator).where(Annotator.record_digest.is_(None))):
                rec = make_record(
                    self.identity,
                    "annotator",
                    {"public_id": a.public_id, "username": a.username,
                     "password_hash": a.password_hash},
                )  # fmt: skip
                a.record_digest = rec.hex
                made.append(rec)
            rows_a = s.execute(
                select(Annotation, Task.digest, Annotator.public_id, TaskSet.name)
                .join(Task, Task.id == Annotation.task_id)
                .join(TaskSet, TaskSet.id == Task.task_set_id)
                .join(Annotator, Annotator.id == Annotation.annotator_id)
                .where(Annotation.digest.is_(None))
            ).all()
            for ann, tdigest, pub, ts_name in rows_a:
                body = signed_record(tdigest, pub, ann.value, ann.time_spent_ms, ann.created_at_ms)
                rec = annotation_record(
                    self.identity, ts_name, body, ann.signer_public_key, ann.signature
                )
                ann.digest = rec.hex
                made.append(rec)
            held = set(s.scalars(select(ReplicaRecordRow.digest)))
            self._add_record_rows(s, [r for r in made if r.hex not in held])
        if made:
            log.info("signed %d replication records for rows made before replication", len(made))
        return len(made)

    def record_digests(self) -> list[bytes]:
        """Digests of every record held (the anti-entropy summary is built from these)."""
        with self._read() as s:
            return [bytes.fromhex(d) for d in s.scalars(select(ReplicaRecordRow.digest))]

    def get_records(self, digests: Iterable[bytes]) -> list[bytes]:
        """The wire bytes of the held records among ``digests`` (unknown ones are skipped)."""
        wanted = [d.hex() for d in digests]
        out: list[tuple[str, bytes]] = []
        with self._read() as s:
            for start in range(0, len(wanted), 500):
                out += [
                    (k, bytes(p))
                    for k, p in s.execute(
                        select(ReplicaRecordRow.kind, ReplicaRecordRow.payload).where(
                            ReplicaRecordRow.digest.in_(wanted[start : start + 500])
                        )
                    ).all()
                ]
        out.sort(key=lambda kp: KIND_ORDER.get(kp[0], 99))  # dependencies first
        return [p for _, p in out]

    def update_preferences(self, prefer: Callable[[str], bool] | None) -> int:
        """Mark which tasks this node serves first (``prefer(task digest)``); None: all.

        Also used for tasks added or merged later. Returns how many tasks changed.
        """
        self.task_preference = prefer
        with self._write() as s:
            rows = s.execute(select(Task.id, Task.digest, Task.preferred)).all()
            changes = [
                {"tid": tid, "p": want}
                for tid, dg, cur in rows
                if (want := 1 if prefer is None or prefer(dg) else 0) != cur
            ]
            if changes:
                s.connection().execute(
                    update(Task.__table__)  # type: ignore[arg-type]
                    .where(Task.__table__.c.id == bindparam("tid"))
                    .values(preferred=bindparam("p")),
                    changes,
                )
        return len(changes)

    def merge_records(self, records: list[ReplicaRecord]) -> MergeResult:
        """Apply verified records from peers in one transaction (idempotent: union by digest).

        ``records`` must come from :func:`swarmlm.curation.replica.decode_record` (shape and
        signature checked); the rules that need the database are checked here. Records are
        applied in dependency order (task sets, tasks, accounts, annotations).
        """
        ordered = sorted(records, key=_merge_order)
        return self._committer.run(lambda tx: self._merge_tx(tx, ordered))

    async def merge_records_async(self, records: list[ReplicaRecord]) -> MergeResult:
        """:meth:`merge_records` for an event loop."""
        ordered = sorted(records, key=_merge_order)
        return await self._committer.run_async(lambda tx: self._merge_tx(tx, ordered))

    def _merge_tx(self, tx: WriteTx, records: list[ReplicaRecord]) -> MergeResult:
        out = MergeResult()
        now = self._clock()
        now_ms = int(now.timestamp() * 1000)
        seen: set[bytes] = set()
        for rec in records:
            if rec.digest in seen or tx.one(
                "SELECT 1 FROM replica_records WHERE digest = ?", (rec.hex,)
            ):
                out.duplicates += 1
                continue
            seen.add(rec.digest)
            tx.execute("SAVEPOINT replica_record")
            try:
                if rec.kind == "task_set":
                    self._merge_task_set(tx, rec, now)
                elif rec.kind == "label_config":
                    self._merge_label_config(tx, rec, now)
                elif rec.kind == "tasks":
                    self._merge_tasks(tx, rec, now)
                elif rec.kind == "annotator":
                    self._merge_annotator(tx, rec, now)
                else:
                    done = self._merge_annotation(tx, rec, now)
                    if done is not None:
                        out.finalised.append(done)
            except _NeedsDependencyError:
                tx.execute("ROLLBACK TO SAVEPOINT replica_record")
                tx.execute("RELEASE SAVEPOINT replica_record")
                seen.discard(rec.digest)
                out.parked.append(rec)
                continue
            except _LostConflictError as c:
                # Held (so anti-entropy stops offering it) but not applied: first one wins.
                tx.execute("ROLLBACK TO SAVEPOINT replica_record")
                tx.execute("RELEASE SAVEPOINT replica_record")
                self._insert_record_tx(tx, rec, now_ms)
                out.conflicts.append((rec.hex, str(c)))
                continue
            except (CurationError, ValueError, TypeError, KeyError) as e:
                tx.execute("ROLLBACK TO SAVEPOINT replica_record")
                tx.execute("RELEASE SAVEPOINT replica_record")
                detail = e.detail if isinstance(e, RecordError) else str(e)
                out.invalid.append((rec, f"{rec.kind} record {rec.hex[:12]}: {detail}"))
                continue
            self._insert_record_tx(tx, rec, now_ms)
            tx.execute("RELEASE SAVEPOINT replica_record")
            out.accepted.append(rec)
        return out

    def _merge_task_set(self, tx: WriteTx, rec: ReplicaRecord, now: datetime) -> None:
        b = rec.body
        parsed = parse_schema(b["schema"])
        settings = settings_of_record(b).model_dump()
        _check_task_set_name(b["name"])
        if b["name"] != b["name"].strip():
            raise CurationError("task set name has surrounding spaces")
        definition = definition_digest(b)
        row = tx.one("SELECT record_digest FROM task_sets WHERE name = ?", (b["name"],))
        if row is not None:
            if row[0] == definition:
                return  # the same definition, made on another node too: one set
            raise _LostConflictError(f"a different task set named {b['name']!r} is held")
        # the settings' columns are named after TaskSetSettings' fields (models.TaskSet)
        tx.execute(
            f"INSERT INTO task_sets (name, description, label_schema, {', '.join(settings)},"
            " active, created_at, record_digest)"
            f" VALUES (?, ?, ?json, {', '.join('?' for _ in settings)}, ?, ?, ?)",
            (
                b["name"],
                b["description"],
                tx.sql.json(schema_to_dict(parsed)),
                *settings.values(),
                True,
                tx.sql.ts(now),
                definition,
            ),
        )
        (ts_id,) = tx.one("SELECT id FROM task_sets WHERE name = ?", (b["name"],))
        insert_config_row(tx, int(ts_id), 1, parsed, None, now)

    def _merge_label_config(self, tx: WriteTx, rec: ReplicaRecord, now: datetime) -> None:
        """A new version of a set's label schema; the one in force is recomputed (see
        ``label_config.py``: highest version, ties to the smaller record digest)."""
        b = rec.body
        row = tx.one("SELECT id, record_digest FROM task_sets WHERE name = ?", (b["task_set"],))
        if row is None:
            raise _NeedsDependencyError(f"task set {b['task_set']!r} not held yet")
        ts_id, ts_digest = int(row[0]), row[1]
        if ts_digest != b["task_set_digest"]:
            raise _LostConflictError(f"label config of another definition of {b['task_set']!r}")
        parsed = parse_schema(b["schema"])
        versions = held_schemas(tx, ts_id)
        first = [s for v, s in versions if v == 1]
        if first:
            check_edit_allowed(first[0], parsed)
        if not any(v == b["version"] - 1 for v, _ in versions):
            raise _NeedsDependencyError(
                f"label config {b['version']} of {b['task_set']!r} needs version {b['version'] - 1}"
            )
        insert_config_row(tx, ts_id, b["version"], parsed, rec.hex, now)
        apply_config_in_force(tx, ts_id)

    @staticmethod
    def _first_valid(
        tx: WriteTx,
        ts_id: int,
        current: tuple[LabelSchema, int],
        check: Callable[[LabelSchema], T],
    ) -> tuple[int, T]:
        """``(version, check(schema))`` for the config in force, else the newest held version
        that passes (a peer may have validated under a version edited since); raises the
        in-force version's error when none does."""
        try:
            return current[1], check(current[0])
        except CurationError as first_error:
            for version, schema in held_schemas(tx, ts_id):
                try:
                    return version, check(schema)
                except CurationError:
                    continue
            raise first_error

    def _merge_tasks(self, tx: WriteTx, rec: ReplicaRecord, now: datetime) -> None:
        b = rec.body
        row = tx.one("SELECT id, record_digest, k FROM task_sets WHERE name = ?", (b["task_set"],))
        if row is None:
            raise _NeedsDependencyError(f"task set {b['task_set']!r} not held yet")
        ts_id, ts_digest, k = row
        if ts_digest != b["task_set_digest"]:
            raise _LostConflictError(f"tasks of another definition of set {b['task_set']!r}")
        schema, version, _ = self._schema_version(tx, ts_id)
        current = (schema, version)
        prefer = self.task_preference
        sql = tx.sql
        for i, t in enumerate(b["tasks"]):
            _, (content, outputs, gold) = self._first_valid(
                tx,
                ts_id,
                current,
                lambda s, t=t, i=i: validate_task(  # type: ignore[misc]
                    s, t["content"], t["outputs"], t["gold"], where=f"task {i + 1}"
                ),
            )
            digest = task_digest(t["external_id"], content, outputs)
            if tx.one(
                "SELECT 1 FROM tasks WHERE task_set_id = ? AND external_id = ?",
                (ts_id, t["external_id"]),
            ):
                continue  # another batch added this external id first: it stays
            tx.execute(
                "INSERT INTO tasks (task_set_id, external_id, content, outputs, gold, is_gold,"
                " digest, needed, n_annotations, n_leased, status, created_at, record_digest,"
                " preferred) VALUES (?, ?, ?json, ?json, ?json, ?, ?, ?, 0, 0, 'open', ?, ?, ?)",
                (
                    ts_id,
                    t["external_id"],
                    sql.json(content),
                    sql.json(outputs),
                    sql.json(gold),
                    gold is not None,
                    digest,
                    k,
                    sql.ts(now),
                    rec.hex,
                    1 if prefer is None or prefer(digest) else 0,
                ),
            )

    def _merge_annotator(self, tx: WriteTx, rec: ReplicaRecord, now: datetime) -> None:
        b = rec.body
        if not set(b["username"]) <= USERNAME_ALLOWED:
            raise CurationError(f"username {b['username']!r} has characters not allowed")
        row = tx.one("SELECT username FROM annotators WHERE public_id = ?", (b["public_id"],))
        if row is not None:
            raise _LostConflictError(f"account {b['public_id']} is already held")
        # Two accounts made on two nodes under one name (two "admin"s, typically) are both
        # held, so each one's annotations merge everywhere; one keeps the plain name: the
        # local account on its own node, and between two peers' accounts the smaller record
        # digest, so every node that holds neither names them alike whatever the order.
        name = b["username"]
        held = tx.one(
            "SELECT id, public_id, origin, record_digest FROM annotators WHERE username = ?",
            (name,),
        )
        if held is not None:
            held_id, held_public, held_origin, held_digest = held
            if held_origin is not None and held_digest is not None and rec.hex < held_digest:
                tx.execute(
                    "UPDATE annotators SET username = ? WHERE id = ?",
                    (qualified_username(name, held_public), held_id),
                )
                tx.execute("UPDATE auth_epoch SET epoch = epoch + 1 WHERE id = 1")
            else:
                name = qualified_username(name, b["public_id"])
                if tx.one("SELECT 1 FROM annotators WHERE username = ?", (name,)):
                    raise _LostConflictError(f"username {name!r} is taken here")
        # The role never travels: whatever it was at its origin, here it is an annotator.
        tx.execute(
            "INSERT INTO annotators (public_id, username, password_hash, role, disabled,"
            " created_at, points, reputation, gold_correct, gold_total, agree_count,"
            " agree_total, record_digest, origin)"
            " VALUES (?, ?, ?, 'annotator', ?, ?, 0, ?, 0, 0, 0, 0, ?, ?)",
            (
                b["public_id"],
                name,
                b["password_hash"],
                False,
                tx.sql.ts(now),
                quality.reputation_score(0, 0, 0, 0),
                rec.hex,
                rec.signer.hex(),
            ),
        )

    def _merge_annotation(
        self, tx: WriteTx, rec: ReplicaRecord, now: datetime
    ) -> tuple[str, str] | None:
        b = rec.body["annotation"]
        sql = tx.sql
        task = tx.one(
            "SELECT t.id, t.task_set_id, t.is_gold, t.gold, s.name, t.external_id"
            " FROM tasks t JOIN task_sets s ON s.id = t.task_set_id"
            " WHERE s.name = ? AND t.digest = ?",
            (rec.body["task_set"], b["task_digest"]),
        )
        if task is None:
            raise _NeedsDependencyError(f"task {b['task_digest'][:12]} not held yet")
        ann = tx.one("SELECT id FROM annotators WHERE public_id = ?", (b["annotator_id"],))
        if ann is None:
            raise _NeedsDependencyError(f"account {b['annotator_id']} not held yet")
        task_id, ts_id, is_gold, gold, ts_name, ext = task
        annotator_id = int(ann[0])
        schema = self._schema(tx, ts_id)  # in force: consensus is computed under it
        # Validated against exactly the config it was made under (named by the record).
        made_under = self._config_schema(tx, ts_id, rec.body.get("label_config"))
        if made_under is None:
            raise _NeedsDependencyError(
                f"label config {rec.body['label_config'][:12]} not held yet"
            )
        validate_value(made_under[0], b["value"])
        config_version = made_under[1]
        row = (
            b["value"],
            b["time_spent_ms"],
            b["created_at_ms"],
            rec.body["signer"].hex(),
            rec.body["signature"].hex(),
            rec.hex,
        )
        existing = tx.one(
            "SELECT id, digest FROM annotations WHERE task_id = ? AND annotator_id = ?",
            (task_id, annotator_id),
        )
        changes: dict[int, ScoreChange] = {}
        if existing is not None:
            # Two nodes accepted an answer of one annotator to one task: the smaller record
            # digest wins everywhere, whatever order they arrive in.
            if existing[1] is None or existing[1] <= rec.hex:
                raise _LostConflictError(f"annotator already answered task {ext!r}: kept that")
            tx.execute(
                "UPDATE annotations SET value = ?json, time_spent_ms = ?, created_at_ms = ?,"
                " signer_public_key = ?, signature = ?, digest = ?, config_version = ?"
                " WHERE id = ?",
                (sql.json(row[0]), *row[1:], config_version, existing[0]),
            )
        else:
            tx.execute(
                "INSERT INTO annotations (task_id, annotator_id, value, time_spent_ms,"
                " created_at_ms, signer_public_key, signature, digest, config_version)"
                " VALUES (?, ?, ?json, ?, ?, ?, ?, ?, ?)",
                (task_id, annotator_id, sql.json(row[0]), *row[1:], config_version),
            )
            asg = tx.one(
                "SELECT id, state FROM assignments WHERE task_id = ? AND annotator_id = ?",
                (task_id, annotator_id),
            )
            if asg is None:
                tx.execute(
                    "INSERT INTO assignments (task_id, annotator_id, state, leased_at,"
                    " expires_at) VALUES (?, ?, 'submitted', ?, ?)",
                    (task_id, annotator_id, sql.ts(now), sql.ts(now)),
                )
            else:
                tx.execute("UPDATE assignments SET state = 'submitted' WHERE id = ?", (asg[0],))
                if asg[1] == "leased":
                    tx.execute("UPDATE tasks SET n_leased = n_leased - 1 WHERE id = ?", (task_id,))
            tx.execute(
                "UPDATE tasks SET n_annotations = n_annotations + 1 WHERE id = ?", (task_id,)
            )
            ch = changes.setdefault(annotator_id, ScoreChange())
            ch.points.append((POINTS_PER_ANNOTATION, "annotation"))
            if is_gold:
                correct = quality.agrees(schema, b["value"], sql.from_json(gold))
                ch.gold = correct
                if correct:
                    ch.points.append((POINTS_FOR_AGREEMENT, "gold correct"))
        finalised = False
        if not is_gold:
            finalised = self._settle_task(tx, task_id, ts_id, schema, changes)
        if changes:
            self._apply_scores(tx, changes, task_id, now)
        return (ts_name, ext) if finalised else None

    def _settle_task(
        self,
        tx: WriteTx,
        task_id: int,
        task_set_id: int,
        schema: LabelSchema,
        changes: dict[int, ScoreChange],
    ) -> bool:
        """Consensus, status and ``needed`` of a task as a pure function of its annotations.

        Annotations are taken in record-digest order and weigh the same, so every node that
        holds the same set computes the same result. Finalised when at least ``k`` agree
        enough, or at the cap; otherwise one more annotation is asked for. Returns True when
        this call finalised the task (agreement points are awarded then).
        """
        sql = tx.sql
        k, threshold, cap = tx.one(
            "SELECT k, agreement_threshold, max_annotations FROM task_sets WHERE id = ?",
            (task_set_id,),
        )
        (status,) = tx.one("SELECT status FROM tasks WHERE id = ?", (task_id,))
        rows = sorted(
            (digest or "", int(aid), sql.from_json(value))
            for aid, value, digest in tx.execute(
                "SELECT annotator_id, value, digest FROM annotations WHERE task_id = ?",
                (task_id,),
            ).fetchall()
        )
        n = len(rows)
        if n < k:
            tx.execute(
                "UPDATE tasks SET consensus = ?json, agreement = NULL, confidence = NULL,"
                " needed = ?, status = 'open' WHERE id = ?",
                (sql.json(None), k, task_id),
            )
            return False
        values = [v for _, _, v in rows]
        result = quality.task_consensus(schema, values, [quality.PRIOR_MEAN] * n)
        enough = result.agreement is None or result.agreement >= threshold
        final = enough or n >= cap
        tx.execute(
            "UPDATE tasks SET consensus = ?json, agreement = ?, confidence = ?, needed = ?,"
            " status = ? WHERE id = ?",
            (
                sql.json(result.label),
                result.agreement,
                result.confidence,
                n if final else n + 1,
                "finalised" if final else "open",
                task_id,
            ),
        )
        if status == "finalised" and not final:
            log.info("task %d reopened: late annotations lowered its agreement", task_id)
        if not final or status == "finalised":
            return False
        if result.label is not None:
            _score_agreement(
                changes, schema, [(aid, value) for _, aid, value in rows], result.label
            )
        return True
