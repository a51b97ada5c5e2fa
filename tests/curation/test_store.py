"""The curation store on SQLite and on a real PostgreSQL server (see conftest.py)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, insert, select, text
from tests.curation.conftest import insert_old_task_set

from swarmlm.curation.db import create_engines, migrate
from swarmlm.curation.errors import (
    AuthError,
    ConflictError,
    CurationError,
    LabelSchemaError,
    NotFoundError,
)
from swarmlm.curation.group_commit import GroupCommitter, WriteTx
from swarmlm.curation.models import (
    SEARCH_INDEX_NAMES,
    Annotator,
    Assignment,
    Base,
    Task,
)
from swarmlm.curation.signing import signed_record, task_digest, verify_record
from swarmlm.curation.store import CurationStore, TaskInput

CHOICES = {"kind": "single_choice", "choices": ["pos", "neg", "neutral"]}


def _users(store: CurationStore, n: int, prefix: str = "user") -> list[int]:
    return [store.create_annotator(f"{prefix}{i}", "correct horse").id for i in range(n)]


def _set(store: CurationStore, n_tasks: int = 5, **kw: Any) -> int:
    kw.setdefault("gold_share", 0.0)
    ts = store.create_task_set("set", kw.pop("schema", CHOICES), **kw)
    store.add_tasks(ts.id, [TaskInput(content=f"text {i}") for i in range(n_tasks)])
    return ts.id


def test_migrations_produce_exactly_the_models_schema(store: CurationStore) -> None:
    def ours(name: str | None, type_: str, parent_names: object) -> bool:
        # the content search index is dialect-specific and kept outside the models
        return not (name or "").startswith(SEARCH_INDEX_NAMES)

    with store.engines.read.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": ours})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_reopening_an_existing_store_keeps_its_data(
    make_store: Callable[..., CurationStore],
) -> None:
    first = make_store()
    ts_id = _set(first, n_tasks=3)
    (uid,) = _users(first, 1)
    lt = first.next_task(uid, ts_id)
    assert lt is not None
    first.submit(uid, lt.task_id, "pos", 1200)
    first.close()
    second = make_store()  # runs the migrations again: must be a no-op
    assert second.count_annotations() == 1
    assert len(second.list_tasks(ts_id)) == 3


def test_annotator_is_never_offered_the_same_task_twice(store: CurationStore) -> None:
    ts_id = _set(store, n_tasks=4, k=2)
    (uid,) = _users(store, 1)
    seen = []
    while (lt := store.next_task(uid, ts_id)) is not None:
        seen.append(lt.task_id)
        store.submit(uid, lt.task_id, "pos", 10)
    assert sorted(seen) == sorted({t.id for t in store.list_tasks(ts_id)})
    assert len(seen) == len(set(seen))
    with pytest.raises(ConflictError, match="already submitted"):
        store.submit(uid, seen[0], "neg", 10)


def test_reloading_returns_the_task_already_leased(store: CurationStore) -> None:
    ts_id = _set(store)
    (uid,) = _users(store, 1)
    first = store.next_task(uid, ts_id)
    again = store.next_task(uid, ts_id)
    assert first is not None
    assert again is not None
    assert again.task_id == first.task_id


def test_each_task_gets_k_annotations_then_is_finalised(store: CurationStore) -> None:
    ts_id = _set(store, n_tasks=3, k=3)
    users = _users(store, 5)
    for uid in users:
        while (lt := store.next_task(uid, ts_id)) is not None:
            store.submit(uid, lt.task_id, "neg", 10)
    tasks = store.list_tasks(ts_id)
    assert [t.n_annotations for t in tasks] == [3, 3, 3]
    assert all(t.status == "finalised" and t.consensus == "neg" for t in tasks)
    assert store.count_annotations(ts_id) == 9


def test_leases_count_against_k_until_they_expire_then_go_to_others(
    store: CurationStore, clock: Any
) -> None:
    ts = store.create_task_set("one", CHOICES, k=1, gold_share=0.0, lease_seconds=60)
    store.add_tasks(ts.id, [TaskInput(content="only task")])
    a, b = _users(store, 2)
    lease = store.next_task(a, ts.id)
    assert lease is not None
    assert store.next_task(b, ts.id) is None  # the single slot is leased to a
    clock.advance(61)
    with pytest.raises(ConflictError, match="expired"):
        store.submit(a, lease.task_id, "pos", 10)
    relet = store.next_task(b, ts.id)
    assert relet is not None
    assert relet.task_id == lease.task_id
    store.submit(b, relet.task_id, "pos", 10)
    assert store.next_task(a, ts.id) is None  # a never gets it back


def test_skipped_task_goes_to_someone_else_but_not_back_to_the_skipper(
    store: CurationStore,
) -> None:
    ts = store.create_task_set("one", CHOICES, k=1, gold_share=0.0)
    store.add_tasks(ts.id, [TaskInput(content="hard one")])
    a, b = _users(store, 2)
    lease = store.next_task(a, ts.id)
    assert lease is not None
    store.skip(a, lease.task_id)
    assert store.next_task(a, ts.id) is None
    other = store.next_task(b, ts.id)
    assert other is not None
    assert other.task_id == lease.task_id
    with pytest.raises(ConflictError):
        store.submit(a, lease.task_id, "pos", 10)


def test_tasks_closest_to_completion_are_offered_first(store: CurationStore) -> None:
    ts_id = _set(store, n_tasks=5, k=3)
    a, b, c = _users(store, 3)
    first = store.next_task(a, ts_id)
    assert first is not None
    store.submit(a, first.task_id, "pos", 10)
    # b should get the task a already started, not a fresh one
    nxt = store.next_task(b, ts_id)
    assert nxt is not None
    assert nxt.task_id == first.task_id
    store.submit(b, nxt.task_id, "pos", 10)
    nxt_c = store.next_task(c, ts_id)
    assert nxt_c is not None
    assert nxt_c.task_id == first.task_id


def test_gold_tasks_are_mixed_in_and_move_reputation(store: CurationStore) -> None:
    ts = store.create_task_set("gold", CHOICES, k=1, gold_share=0.5)
    store.add_tasks(
        ts.id,
        [TaskInput(content=f"plain {i}") for i in range(20)]
        + [TaskInput(content=f"gold {i}", gold="pos") for i in range(10)],
    )
    good, bad = _users(store, 2)
    served_gold = 0
    for uid, answer in ((good, "pos"), (bad, "neg")):
        for _ in range(12):
            lt = store.next_task(uid, ts.id)
            assert lt is not None
            is_gold = str(lt.content).startswith("gold")
            served_gold += is_gold
            store.submit(uid, lt.task_id, answer, 10)
    assert 4 <= served_gold <= 20  # about half of 24 offers
    g, b = store.get_annotator(good), store.get_annotator(bad)
    assert g.gold_total > 0
    assert g.gold_correct == g.gold_total
    assert b.gold_total > 0
    assert b.gold_correct == 0
    assert g.reputation > 0.7 > b.reputation  # 0.7 is a newcomer's prior
    assert g.points > b.points
    board = store.leaderboard()
    assert board[0].id == good


def test_disagreement_requests_more_annotations_up_to_the_cap(store: CurationStore) -> None:
    ts = store.create_task_set(
        "hard", CHOICES, k=2, max_annotations=4, agreement_threshold=0.7, gold_share=0.0
    )
    store.add_tasks(ts.id, [TaskInput(content="ambiguous")])
    users = _users(store, 6)
    answers = ["pos", "neg", "neutral", "pos", "neg", "neg"]
    given = 0
    for uid, ans in zip(users, answers, strict=True):
        lt = store.next_task(uid, ts.id)
        if lt is None:
            break
        store.submit(uid, lt.task_id, ans, 10)
        given += 1
    (task,) = store.list_tasks(ts.id)
    assert given == 4  # k=2 disagreed, grew one at a time to the cap of 4
    assert task.n_annotations == 4
    assert task.status == "finalised"
    assert task.consensus == "pos"
    assert task.agreement == pytest.approx(0.5)


def test_agreement_reached_early_finalises_at_k(store: CurationStore) -> None:
    ts = store.create_task_set("easy", CHOICES, k=3, agreement_threshold=0.6, gold_share=0.0)
    store.add_tasks(ts.id, [TaskInput(content="clear")])
    users = _users(store, 4)
    for uid, ans in zip(users[:3], ["pos", "pos", "neg"], strict=True):
        lt = store.next_task(uid, ts.id)
        assert lt is not None
        result = store.submit(uid, lt.task_id, ans, 10)
    assert result.finalised
    assert store.next_task(users[3], ts.id) is None


@pytest.mark.parametrize(
    ("schema", "outputs", "answers", "consensus"),
    [
        (
            {"kind": "multiple_choice", "choices": ["x", "y", "z"]},
            None,
            [["x", "y"], ["y", "x"], ["x"]],
            ["x", "y"],
        ),
        ({"kind": "rating", "min": 1, "max": 7}, None, [6, 7, 2], 6),
        ({"kind": "free_text"}, None, ["a cat", "a dog", "cats"], None),
        ({"kind": "pairwise"}, ["resp a", "resp b"], ["B", "B", "tie"], "B"),
        (
            {"kind": "ranking", "k": 3},
            ["r0", "r1", "r2"],
            [[2, 0, 1], [2, 1, 0], [0, 2, 1]],
            [2, 0, 1],
        ),
    ],
)
def test_every_label_schema_collects_and_finalises(
    store: CurationStore,
    schema: dict[str, Any],
    outputs: list[str] | None,
    answers: list[Any],
    consensus: Any,
) -> None:
    ts = store.create_task_set("s", schema, k=3, agreement_threshold=0.0, gold_share=0.0)
    store.add_tasks(ts.id, [TaskInput(content="prompt", outputs=outputs)])
    for uid, ans in zip(_users(store, 3), answers, strict=True):
        lt = store.next_task(uid, ts.id)
        assert lt is not None
        store.submit(uid, lt.task_id, ans, 10)
    (task,) = store.list_tasks(ts.id)
    assert task.status == "finalised"
    assert task.consensus == consensus


def test_values_outside_the_schema_are_refused_with_the_rule(store: CurationStore) -> None:
    ts = store.create_task_set("r", {"kind": "rating", "min": 1, "max": 5}, gold_share=0.0)
    store.add_tasks(ts.id, [TaskInput(content="rate me")])
    (uid,) = _users(store, 1)
    lt = store.next_task(uid, ts.id)
    assert lt is not None
    with pytest.raises(LabelSchemaError, match="between 1 and 5"):
        store.submit(uid, lt.task_id, 9, 10)
    with pytest.raises(LabelSchemaError, match="integer"):
        store.submit(uid, lt.task_id, "lots", 10)
    store.submit(uid, lt.task_id, 4, 10)  # the lease survived the bad attempts
    assert store.count_annotations() == 1


def test_tasks_must_fit_the_schema_and_bad_imports_insert_nothing(store: CurationStore) -> None:
    ts = store.create_task_set("p", {"kind": "pairwise"}, gold_share=0.0)
    with pytest.raises(LabelSchemaError, match="task 2: schema pairwise needs 2 outputs"):
        store.add_tasks(
            ts.id,
            [TaskInput(content="ok", outputs=["a", "b"]), TaskInput(content="bad", outputs=["a"])],
        )
    assert store.list_tasks(ts.id) == []
    store.add_tasks(ts.id, [TaskInput(content="ok", outputs=["a", "b"], external_id="q1")])
    with pytest.raises(ConflictError, match="already exists"):
        store.add_tasks(ts.id, [TaskInput(content="again", outputs=["a", "b"], external_id="q1")])


def test_each_annotation_is_signed_over_task_digest_annotator_value_and_time(
    store: CurationStore,
) -> None:
    ts_id = _set(store, n_tasks=1, k=1)
    (uid,) = _users(store, 1)
    lt = store.next_task(uid, ts_id)
    assert lt is not None
    res = store.submit(uid, lt.task_id, "neutral", 4321)
    ((task, ann),) = store.annotations(ts_id)
    assert task.digest == task_digest(task.external_id, task.content, task.outputs)
    record = signed_record(task.digest, ann.annotator_public_id, "neutral", 4321, ann.created_at_ms)
    assert ann.signature == res.signature
    assert ann.signer_public_key == store.identity.public_key_bytes.hex()
    assert verify_record(record, ann.signer_public_key, ann.signature)
    record["value"] = "pos"
    assert not verify_record(record, ann.signer_public_key, ann.signature)


def test_passwords_tokens_and_disabled_accounts(store: CurationStore) -> None:
    a = store.create_annotator("alice", "wonderland", role="admin")
    with pytest.raises(ConflictError, match="taken"):
        store.create_annotator("alice", "another pass")
    with pytest.raises(CurationError, match="username"):
        store.create_annotator("<script>", "password1")
    assert store.authenticate("alice", "wonderland").id == a.id
    with pytest.raises(AuthError, match="wrong username or password"):
        store.authenticate("alice", "WONDERLAND")
    with pytest.raises(AuthError, match="wrong username or password"):
        store.authenticate("nobody", "wonderland")
    token = store.create_api_token(a.id)
    info = store.annotator_for_token(token)
    assert info is not None
    assert info.is_admin
    assert store.annotator_for_token(token + "x") is None
    session, csrf = store.create_session(a.id, ttl_seconds=60)
    found = store.session_lookup(session)
    assert found is not None
    assert found[1] == csrf
    store.set_disabled(a.id, True)
    assert store.annotator_for_token(token) is None
    assert store.session_lookup(session) is None
    with pytest.raises(AuthError, match="disabled"):
        store.authenticate("alice", "wonderland")
    with pytest.raises(NotFoundError):
        store.set_role(999, "admin")


def test_concurrent_annotators_lose_no_submission_and_never_share_a_slot(
    store: CurationStore,
) -> None:
    ts_id = _set(store, n_tasks=12, k=3)
    users = _users(store, 6)
    acked: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(uid: int) -> None:
        try:
            while (lt := store.next_task(uid, ts_id)) is not None:
                r = store.submit(uid, lt.task_id, "pos", 5)
                with lock:
                    acked.append(r.annotation_id)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(acked) == 36 == store.count_annotations(ts_id)
    assert all(t.n_annotations == 3 for t in store.list_tasks(ts_id))


def test_progress_reports_counts_and_agreement(store: CurationStore) -> None:
    ts_id = _set(store, n_tasks=6, k=3)
    users = _users(store, 3)
    for i, uid in enumerate(users):
        while (lt := store.next_task(uid, ts_id)) is not None:
            # two annotators agree everywhere, the third disagrees on one task in three
            ans = "neg" if i == 2 and lt.task_id % 3 == 0 else "pos" if lt.task_id % 2 else "neg"
            store.submit(uid, lt.task_id, ans, 10)
    p = store.progress(ts_id)
    assert (p.n_tasks, p.n_finalised, p.n_annotations, p.live_leases) == (6, 6, 18, 0)
    assert p.agreement["fleiss_kappa"] is not None
    assert 0.0 < p.agreement["fleiss_kappa"] <= 1.0
    assert p.agreement["krippendorff_alpha_nominal"] is not None
    stats = store.stats()
    assert stats["annotations"] == 18
    assert stats["tasks_finalised"] == 6


# -- the lease queue, cached credentials and the group commit -------------------------------


def _lease_counts(store: CurationStore, ts_id: int) -> tuple[dict[int, int], dict[int, int]]:
    """(tasks.n_leased, count of assignments in state 'leased') per task of the set."""
    with store.engines.read.connect() as conn:
        stored = dict(
            conn.execute(select(Task.id, Task.n_leased).where(Task.task_set_id == ts_id)).all()
        )
        counted = dict(
            conn.execute(
                select(Assignment.task_id, func.count())
                .join(Task, Task.id == Assignment.task_id)
                .where(Task.task_set_id == ts_id, Assignment.state == "leased")
                .group_by(Assignment.task_id)
            ).all()
        )
    return stored, {t: counted.get(t, 0) for t in stored}


def test_lease_counts_stay_exact_through_leases_skips_submissions_and_expiry(
    store: CurationStore, clock: Any
) -> None:
    ts = store.create_task_set("q", CHOICES, k=2, gold_share=0.2, lease_seconds=30)
    store.add_tasks(
        ts.id,
        [TaskInput(content=f"t{i}", gold="pos" if i % 4 == 0 else None) for i in range(8)],
    )
    users = _users(store, 5)
    rng = random.Random(1)
    for step in range(60):
        uid = rng.choice(users)
        lease = store.next_task(uid, ts.id)
        if lease is not None:
            action = rng.random()
            if action < 0.5:
                store.submit(uid, lease.task_id, "pos", 10)
            elif action < 0.7:
                store.skip(uid, lease.task_id)
            elif action < 0.85:
                clock.advance(31)  # this lease (and maybe others) expires
        stored, counted = _lease_counts(store, ts.id)
        assert stored == counted, f"after step {step}"
    # every regular task ends up with exactly k annotations once everyone keeps working
    for uid in users * 3:
        while (lease := store.next_task(uid, ts.id)) is not None:
            store.submit(uid, lease.task_id, "pos", 10)
    regular = [t for t in store.list_tasks(ts.id) if not t.is_gold]
    assert all(t.n_annotations <= t.needed for t in regular)
    stored, counted = _lease_counts(store, ts.id)
    assert stored == counted


def test_leasing_walks_the_open_task_index_whatever_the_store_size(store: CurationStore) -> None:
    ts_id = _set(store, n_tasks=50, k=2)
    (uid,) = _users(store, 1)
    sql = store._sql.q(store._PICK_REGULAR)
    conn = store.engines.read.raw_connection()
    try:
        cur = conn.cursor()
        if store.engines.is_sqlite:
            cur.execute("EXPLAIN QUERY PLAN " + sql, (ts_id, False, uid))
            plan = " ".join(str(r[-1]) for r in cur.fetchall())
            assert "ix_tasks_open" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
        else:  # tiny tables favour a sequential scan: check the index can serve the query
            cur.execute("SET enable_seqscan = off")
            cur.execute("EXPLAIN " + sql, (ts_id, False, uid))
            plan = " ".join(r[0] for r in cur.fetchall())
            assert "ix_tasks_open" in plan, plan
            assert "Sort" not in plan, plan
    finally:
        conn.rollback()
        conn.close()


def test_revoked_credentials_stop_working_in_every_process_at_once(
    make_store: Callable[..., CurationStore],
) -> None:
    admin_side, server = make_store(), make_store()  # two processes on one database
    uid = admin_side.create_annotator("carol", "correct horse").id
    token = admin_side.create_api_token(uid)
    seen = server.annotator_for_token(token)
    assert seen is not None
    assert seen.role == "annotator"
    assert server.annotator_for_token(token) == seen  # served from the cache
    admin_side.set_role(uid, "admin")
    promoted = server.annotator_for_token(token)
    assert promoted is not None
    assert promoted.role == "admin"
    admin_side.set_disabled(uid, True)
    assert server.annotator_for_token(token) is None
    admin_side.set_disabled(uid, False)
    assert server.annotator_for_token(token) is not None
    admin_side.revoke_api_tokens(uid)
    assert server.annotator_for_token(token) is None
    session, csrf = admin_side.create_session(uid, 3600)
    found = server.session_lookup(session)
    assert found is not None
    assert found[1] == csrf
    admin_side.delete_session(session)
    assert server.session_lookup(session) is None


def test_cached_session_still_expires_on_time(store: CurationStore, clock: Any) -> None:
    (uid,) = _users(store, 1)
    session, _ = store.create_session(uid, 120)
    assert store.session_lookup(session) is not None
    clock.advance(121)
    assert store.session_lookup(session) is None


def test_upgrading_a_first_schema_database_backfills_lease_counts(
    db_url: str, make_store: Callable[..., CurationStore]
) -> None:
    engines = create_engines(db_url)
    migrate(engines, "0001")
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with engines.write.begin() as conn:
        conn.execute(
            insert(Annotator.__table__),
            [
                {
                    "public_id": f"p{i}",
                    "username": f"old{i}",
                    "password_hash": "x",
                    "role": "annotator",
                    "disabled": False,
                    "created_at": now,
                    "points": 0,
                    "reputation": 0.7,
                    "gold_correct": 0,
                    "gold_total": 0,
                    "agree_count": 0,
                    "agree_total": 0,
                }
                for i in range(3)
            ],
        )
        insert_old_task_set(conn, CHOICES, k=2)
        conn.execute(
            text(
                "INSERT INTO tasks (task_set_id, external_id, content, is_gold, digest, needed,"
                " n_annotations, status, created_at) VALUES (1, 'only', '\"x\"', :g, 'd', 2, 0,"
                " 'open', :now)"
            ),
            {"g": False, "now": now},
        )
        conn.execute(
            insert(Assignment.__table__),
            [
                {
                    "task_id": 1,
                    "annotator_id": a,
                    "state": "leased",
                    "leased_at": now,
                    "expires_at": now + timedelta(days=3650),
                }
                for a in (1, 2)
            ],
        )
    engines.dispose()
    store = make_store()  # migrates to the newest revision
    assert _lease_counts(store, 1) == ({1: 2}, {1: 2})
    assert store.next_task(3, 1) is None  # both slots are still held by the old leases


def test_a_request_abandoned_before_the_writer_took_it_never_runs(
    store: CurationStore,
) -> None:
    committer = GroupCommitter(store.engines.write, store._sql)
    gate, ran = threading.Event(), []

    def blocker(tx: WriteTx) -> None:
        gate.wait(10)

    async def scenario() -> None:
        first = asyncio.get_running_loop().run_in_executor(None, committer.run, blocker)
        await asyncio.sleep(0.2)  # the writer is now inside blocker
        abandoned = asyncio.create_task(committer.run_async(lambda tx: ran.append(1)))
        await asyncio.sleep(0.1)
        abandoned.cancel()
        gate.set()
        await first
        assert await committer.run_async(lambda tx: "done") == "done"

    try:
        asyncio.run(scenario())
    finally:
        committer.close()
    assert ran == []


def test_two_processes_writing_one_database_neither_deadlock_nor_lose_writes(
    make_store: Callable[..., CurationStore],
) -> None:
    first, second = make_store(), make_store()  # two committers, as with two web workers
    ts_id = _set(first, n_tasks=20, k=3)
    users = _users(first, 8)
    acked: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(uid: int) -> None:
        try:
            deadline = time.monotonic() + 60
            while True:
                # alternate processes per request, as a load balancer would
                lt = (first if len(acked) % 2 else second).next_task(uid, ts_id)
                if lt is None:
                    # Nothing for us right now, but a task whose last annotation is still
                    # in flight may yet ask for one more (low agreement): an annotator who
                    # left early would strand it. Come back until every task is final.
                    if time.monotonic() > deadline or all(
                        t.status == "finalised" for t in first.list_tasks(ts_id)
                    ):
                        return
                    time.sleep(0.01)
                    continue
                store = second if uid % 2 else first
                r = store.submit(uid, lt.task_id, "pos" if uid % 3 else "neg", 5)
                with lock:
                    acked.append(r.annotation_id)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(acked) == len(set(acked)) == first.count_annotations(ts_id)
    tasks = first.list_tasks(ts_id)
    assert all(t.status == "finalised" for t in tasks)
    assert all(t.n_annotations == t.needed for t in tasks)
    assert _lease_counts(first, ts_id)[0] == dict.fromkeys((t.id for t in tasks), 0)


def test_a_session_token_never_passes_as_an_api_token(store: CurationStore) -> None:
    (uid,) = _users(store, 1)
    session, _ = store.create_session(uid, 3600)
    assert store.session_lookup(session) is not None  # now cached
    assert store.annotator_for_token(session) is None
    token = store.create_api_token(uid)
    assert store.annotator_for_token(token) is not None  # now cached
    assert store.session_lookup(token) is None
