"""Task-set settings have one definition (``TaskSetSettings``): the store, its table, the
replicated record, the API, the admin form and ``swarmlm curation create-set`` all follow it,
and a bad setting is refused by name wherever it comes from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from tests.curation.conftest import FAST_HASHER, held_records, replicated_node

from swarmlm.curation.cli import add_curation_parser
from swarmlm.curation.errors import CurationError
from swarmlm.curation.models import TaskSet
from swarmlm.curation.replica import RecordError, check_body, make_record
from swarmlm.curation.store import CurationStore, TaskSetInfo, TaskSetSettings
from swarmlm.curation.task_set_settings import record_body, settings_of
from swarmlm.p2p.identity import NodeIdentity

SETTINGS = list(TaskSetSettings.model_fields)
PAIRWISE = {"kind": "pairwise"}


def test_every_copy_of_the_settings_is_read_from_the_one_model() -> None:
    # the storage: a column per setting (adding a setting = a field, a column, a migration)
    assert set(SETTINGS) <= set(TaskSet.__table__.columns.keys())
    # the value type the store hands out inherits them
    assert issubclass(TaskSetInfo, TaskSetSettings)
    assert set(SETTINGS) <= set(TaskSetInfo.model_fields)
    # the replicated definition carries each of them
    body = record_body("s", "", PAIRWISE, TaskSetSettings())
    assert list(body) == ["name", "description", "schema", *SETTINGS]
    # swarmlm curation create-set has a flag per setting
    parser = argparse.ArgumentParser()
    add_curation_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["curation", "create-set", "s", "--schema", "{}"])
    assert {f"setting_{name}" for name in SETTINGS} <= set(vars(args))


def test_defaults_and_the_cap_follow_k() -> None:
    assert TaskSetSettings().max_annotations == 6
    assert TaskSetSettings(k=5).max_annotations == 10
    assert TaskSetSettings(k=5, max_annotations=5).max_annotations == 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"k": 0}, "k: Input should be greater than or equal to 1 (got 0)"),
        ({"k": 5, "max_annotations": 3}, "max_annotations must be at least k=5, got 3"),
        ({"gold_share": 1.5}, "gold_share: Input should be less than or equal to 1 (got 1.5)"),
        ({"lease_seconds": 5}, "lease_seconds: Input should be greater than or equal to 10"),
        ({"agreement_treshold": 0.5}, "agreement_treshold: unknown setting"),
    ],
)
def test_a_bad_setting_is_refused_by_name(
    store: CurationStore, values: dict[str, object], message: str
) -> None:
    with pytest.raises(CurationError, match="invalid task set settings") as err:
        store.create_task_set("s", PAIRWISE, **values)  # type: ignore[arg-type]
    assert message in str(err.value)
    # an invalid k does not add a second, confusing error about the cap it defaults
    assert "max_annotations" not in str(err.value) or "max_annotations" in str(values)
    assert store.list_task_sets() == []


def test_settings_are_stored_and_read_back_on_both_databases(store: CurationStore) -> None:
    chosen = TaskSetSettings(k=2, agreement_threshold=1, gold_share=0.0, lease_seconds=30)
    ts = store.create_task_set("s", PAIRWISE, chosen, description="d")
    back = store.get_task_set(ts.id)
    assert back == ts
    assert back.settings == chosen
    assert (back.k, back.max_annotations, back.lease_seconds) == (2, 4, 30)
    assert isinstance(back.agreement_threshold, float)
    with pytest.raises(CurationError, match="not both"):
        store.create_task_set("t", PAIRWISE, chosen, k=3)


def test_a_replicated_set_arrives_with_every_setting(tmp_path: Path) -> None:
    a, b = replicated_node(tmp_path, "a"), replicated_node(tmp_path, "b")
    try:
        made = a.create_task_set("s", PAIRWISE, k=2, gold_share=0.25, lease_seconds=45)
        result = b.merge_records(held_records(a))
        assert len(result.accepted) == 1, result.invalid
        assert settings_of(b.find_task_set("s")) == settings_of(made)
    finally:
        a.close()
        b.close()


def test_a_record_body_is_checked_against_the_settings_model() -> None:
    good = record_body("s", "", PAIRWISE, TaskSetSettings())
    check_body("task_set", good)
    with pytest.raises(RecordError, match="k: Input should be a valid integer"):
        check_body("task_set", {**good, "k": True})  # exact JSON types: no bool for int
    with pytest.raises(RecordError, match="colour: unknown setting"):
        check_body("task_set", {**good, "colour": "red"})
    with pytest.raises(RecordError, match="fields"):
        check_body("task_set", {k: v for k, v in good.items() if k != "name"})
    # a record from a node that did not know a setting yet: the setting takes its default
    older = {k: v for k, v in good.items() if k != "lease_seconds"}
    check_body("task_set", older)


def test_a_record_without_a_setting_merges_with_its_default(tmp_path: Path) -> None:
    b = replicated_node(tmp_path, "b")
    try:
        body = record_body("s", "", PAIRWISE, TaskSetSettings(k=2))
        del body["lease_seconds"]
        result = b.merge_records([make_record(NodeIdentity.generate(), "task_set", body)])
        assert len(result.accepted) == 1, result.invalid
        assert b.find_task_set("s").lease_seconds == TaskSetSettings().lease_seconds
    finally:
        b.close()


def test_create_set_takes_a_flag_per_setting_and_names_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def create(*flags: str) -> int:
        parser = argparse.ArgumentParser()
        add_curation_parser(parser.add_subparsers(dest="command"))
        schema = '{"kind": "pairwise"}'
        argv = ["curation", "create-set", "--node-dir", str(tmp_path), "s", "--schema", schema]
        args = parser.parse_args([*argv, *flags])
        code: int = args.func(args)
        return code

    assert create("--k", "4", "--max-annotations", "3") == 2
    assert "max_annotations must be at least k=4, got 3" in capsys.readouterr().out
    assert create("--k", "2", "--lease-seconds", "40", "--threshold", "0.9") == 0
    store = CurationStore.open(
        f"sqlite:///{tmp_path / 'curation.db'}",
        NodeIdentity.generate(),
        password_hasher=FAST_HASHER,
    )
    try:
        made = store.find_task_set("s")
    finally:
        store.close()
    assert (made.k, made.max_annotations, made.lease_seconds) == (2, 4, 40)
    assert made.agreement_threshold == 0.9
