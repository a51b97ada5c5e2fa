"""The node's side of the closed RLHF loop (``rlhf.loop: true``).

The loop itself trains inside the swarm run as the objective ``rlhf_loop``
(:mod:`swarmlm.rlhf.loop_objective`): the phase of every round follows from decided facts,
so all peers switch together. What only a node can do lives here, run after every decided
round (off the event loop):

* import the comparison tasks the objective wrote (``<node_dir>/train/loop/tasks-*.jsonl``)
  into the curation store, where annotators label them and the replicated store's consensus
  (a pure function of each task's annotation set, so every replica settles a task alike)
  turns them into the preferences the reward phase trains on; a
  file is renamed ``*.imported`` once its tasks are in, so a restart never imports twice
  and never loses a file written just before a crash;
* report the loop's phase, counts and curves (``status.json`` and ``curve.jsonl`` the
  objective writes atomically / appends): the health component ``rlhf_loop`` (with the
  waiting reason the objective also logs), the training feed's ``rlhf_loop`` key and an
  ``rlhf_phase`` event on each change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from swarmlm.node.config import RlhfSection

log = logging.getLogger(__name__)

CURVE_POINTS = 500  # loop curve points kept for the dashboard


def add_comparison_tasks(
    store: Any, rc: RlhfSection, node_id: str, path: Path, r: int, source: str
) -> int:
    """Import a task file (``{"id", "content", "outputs"}`` JSONL) into the task set
    ``rc.task_set`` (created on first use: pairwise with 2 responses, ranking with more;
    3 annotations a task). External ids name this node and the round: the same prompt comes
    back in later rounds with new answers, and other full nodes sample too."""
    from swarmlm.curation.errors import CurationError
    from swarmlm.curation.interchange import read_tasks_file

    schema: dict[str, Any] = {"kind": "pairwise" if rc.responses == 2 else "ranking"}
    if rc.responses != 2:
        schema["k"] = rc.responses
    try:
        ts = store.find_task_set(rc.task_set)
    except CurationError:
        ts = store.create_task_set(
            rc.task_set,
            schema,
            k=3,
            description="responses of the swarm's model; your preferences train the reward model",
        )
    tasks = [
        dataclasses.replace(t, external_id=f"{node_id}-r{r}-{t.external_id or 'task'}")
        for t in read_tasks_file(path)
    ]
    return int(store.add_tasks(ts.id, tasks, source=source))


class RlhfLoopMonitor:
    """Imports the loop's tasks and reads its state for the dashboard (see module doc)."""

    def __init__(self, node_dir: Path, node_id: str, store: Any, bus: Any, rc: RlhfSection):
        self.dir = node_dir / "train" / "loop"
        self.node_id = node_id
        self.store = store
        self.bus = bus
        self.rc = rc
        self.tasks_imported = 0
        self._phase: tuple[str, int] | None = None

    def after_round(self, r: int) -> None:
        """Blocking (store writes, file reads): run it in a thread."""
        if self.store is not None:
            self.import_pending()
        status = self.read_status()
        if status is None:
            return
        phase = (str(status.get("phase")), int(status.get("cycle") or 0))
        if phase != self._phase:
            self._phase = phase
            log.info(
                "rlhf loop: phase %s (cycle %d, from round %s)", phase[0], phase[1], status["since"]
            )
            self.bus.publish(
                "rlhf_phase",
                phase=phase[0],
                cycle=phase[1],
                since=status.get("since"),
                cycles_completed=status.get("cycles_completed"),
            )

    def import_pending(self) -> int:
        """Import every task file not imported yet; returns the tasks added."""
        added = 0
        for path in sorted(self.dir.glob("tasks-r*.jsonl")):
            try:
                r = int(path.stem.removeprefix("tasks-r"))
                n = add_comparison_tasks(
                    self.store, self.rc, self.node_id, path, r, f"rlhf loop round {r}"
                )
            except Exception:
                log.exception("rlhf loop: importing %s failed; retried after the next round", path)
                continue
            path.rename(path.with_suffix(".imported"))
            added += n
            log.info("rlhf loop: %d comparison tasks of round %d for the annotators", n, r)
        self.tasks_imported += added
        return added

    def read_status(self) -> dict[str, Any] | None:
        try:
            raw = json.loads((self.dir / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    def curve(self) -> list[dict[str, Any]]:
        """The loop's evaluations (round, phase, cycle and the phase's metrics)."""
        try:
            lines = (self.dir / "curve.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines[-CURVE_POINTS:]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash mid-append
        return out

    def status(self) -> dict[str, Any]:
        """Phase, counts, waiting reason and curves: the dashboard's view of the loop."""
        status = self.read_status() or {"phase": "starting"}
        labels = None
        if self.store is not None:
            labels = self._consensus_labels()
        return {
            **status,
            "tasks_imported": self.tasks_imported,
            "consensus_labels_here": labels,
            "curve": self.curve(),
        }

    def component(self) -> dict[str, Any]:
        """The health component: ok while it runs; ``waiting`` says why it idles."""
        status = self.read_status() or {}
        out: dict[str, Any] = {
            "status": "ok",
            "required": False,
            "phase": status.get("phase", "starting"),
            "cycle": status.get("cycle"),
            "cycles_completed": status.get("cycles_completed"),
            "labels": status.get("labels"),
            "tasks_imported": self.tasks_imported,
        }
        if status.get("waiting"):
            out["waiting"] = status["waiting"]
        return out

    def _consensus_labels(self) -> int | None:
        from swarmlm.curation.errors import CurationError

        try:
            ts = self.store.find_task_set(self.rc.task_set)
            return int(self.store.progress(ts.id, with_agreement=False).finalised)
        except (CurationError, AttributeError):
            return None
