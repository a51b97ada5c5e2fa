"""Import (JSONL, Label Studio), export (annotations, consensus, preferences) and verify."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from swarmlm.curation.cli import add_curation_parser
from swarmlm.curation.errors import ImportFormatError
from swarmlm.curation.interchange import (
    export_to_file,
    parse_label_studio,
    parse_tasks_text,
    read_tasks_file,
)
from swarmlm.curation.signing import verify_export_file
from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity


@pytest.fixture
def sqlite_store(tmp_path: Path) -> CurationStore:
    from argon2 import PasswordHasher

    s = CurationStore.open(
        f"sqlite:///{tmp_path / 'c.db'}",
        NodeIdentity.generate(),
        rng=random.Random(0),
        password_hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
    )
    yield s  # type: ignore[misc]
    s.close()


def _annotate_all(store: CurationStore, ts_id: int, answers: list[str]) -> None:
    for i, ans in enumerate(answers):
        uid = store.create_annotator(f"annotator{i}", "long enough").id
        while (lt := store.next_task(uid, ts_id)) is not None:
            store.submit(uid, lt.task_id, ans, 100 + i)


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_curation_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def test_jsonl_import_reads_content_outputs_gold_and_ids(
    tmp_path: Path, sqlite_store: CurationStore
) -> None:
    f = tmp_path / "tasks.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"id": "q1", "content": "Which is kinder?", "outputs": ["a", "b"]}),
                "",
                json.dumps({"content": {"prompt": "p2"}, "outputs": ["c", "d"], "gold": "A"}),
            ]
        )
    )
    tasks = read_tasks_file(f)
    assert [t.external_id for t in tasks] == ["q1", None]
    ts = sqlite_store.create_task_set("prefs", {"kind": "pairwise"})
    assert sqlite_store.add_tasks(ts.id, tasks) == 2
    stored = sqlite_store.list_tasks(ts.id)
    assert stored[1].is_gold
    assert stored[1].gold == "A"
    assert stored[1].external_id == "2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"content": "ok"}\n{"content": ', "line 2: invalid JSON"),
        ('["not", "an object"]', "line 1: expected a JSON object"),
        ('{"text": "no content"}', "line 1: unknown fields ['text']"),
        ('{"id": "x"}', "line 1: missing field 'content'"),
    ],
)
def test_malformed_jsonl_names_the_line_and_field(text: str, message: str) -> None:
    with pytest.raises(ImportFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_tasks_text(text, "jsonl", "tasks.jsonl")


def test_label_studio_export_imports_data_and_ids() -> None:
    ls = [
        {
            "id": 11,
            "data": {"text": "I loved it"},
            "annotations": [{"result": [{"value": {"choices": ["Positive"]}}]}],
        },
        {"id": 12, "data": {"prompt": "Q?", "answer1": "yes", "answer2": "no"}},
    ]
    tasks = parse_label_studio(ls[:1])
    assert tasks == [TaskInput(content="I loved it", external_id="11")]
    pair = parse_label_studio(ls[1:], outputs_keys=["answer1", "answer2"])
    assert pair[0].content == {"prompt": "Q?"}
    assert pair[0].outputs == ["yes", "no"]
    with pytest.raises(ImportFormatError, match="task 1: data has no output fields"):
        parse_label_studio(ls[:1], outputs_keys=["answer1"])
    with pytest.raises(ImportFormatError, match="task 1: expected an object with a 'data'"):
        parse_label_studio([{"id": 1}])


def test_signed_export_verifies_and_any_tampering_is_detected(
    tmp_path: Path, sqlite_store: CurationStore
) -> None:
    ts = sqlite_store.create_task_set(
        "sent", {"kind": "single_choice", "choices": ["pos", "neg"]}, k=2, gold_share=0.0
    )
    sqlite_store.add_tasks(ts.id, [TaskInput(content=f"review {i}") for i in range(3)])
    _annotate_all(sqlite_store, ts.id, ["pos", "pos"])
    out = tmp_path / "ann.jsonl"
    assert export_to_file(sqlite_store, ts.id, "annotations", out) == 6
    report = verify_export_file(out)
    assert report.ok
    assert report.valid == 6
    assert report.signers == {sqlite_store.identity.public_key_bytes.hex()}
    assert _run_cli("curation", "verify", str(out)) == 0

    lines = out.read_text().splitlines()
    for field, mutate in [
        ("value", lambda o: o.__setitem__("value", "neg")),
        ("annotator", lambda o: o.__setitem__("annotator_id", "0" * 32)),
        ("time", lambda o: o.__setitem__("time_spent_ms", o["time_spent_ms"] + 1)),
        ("task", lambda o: o["task"].__setitem__("content", "review 99")),
        ("signature", lambda o: o.__setitem__("signature", "00" * 64)),
    ]:
        obj = json.loads(lines[1])
        mutate(obj)
        bad = tmp_path / f"tampered_{field}.jsonl"
        bad.write_text("\n".join([lines[0], json.dumps(obj), *lines[2:]]) + "\n")
        rep = verify_export_file(bad)
        assert not rep.ok, field
        assert [ln for ln, _ in rep.failures] == [2], field
        assert _run_cli("curation", "verify", str(bad)) == 1

    other = NodeIdentity.generate().public_key_bytes.hex()
    assert not verify_export_file(out, trusted_signers={other}).ok
    assert _run_cli("curation", "verify", str(tmp_path / "missing.jsonl")) == 2


def test_pairwise_consensus_exports_reward_model_preferences(
    tmp_path: Path, sqlite_store: CurationStore
) -> None:
    ts = sqlite_store.create_task_set("pw", {"kind": "pairwise"}, k=3, gold_share=0.0)
    sqlite_store.add_tasks(
        ts.id,
        [
            TaskInput(content={"prompt": "Say hi"}, outputs=["hello!", "go away"]),
            TaskInput(content="Add 2+2", outputs=["5", "4"]),
        ],
    )
    # first task: A wins; second task: B wins (3 annotators each)
    for i in range(3):
        uid = sqlite_store.create_annotator(f"rater{i}", "long enough").id
        while (lt := sqlite_store.next_task(uid, ts.id)) is not None:
            sqlite_store.submit(
                uid, lt.task_id, "A" if lt.outputs == ["hello!", "go away"] else "B", 5
            )
    out = tmp_path / "prefs.jsonl"
    assert export_to_file(sqlite_store, ts.id, "preferences", out) == 2
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [
        {"prompt": "Say hi", "chosen": "hello!", "rejected": "go away"},
        {"prompt": "Add 2+2", "chosen": "4", "rejected": "5"},
    ]
    cons = tmp_path / "cons.jsonl"
    export_to_file(sqlite_store, ts.id, "consensus", cons)
    first = json.loads(cons.read_text().splitlines()[0])
    assert first["consensus"] == "A"
    assert first["status"] == "finalised"
    assert first["methods"]["dawid_skene"] == "A"
    assert first["methods"]["majority"] == "A"


def test_ranking_consensus_exports_every_ordered_pair(
    tmp_path: Path, sqlite_store: CurationStore
) -> None:
    ts = sqlite_store.create_task_set("rk", {"kind": "ranking", "k": 3}, k=2, gold_share=0.0)
    sqlite_store.add_tasks(ts.id, [TaskInput(content="best answer?", outputs=["x", "y", "z"])])
    _annotate_all(sqlite_store, ts.id, [[1, 2, 0], [1, 2, 0]])  # type: ignore[list-item]
    out = tmp_path / "prefs.jsonl"
    assert export_to_file(sqlite_store, ts.id, "preferences", out) == 3
    pairs = [(r["chosen"], r["rejected"]) for r in map(json.loads, out.read_text().splitlines())]
    assert pairs == [("y", "z"), ("y", "x"), ("z", "x")]


def test_cli_imports_exports_and_creates_admins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = tmp_path / "node"
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"content": "a"}\n{"content": "b"}\n')
    assert (
        _run_cli(
            "curation",
            "create-set",
            "--node-dir",
            str(node),
            "sent",
            "--schema",
            '{"kind": "single_choice", "choices": ["x", "y"]}',
        )
        == 0
    )
    assert _run_cli("curation", "import", "--node-dir", str(node), "sent", str(tasks)) == 0
    assert _run_cli("curation", "import", "--node-dir", str(node), "nope", str(tasks)) == 2
    assert (node / "curation.db").exists()
    assert (node / "identity.key").exists()
    out = tmp_path / "cons.jsonl"
    assert (
        _run_cli("curation", "export", "--node-dir", str(node), "sent", "consensus", str(out)) == 0
    )
    assert len(out.read_text().splitlines()) == 2
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("s3cret-pass\n"))
    assert (
        _run_cli(
            "curation",
            "add-user",
            "--node-dir",
            str(node),
            "root",
            "--role",
            "admin",
            "--password-stdin",
        )
        == 0
    )
