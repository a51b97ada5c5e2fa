"""The data manager, the task view, bulk actions and reviews, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import date
from unittest.mock import patch

import pytest

from swarmlm.curation.data_manager import (
    TaskFilter,
    bulk_action,
    matching_ids,
    query_tasks,
    search_candidates,
    search_index,
    task_detail,
)
from swarmlm.curation.errors import AuthError, ConflictError, CurationError
from swarmlm.curation.review import next_for_review, review_annotation, reviews_of
from swarmlm.curation.store import CurationStore, TaskInput

CHOICES = {"kind": "single_choice", "choices": ["pos", "neg", "neutral"]}


def _annotated_set(store: CurationStore) -> tuple[int, list[int]]:
    """10 tasks, k=3: tasks 0-5 unanimous 'pos', 6-7 split 2:1 'neg', 8-9 untouched."""
    ts = store.create_task_set("dm", CHOICES, k=3, gold_share=0.0, agreement_threshold=0.5)
    contents = [f"review {i}: the soup was {'cold' if i % 2 else 'hot'}" for i in range(10)]
    contents[3] = "Café crème, 100% bien_fait"
    store.add_tasks(
        ts.id, [TaskInput(content=c, external_id=f"t{i}") for i, c in enumerate(contents)]
    )
    users = [store.create_annotator(f"user{i}", "correct horse").id for i in range(3)]
    answers = {i: ["pos", "pos", "pos"] for i in range(6)}
    answers[6] = answers[7] = ["neg", "neg", "pos"]
    for u, uid in enumerate(users):
        for _ in range(8):
            lt = store.next_task(uid, ts.id)
            assert lt is not None
            i = int(lt.external_id[1:])
            store.submit(uid, lt.task_id, answers[i][u], 1000 + u)
    return ts.id, users


def test_filters_search_sort_and_pages_find_the_right_tasks(store: CurationStore) -> None:
    ts_id, _ = _annotated_set(store)
    page = query_tasks(store, ts_id)
    assert page.total == 10
    assert [r.external_id for r in page.rows] == [f"t{i}" for i in range(10)]
    fin = query_tasks(store, ts_id, TaskFilter(status="finalised"))
    assert fin.total == 8
    neg = query_tasks(store, ts_id, TaskFilter(label="neg"))
    assert sorted(r.external_id for r in neg.rows) == ["t6", "t7"]
    assert all(abs((r.agreement or 0) - 2 / 3) < 1e-9 for r in neg.rows)
    low = query_tasks(store, ts_id, TaskFilter(agreement_max=0.9))
    assert sorted(r.external_id for r in low.rows) == ["t6", "t7"]
    unsure = query_tasks(store, ts_id, TaskFilter(confidence_max=0.9, status="finalised"))
    assert {r.external_id for r in unsure.rows} == {"t6", "t7"}
    assert all(r.confidence is not None and 0.5 < r.confidence < 1 for r in unsure.rows)
    sorted_desc = query_tasks(store, ts_id, TaskFilter(status="finalised"), sort="agreement")
    assert [r.external_id for r in sorted_desc.rows][:2] == ["t6", "t7"]
    assert query_tasks(store, ts_id, TaskFilter(status="unstarted")).total == 2
    assert query_tasks(store, ts_id, TaskFilter(annotator="user1")).total == 8
    assert query_tasks(store, ts_id, TaskFilter(annotator="nobody")).total == 0
    assert query_tasks(store, ts_id, TaskFilter(gold=True)).total == 0
    # search is case-insensitive, finds non-ASCII text and takes % and _ literally
    assert [r.external_id for r in query_tasks(store, ts_id, TaskFilter(search="café")).rows] == [
        "t3"
    ]
    assert query_tasks(store, ts_id, TaskFilter(search="100%")).total == 1
    assert query_tasks(store, ts_id, TaskFilter(search="bien_fait")).total == 1
    assert query_tasks(store, ts_id, TaskFilter(search="bien%fait")).total == 0
    assert query_tasks(store, ts_id, TaskFilter(search="COLD")).total == 4
    assert query_tasks(store, ts_id, TaskFilter(search="t9")).total == 1  # external id
    today = store.now().date()
    assert query_tasks(store, ts_id, TaskFilter(created_from=today)).total == 10
    assert query_tasks(store, ts_id, TaskFilter(created_to=date(2000, 1, 1))).total == 0
    p2 = query_tasks(store, ts_id, sort="-id", page=2, per_page=4)
    assert [r.external_id for r in p2.rows] == ["t5", "t4", "t3", "t2"]
    assert p2.pages == 3
    with pytest.raises(CurationError, match="sort"):
        query_tasks(store, ts_id, sort="content; DROP TABLE tasks")
    with pytest.raises(CurationError, match="status"):
        TaskFilter(status="bogus")


def test_task_view_shows_every_annotation_consensus_and_history(store: CurationStore) -> None:
    ts_id, _users = _annotated_set(store)
    (tid,) = [r.id for r in query_tasks(store, ts_id, TaskFilter(search="t6")).rows]
    d = task_detail(store, tid)
    assert d.consensus == "neg"
    assert d.status == "finalised"
    assert [a.username for a in d.annotations] == ["user0", "user1", "user2"]
    assert [a.value for a in d.annotations] == ["neg", "neg", "pos"]
    assert [a.agrees for a in d.annotations] == [True, True, False]
    assert [a.time_spent_ms for a in d.annotations] == [1000, 1001, 1002]
    assert all(0 < a.reputation < 1 for a in d.annotations)
    assert d.confidence is not None
    assert 0.5 < d.confidence < 1.0
    events = [h.event for h in d.history]
    assert events[0] == "imported"
    assert events.count("annotated") == 3
    assert events.count("leased") == 3
    assert "points" in events


def test_bulk_actions_keep_the_queue_consistent(store: CurationStore) -> None:
    ts_id, _users = _annotated_set(store)
    newcomer = store.create_annotator("late", "correct horse").id
    untouched = matching_ids(store, ts_id, TaskFilter(status="unstarted"))
    lt = store.next_task(newcomer, ts_id)
    assert lt is not None
    assert lt.task_id in untouched
    assert bulk_action(store, ts_id, [lt.task_id], "release") == 1
    with pytest.raises(ConflictError):
        store.submit(newcomer, lt.task_id, "pos", 10)  # the lease is gone
    d = task_detail(store, lt.task_id)
    assert d.n_leased == 0
    # raise redundancy reopens finalised tasks for one more annotation each
    fin = matching_ids(store, ts_id, TaskFilter(status="finalised"))
    assert bulk_action(store, ts_id, fin[:2], "raise_redundancy", amount=1) == 2
    assert task_detail(store, fin[0]).status == "open"
    assert task_detail(store, fin[0]).needed == 4
    seen = set()
    while (lt2 := store.next_task(newcomer, ts_id)) is not None:
        seen.add(lt2.task_id)
        store.submit(newcomer, lt2.task_id, "pos", 10)
    assert set(fin[:2]) <= seen
    # gold from consensus, and back
    assert bulk_action(store, ts_id, fin[2:4], "mark_gold") == 2
    assert task_detail(store, fin[2]).gold == "pos"
    assert query_tasks(store, ts_id, TaskFilter(gold=True)).total == 2
    assert bulk_action(store, ts_id, fin[2:3], "unmark_gold") == 1
    # delete, ids of another set ignored
    other = store.create_task_set("other", CHOICES, k=1, gold_share=0.0)
    store.add_tasks(other.id, [TaskInput(content="x")])
    (other_id,) = matching_ids(store, other.id, TaskFilter())
    assert bulk_action(store, ts_id, [fin[5], other_id], "delete") == 1
    assert query_tasks(store, ts_id).total == 9
    assert query_tasks(store, other.id).total == 1
    assert store.count_annotations(ts_id) == 3 * 8 + len(seen) - 3


def test_reviews_feed_reputation_reassign_rejections_and_reach_the_annotator(
    store: CurationStore,
) -> None:
    ts_id, users = _annotated_set(store)
    boss = store.create_annotator("boss", "correct horse", role="reviewer").id
    with pytest.raises(AuthError):
        review_annotation(store, users[0], 1, "accepted")
    item = next_for_review(store, ts_id, boss)
    assert item is not None
    assert item.agreement is not None
    assert item.agreement < 1
    tid = item.task_id
    d = task_detail(store, tid)
    wrong = next(a for a in d.annotations if a.value == "pos")
    right = next(a for a in d.annotations if a.value == "neg")
    before = store.get_annotator(wrong.annotator_id)
    review_annotation(store, boss, wrong.id, "rejected", comment="the soup was cold: negative")
    after = store.get_annotator(wrong.annotator_id)
    assert after.reputation < before.reputation
    assert after.points == before.points - 1
    d = task_detail(store, tid)
    assert d.status == "open"
    assert d.n_annotations == 2
    assert [h.event for h in d.history].count("review: rejected") == 1
    # the slot goes to someone else, never back to the rejected annotator
    assert all(
        (lt := store.next_task(wrong.annotator_id, ts_id)) is None or lt.task_id != tid
        for _ in range(1)
    )
    fresh = store.create_annotator("fresh", "correct horse").id
    got = []
    while (lt := store.next_task(fresh, ts_id)) is not None:
        got.append(lt.task_id)
        store.submit(fresh, lt.task_id, "neg", 5)
    assert tid in got
    assert task_detail(store, tid).status == "finalised"
    rb = store.get_annotator(right.annotator_id)
    review_annotation(store, boss, right.id, "accepted")
    assert store.get_annotator(right.annotator_id).reputation > rb.reputation
    with pytest.raises(ConflictError, match="already"):
        review_annotation(store, boss, right.id, "rejected")
    # a correction becomes the consensus
    other_task = next(r.id for r in query_tasks(store, ts_id, TaskFilter(label="pos")).rows)
    ann = task_detail(store, other_task).annotations[0]
    review_annotation(store, boss, ann.id, "corrected", corrected="neutral")
    d = task_detail(store, other_task)
    assert (d.consensus, d.confidence, d.agreement) == ("neutral", 1.0, 0.0)
    with pytest.raises(CurationError):
        review_annotation(store, boss, task_detail(store, other_task).annotations[1].id,
                          "corrected", corrected="not a choice")  # fmt: skip
    feedback = reviews_of(store, wrong.annotator_id)
    assert [(f.verdict, f.comment) for f in feedback][-1] == (
        "rejected",
        "the soup was cold: negative",
    )


def test_many_matches_walk_the_sort_index_and_agree_with_few(
    store: CurationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past COUNT_CAP matches the page comes from the sort's index, not a sort in Python:
    both paths must give the same rows (here the cap is lowered to force the index path)."""
    from swarmlm.curation import data_manager as dm

    ts_id, _ = _annotated_set(store)
    expected = {}
    for sort in ("id", "-id", "agreement", "-agreement", "annotations", "-confidence"):
        f = TaskFilter(status="finalised")
        expected[sort] = [
            r.id for r in query_tasks(store, ts_id, f, sort=sort, per_page=3, page=2).rows
        ]
    monkeypatch.setattr(dm, "COUNT_CAP", 2)
    for sort, ids in expected.items():
        page = query_tasks(
            store, ts_id, TaskFilter(status="finalised"), sort=sort, per_page=3, page=2
        )
        assert page.total_capped
        assert page.total == 2
        assert [r.id for r in page.rows] == ids, sort


def test_content_search_uses_the_substring_index_and_follows_changes(
    store: CurationStore,
) -> None:
    ts_id, _ = _annotated_set(store)
    with store.read_cursor() as (cur, _sql):
        kind = search_index(store, cur)
    assert kind == ("fts5" if store.engines.is_sqlite else "pg_trgm")
    if store.engines.is_sqlite:
        with store.read_cursor() as (cur, _sql):
            # a selective needle is looked up in the index; a common one is scanned
            assert search_candidates(store, cur, TaskFilter(search="Café")) is not None
            assert search_candidates(store, cur, TaskFilter(search="t1")) is None
            with patch("swarmlm.curation.data_manager.SELECTIVE_SEARCH", 3):
                assert search_candidates(store, cur, TaskFilter(search="soup")) is None
                assert query_tasks(store, ts_id, TaskFilter(search="soup")).total == 9
    assert query_tasks(store, ts_id, TaskFilter(search="soup")).total == 9
    assert query_tasks(store, ts_id, TaskFilter(search="t1")).total == 1  # 2 chars: a scan
    store.add_tasks(ts_id, [TaskInput(content={"text": 'a "quoted" soup'}, external_id="new")])
    assert query_tasks(store, ts_id, TaskFilter(search='"quoted"')).total == 1
    (gone,) = [r.id for r in query_tasks(store, ts_id, TaskFilter(search="Café")).rows]
    assert bulk_action(store, ts_id, [gone], "delete") == 1
    assert query_tasks(store, ts_id, TaskFilter(search="Café")).total == 0
    assert query_tasks(store, ts_id, TaskFilter(search="soup")).total == 10
