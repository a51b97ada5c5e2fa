"""End to end: ``swarmlm node`` with ``rlhf.loop`` cycles pretrain -> samples -> comparison
tasks -> consensus labels from simulated annotators over the HTTP API -> reward model ->
GRPO -> new samples, shows it in health, and a restart resumes the loop where it was.

The node runs as a user starts it (the console script, a YAML config) with a tiny model and
small thresholds; three annotator threads register, log in and label every pairwise task
through ``/api/tasks`` and ``/api/submit`` (they prefer the longer answer, all alike, so
consensus finalises each task after its three annotations).
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarmlm.testing.rlhf_loop import (
    SimulatedAnnotators,
    loop_health,
    loop_node_config,
    start_node,
)

LOOP = {
    "pretrain_rounds": 2,
    "min_labels": 3,
    "reward_rounds": 2,
    "policy_rounds": 2,
    "samples_per_cycle": 4,
    "sample_max_new_tokens": 8,
    "idle_round_s": 0.3,
    "reward": {"batch_size": 4, "max_len": 64, "val_fraction": 0.3},
    "grpo": {
        "prompts_per_round": 2,
        "group_size": 2,
        "eval_prompts": 2,
        "minibatch_size": 2,
        "max_new_tokens": 6,
    },
}


def wait_for(proc: subprocess.Popen[bytes], log: Path, what: str, check: Any, limit: float) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"node exited with {proc.returncode}:\n{log.read_text()}"
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {limit:.0f} s:\n{log.read_text()[-6000:]}")


@pytest.mark.timeout(240)
def test_node_runs_the_rlhf_loop_through_two_cycles_and_resumes_after_restart(
    prepared_data: Path, tmp_path: Path
) -> None:
    cfg_path = loop_node_config(prepared_data, tmp_path, LOOP)
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    port, node_dir = cfg["web_port"], Path(cfg["node_dir"])
    log = tmp_path / "node.log"
    proc = start_node(cfg_path, log)
    phases: list[str] = []
    try:
        # before any annotator works, the loop waits in collect and says so
        waiting = wait_for(
            proc, log, "no wait for labels", lambda: loop_health(port).get("waiting"), 90
        )
        assert "the reward model waits for consensus labels: 0 of" in waiting
        with SimulatedAnnotators(port) as annotators:

            def two_cycles() -> bool:
                h = loop_health(port)
                if h.get("phase") and (not phases or phases[-1] != h["phase"]):
                    phases.append(h["phase"])
                return int(h.get("cycles_completed") or 0) >= 2

            wait_for(proc, log, "no two loop cycles", two_cycles, 150)
        assert not annotators.errors, annotators.errors
        assert annotators.submitted >= 2 * 3 * 3  # >= 3 tasks a cycle, 3 labels each
        before = loop_health(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        text = log.read_text(encoding="utf-8")
        assert "Traceback" not in text, text
        assert "rlhf loop: phase reward" in text
        assert "rlhf loop: phase policy" in text
        assert "reward phase idles" not in text  # the node's own store fed the reward model
        # the reward and policy phases evaluated what they trained
        curve = [
            json.loads(x)
            for x in (node_dir / "train" / "loop" / "curve.jsonl").read_text().splitlines()
        ]
        assert any(p["phase"] == "reward" and "rm_accuracy" in p for p in curve)
        assert any(p["phase"] == "policy" and "reward" in p and "kl" in p for p in curve)

        # a restart resumes the loop at its cycle, not from pretraining
        proc = start_node(cfg_path, log)
        after = wait_for(
            proc, log, "no loop state after restart", lambda: loop_health(port).get("cycle"), 90
        )
        resumed = loop_health(port)
        assert int(after) >= int(before["cycle"])
        assert resumed["phase"] != "pretrain", resumed
        assert int(resumed["cycles_completed"]) >= 2
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # the phases were seen in the loop's order (polling may miss a short one)
    order = {"pretrain": 0, "collect": 1, "reward": 2, "policy": 3}
    seen = [order[p] for p in phases if p in order]
    assert any(b < a for a, b in itertools.pairwise(seen)), phases  # it cycled


def rounds_of(node_dir: Path) -> dict[int, str]:
    path = node_dir / "train" / "swarm_rounds.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return {int(r["round"]): str(r["params_sha256"]) for r in rows}


@pytest.mark.timeout(300)
def test_two_nodes_switch_phase_at_the_same_round_and_hold_identical_weights(
    prepared_data: Path, tmp_path: Path
) -> None:
    """Both full nodes claim their own replica's label count; the phase follows the decided
    claims, so both train the same phase every round (identical weights after every round,
    identical loop states), though annotators use only the first node's web app and the
    second node's replica lags by its replication interval."""
    loop = {**LOOP, "min_labels": 4}

    def config(name: str, **node: Any) -> Path:
        two = {"expect_peers": 2, "genesis_timeout": 120}
        return loop_node_config(
            prepared_data, tmp_path / name, loop, run_swarm=two, node_id=f"loop-{name}", **node
        )

    first_cfg = config("a")
    first = yaml.safe_load(first_cfg.read_text(encoding="utf-8"))
    second_cfg = config("b", bootstrap_peers=[f"127.0.0.1:{first['p2p_port']}"])
    second = yaml.safe_load(second_cfg.read_text(encoding="utf-8"))
    dirs = [Path(first["node_dir"]), Path(second["node_dir"])]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_node(first_cfg, logs[0]), start_node(second_cfg, logs[1])]
    try:
        with SimulatedAnnotators(first["web_port"]) as annotators:

            def one_cycle_each() -> bool:
                return all(
                    int(loop_health(c["web_port"]).get("cycles_completed") or 0) >= 1
                    for c in (first, second)
                )

            wait_for(procs[0], logs[0], "no full cycle on both nodes", one_cycle_each, 240)
        assert not annotators.errors, annotators.errors
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    texts = [log.read_text(encoding="utf-8") for log in logs]
    for text in texts:
        assert "Traceback" not in text, text
        assert "rlhf_loop record of round" not in text  # no peer rejected for its phase
    a, b = rounds_of(dirs[0]), rounds_of(dirs[1])
    common = sorted(set(a) & set(b))
    assert len(common) >= 6, (a, b)
    assert all(a[r] == b[r] for r in common), [(r, a[r], b[r]) for r in common if a[r] != b[r]]
    states = [json.loads((d / "train" / "loop" / "state.json").read_text())["states"] for d in dirs]
    shared = sorted(set(states[0]) & set(states[1]), key=int)
    assert [states[0][r] for r in shared] == [states[1][r] for r in shared]
    phases = {states[0][r]["phase"] for r in shared}
    assert {"collect", "reward", "policy"} <= phases, phases
