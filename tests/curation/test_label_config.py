"""Editing a task set's label configuration after creation (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests.curation.conftest import (
    held_records,
    insert_old_task_set,
    replicated_node,
)

from swarmlm.curation.db import create_engines, migrate
from swarmlm.curation.errors import ConflictError, LabelSchemaError
from swarmlm.curation.label_config import LabelConfigConflictError
from swarmlm.curation.replica import make_record
from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity

CHOICES = {"kind": "single_choice", "choices": ["pos", "neg", "neutral"]}


def _set_with_answers(store: CurationStore, answers: list[str], **kw: object) -> int:
    """A set of one task per answer, each answered once by its own annotator."""
    ts = store.create_task_set("set", kw.pop("schema", CHOICES), k=1, gold_share=0.0, **kw)  # type: ignore[arg-type]
    store.add_tasks(ts.id, [TaskInput(content=f"text {i}") for i in range(len(answers))])
    for i, value in enumerate(answers):
        a = store.create_annotator(f"user{i}", "correct horse").id
        leased = store.next_task(a, ts.id)
        assert leased is not None
        store.submit(a, leased.task_id, value, 1000)
    return ts.id


def test_adding_a_choice_applies_at_once_and_new_annotations_may_use_it(
    store: CurationStore,
) -> None:
    ts_id = _set_with_answers(store, ["pos", "neg"])
    store.add_tasks(ts_id, [TaskInput(content="more")])
    change = store.update_label_config(
        ts_id, {"kind": "single_choice", "choices": ["pos", "neg", "neutral", "mixed"]}
    )
    assert change.saved
    assert change.version == 2
    assert change.impact.compatible
    assert store.get_task_set(ts_id).config_version == 2
    a = store.create_annotator("late", "correct horse").id
    leased = store.next_task(a, ts_id)
    assert leased is not None
    assert "mixed" in leased.schema.choices
    store.submit(a, leased.task_id, "mixed", 1000)
    history = store.label_config_history(ts_id)
    assert [(v.version, v.in_force, v.n_annotations) for v in history] == [
        (2, True, 1),
        (1, False, 2),
    ]


def test_removing_a_used_choice_is_refused_naming_it_until_confirmed(
    store: CurationStore,
) -> None:
    ts_id = _set_with_answers(store, ["pos", "neg", "neg"])
    narrower = {"kind": "single_choice", "choices": ["pos", "neutral"]}
    with pytest.raises(LabelConfigConflictError, match=r"'neg' \(2 annotations\)") as e:
        store.update_label_config(ts_id, narrower)
    assert [(u.label, u.annotations) for u in e.value.impact.invalidated] == [("neg", 2)]
    assert store.get_task_set(ts_id).config_version == 1  # nothing saved
    # an unused choice goes without confirmation; a dry run saves nothing
    dry = store.update_label_config(
        ts_id, {"kind": "single_choice", "choices": ["pos", "neg"]}, dry_run=True
    )
    assert dry.changed
    assert not dry.saved
    assert store.get_task_set(ts_id).config_version == 1
    done = store.update_label_config(ts_id, narrower, confirm=True)
    assert done.saved
    assert done.version == 2
    # the old annotations stay stored, are flagged, and are left out of consensus
    flagged = store.label_config_impact(ts_id, store.get_task_set(ts_id).schema)
    assert flagged.n_annotations == 2
    assert store.annotations(ts_id)  # still exported
    store.progress(ts_id)  # agreement over a set holding refused values does not fail


def test_a_change_that_would_refuse_a_gold_answer_is_refused_even_when_confirmed(
    store: CurationStore,
) -> None:
    ts = store.create_task_set("set", CHOICES, gold_share=0.5)
    store.add_tasks(ts.id, [TaskInput(content="g", gold="neutral")])
    with pytest.raises(LabelConfigConflictError, match="gold answers"):
        store.update_label_config(
            ts.id, {"kind": "single_choice", "choices": ["pos", "neg"]}, confirm=True
        )


def test_kind_and_ranking_size_cannot_change_and_stale_edits_are_refused(
    store: CurationStore,
) -> None:
    ts_id = _set_with_answers(store, ["pos"])
    with pytest.raises(LabelSchemaError, match="kind cannot change"):
        store.update_label_config(ts_id, {"kind": "rating", "min": 1, "max": 5})
    with pytest.raises(LabelSchemaError, match="invalid label schema"):
        store.update_label_config(ts_id, {"kind": "single_choice", "choices": ["x"]})
    new = {"kind": "single_choice", "choices": ["pos", "neg", "neutral", "other"]}
    store.update_label_config(ts_id, new, expected_version=1)
    with pytest.raises(ConflictError, match="version 2 is in force"):
        store.update_label_config(ts_id, CHOICES | {"choices": ["pos", "neg", "neutral", "x"]},
                                  expected_version=1)  # fmt: skip
    same = store.update_label_config(ts_id, new)
    assert not same.changed
    assert not same.saved
    assert same.version == 2
    ranking = store.create_task_set("ranked", {"kind": "ranking", "k": 3})
    with pytest.raises(LabelSchemaError, match="k cannot change"):
        store.update_label_config(ranking.id, {"kind": "ranking", "k": 4})


def test_narrowing_a_rating_scale_reports_the_used_values_outside_it(
    store: CurationStore,
) -> None:
    ts_id = _set_with_answers(store, [1, 5, 5], schema={"kind": "rating", "min": 1, "max": 5})  # type: ignore[list-item]
    impact = store.label_config_impact(ts_id, {"kind": "rating", "min": 1, "max": 4})
    assert [(u.label, u.annotations) for u in impact.invalidated] == [("5", 2)]
    assert store.label_config_impact(ts_id, {"kind": "rating", "min": 0, "max": 10}).compatible


def test_an_edit_made_by_another_process_is_in_force_at_the_next_transaction(
    db_url: str, identity: NodeIdentity, make_store: Callable[..., CurationStore]
) -> None:
    first = make_store()
    ts_id = _set_with_answers(first, ["pos"])
    first.add_tasks(ts_id, [TaskInput(content="more")])
    a = first.create_annotator("worker", "correct horse").id
    leased = first.next_task(a, ts_id)  # parses and caches version 1 in `first`
    assert leased is not None
    other = make_store(1)  # another worker process on the same database
    other.update_label_config(ts_id, {"kind": "single_choice", "choices": ["pos", "other"]})
    with pytest.raises(LabelSchemaError):
        first.submit(a, leased.task_id, "neutral", 1000)  # removed by the other process's edit
    first.submit(a, leased.task_id, "other", 1000)


def test_label_config_edits_replicate_and_concurrent_edits_converge(tmp_path: Path) -> None:
    a, b, c = (replicated_node(tmp_path, n) for n in "abc")
    try:
        ts = a.create_task_set("shared", CHOICES, k=1, gold_share=0.0)
        a.add_tasks(ts.id, [TaskInput(content="t1"), TaskInput(content="t2")])
        b.merge_records(held_records(a))
        c.merge_records(held_records(a))
        tb = b.find_task_set("shared").id
        # both nodes edit at once: each makes a version 2
        a.update_label_config(ts.id, CHOICES | {"choices": ["pos", "neg", "neutral", "fromA"]})
        b.update_label_config(tb, CHOICES | {"choices": ["pos", "neg", "neutral", "fromB"]})
        # an annotation made under node a's version 2
        u = a.create_annotator("ann", "correct horse").id
        leased = a.next_task(u, ts.id)
        assert leased is not None
        a.submit(u, leased.task_id, "fromA", 1000)
        recs_a, recs_b = held_records(a), held_records(b)
        # c hears the annotation before any edit: parked, not refused
        early = c.merge_records([r for r in recs_a if r.kind in ("annotator", "annotation")])
        assert not early.invalid
        assert len(early.parked) == 1
        for node, incoming in ((a, recs_b), (b, recs_a), (c, recs_b + recs_a)):
            res = node.merge_records(incoming)
            assert not res.invalid, res.invalid
        schemas = {
            str(n.find_task_set("shared").schema.choices)  # type: ignore[union-attr]
            for n in (a, b, c)
        }
        versions = {n.find_task_set("shared").config_version for n in (a, b, c)}
        assert len(schemas) == 1
        assert versions == {2}
        # the annotation validated under a's version 2 is held everywhere
        for n in (a, b, c):
            assert len(n.annotations(n.find_task_set("shared").id)) == 1
    finally:
        for n in (a, b, c):
            n.close()


def test_a_label_config_record_waits_for_the_version_before_it(tmp_path: Path) -> None:
    a, b = replicated_node(tmp_path, "a"), replicated_node(tmp_path, "b")
    try:
        ts = a.create_task_set("shared", CHOICES, k=1, gold_share=0.0)
        b.merge_records(held_records(a))
        a.update_label_config(ts.id, CHOICES | {"choices": ["pos", "neg", "neutral", "x"]})
        v2 = {r.hex for r in held_records(a) if r.kind == "label_config"}
        a.update_label_config(ts.id, CHOICES | {"choices": ["pos", "neg", "neutral", "x", "y"]})
        v3 = [r for r in held_records(a) if r.kind == "label_config" and r.hex not in v2]
        res = b.merge_records(v3)
        assert len(res.parked) == 1
        assert b.find_task_set("shared").config_version == 1
        b.merge_records(held_records(a))
        assert b.find_task_set("shared").config_version == 3
    finally:
        a.close()
        b.close()


def test_a_replicated_annotation_is_checked_against_the_config_it_names(tmp_path: Path) -> None:
    a, b = replicated_node(tmp_path, "a"), replicated_node(tmp_path, "b")
    try:
        ts = a.create_task_set("shared", CHOICES, k=1, gold_share=0.0)
        a.add_tasks(ts.id, [TaskInput(content="t1")])
        a.update_label_config(ts.id, CHOICES | {"choices": ["pos", "neg", "neutral", "new"]})
        u = a.create_annotator("ann", "correct horse").id
        leased = a.next_task(u, ts.id)
        assert leased is not None
        a.submit(u, leased.task_id, "new", 1000)
        recs = held_records(a)
        (ann,) = [r for r in recs if r.kind == "annotation"]
        assert ann.body["label_config"] == next(r.hex for r in recs if r.kind == "label_config")
        # the same value claimed under version 1, which never had it: refused as invalid
        body = {k: v for k, v in ann.body.items() if k != "label_config"}
        forged = make_record(a.identity, "annotation", body)
        res = b.merge_records([r for r in recs if r.kind != "annotation"] + [forged])
        assert len(res.invalid) == 1
        assert "must be one of" in res.invalid[0][1]
        assert b.merge_records([ann]).accepted == [ann]
    finally:
        a.close()
        b.close()


def test_upgrading_a_database_keeps_each_sets_schema_as_version_1(
    db_url: str, make_store: Callable[..., CurationStore]
) -> None:
    engines = create_engines(db_url)
    migrate(engines, "0006")
    with engines.write.begin() as conn:
        insert_old_task_set(conn, CHOICES, k=1)
    engines.dispose()
    store = make_store()  # migrates to the newest revision
    (v1,) = store.label_config_history(1)
    assert (v1.version, v1.in_force, v1.schema.choices) == (1, True, CHOICES["choices"])  # type: ignore[union-attr]
    store.add_tasks(1, [TaskInput(content="x")])
    change = store.update_label_config(1, CHOICES | {"choices": [*CHOICES["choices"], "more"]})
    assert change.version == 2
