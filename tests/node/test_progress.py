"""What ``swarmlm node`` says it is doing before its first decided round (issue 22 #14)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from swarmlm.node.progress import ActivityPrinter, activity, bar


class FakeRuntime:
    """The attributes :func:`activity` reads, settable phase by phase."""

    def __init__(self) -> None:
        self.state = "starting"
        self.cfg = SimpleNamespace(type="training")
        self.swarm_cfg = SimpleNamespace(
            swarm=SimpleNamespace(expect_peers=3, mode="diloco", inner_steps=10),
            train=SimpleNamespace(compile=False),
        )
        self.p2p = SimpleNamespace(connections={})
        self.swarm: Any = None
        self.last_round: dict[str, Any] | None = None

    def training(self) -> dict[str, Any]:
        return {"state": self.state, "last_round": self.last_round}

    def is_round_member(self, peer: str) -> bool:
        return peer != "annotator"


def test_a_starting_node_says_loading_then_waiting_for_peers_then_training_with_a_bar() -> None:
    rt = FakeRuntime()
    lines: list[str] = []
    printer = ActivityPrinter(lines.append)
    printer.poll(rt)
    assert lines[-1] == "building the model and loading the data"
    rt.swarm = SimpleNamespace(worker=SimpleNamespace(trainer=SimpleNamespace(step=0)), proto=None)
    rt.p2p.connections = {"peer-b": object(), "annotator": object()}
    printer.poll(rt)
    assert lines[-1].startswith("waiting for peers: 2 of 3 round members connected")
    rt.swarm.proto = SimpleNamespace(last_decided=0, start_round=1)
    printer.poll(rt)
    assert lines[-1] == "evaluating the initial model"
    rt.state = "training"
    printer.poll(rt)
    assert lines[-1] == "training round 1  [--------------------] 0/10 inner steps"
    n = len(lines)
    printer.poll(rt)
    assert len(lines) == n, "no new line while nothing changed (a log file stays short)"
    rt.swarm.worker.trainer.step = 10
    printer.poll(rt)
    assert lines[-1] == "round 1: local phase done, waiting for the round's decision"
    rt.swarm.proto.last_decided = 1
    printer.poll(rt)
    assert lines[-1] == "round 1 decided: applying it and evaluating"
    rt.last_round = {"round": 1}  # the node printed "round 1 ..."
    printer.poll(rt)
    assert lines[-1].startswith("training round 2  [-")


def test_compiling_is_named_and_annotation_nodes_print_nothing() -> None:
    rt = FakeRuntime()
    rt.swarm_cfg.train.compile = True
    assert "compiling the model" in activity(rt, {}).text  # type: ignore[union-attr]
    rt.state = "off"
    assert activity(rt, {}) is None


def test_the_bar_counts_inner_steps() -> None:
    assert bar(5, 10) == "[##########----------] 5/10 inner steps"
