"""A loopback network of integrated nodes (``swarmlm node``) as real processes.

One scenario, in phases, because starting five torch processes on two cores is the
expensive part: a full node, two training nodes, a lightweight voter and an annotation
node. Annotators work through two different nodes' HTTP APIs and every curation node ends
with the same signed annotations and consensus; training rounds progress with the voter in
the quorum; a training node and the annotation node are SIGKILLed and restarted and catch
up (model and store); a hot reload is applied and an invalid one refused; ``/metrics``
parses with prometheus_client's parser.

With ``SWARMLM_TEST_NETWORK`` unset the test starts its own nodes (the normal case);
``scripts/run_integration_tests.sh`` runs it the same way after checking a scripted
network comes up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmlm.testing.node import NodeNetwork, NodeProcess

pytestmark = pytest.mark.integration

ADMIN = {"username": "admin", "password": "admin-password-1"}


def swarm_config(data: Path, path: Path) -> Path:
    cfg = {
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2,
                  "n_kv_heads": 1, "max_seq_len": 32},
        "data": {"path": str(data), "batch_size": 2, "seq_len": 16, "prefetch": 2},
        "optim": {"lr": 0.003},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {"eval_batches": 2, "out_dir": "unused", "seed": 0, "threads": 1},
        "swarm": {"rounds": 100000, "inner_steps": 3, "data_shards": 16, "expect_peers": 4,
                  "genesis_timeout": 120, "eval_every": 5, "checkpoint_every": 3,
                  "round_timeout": 60},
        "p2p": {"round_timeout": 2.0, "proposal_grace": 0.2, "heartbeat_interval": 0.5,
                "dead_timeout": 3.0, "pex_interval": 1.0, "fetch_timeout": 5.0},
    }  # fmt: skip
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


class Api:
    """A logged-in API client on one node."""

    def __init__(self, node: NodeProcess, username: str, password: str, register: bool) -> None:
        self.node = node
        self.http = httpx.Client(base_url=node.url, timeout=10.0)
        if register:
            r = self.http.post("/api/register", json={"username": username, "password": password})
            assert r.status_code == 201, r.text
        r = self.http.post("/api/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        self.http.headers["Authorization"] = f"Bearer {r.json()['token']}"

    def task_set_id(self, name: str) -> int | None:
        r = self.http.get("/api/task-sets")
        r.raise_for_status()
        return next((ts["id"] for ts in r.json() if ts["name"] == name), None)

    def label_one(self, ts_id: int, value: Any) -> bool:
        r = self.http.get("/api/tasks", params={"task_set_id": ts_id})
        r.raise_for_status()
        task = r.json()["task"]
        if task is None:
            return False
        r = self.http.post("/api/submit", json={"task_id": task["task_id"], "value": value})
        assert r.status_code == 200, r.text
        return True

    def export(self, ts_id: int, kind: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/api/task-sets/{ts_id}/export", params={"kind": kind})
        r.raise_for_status()
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def annotations_view(api: Api, name: str) -> set[tuple[str, str, str, str]]:
    ts = api.task_set_id(name)
    if ts is None:
        return set()
    return {
        (a["task_digest"], a["annotator_id"], json.dumps(a["value"]), a["signature"])
        for a in api.export(ts, "annotations")
    }


def consensus_view(api: Api, name: str) -> list[tuple[Any, ...]]:
    ts = api.task_set_id(name)
    assert ts is not None
    rows = api.export(ts, "consensus")
    return sorted(
        (r["external_id"], r["status"], json.dumps(r["consensus"]), r["n_annotations"])
        for r in rows
    )


def rounds_of(node: NodeProcess) -> dict[int, dict[str, Any]]:
    return {int(e["round"]): e for e in node.events_of("round_decided")}


def wait_rounds(node: NodeProcess, n: int, timeout: float) -> None:
    start = max(rounds_of(node), default=0)
    node.wait_for(lambda: max(rounds_of(node), default=0) >= start + n, timeout, f"{n} rounds")


@pytest.mark.timeout(600)
def test_integrated_network(prepared_data: Path, tmp_path: Path) -> None:
    cfg_path = swarm_config(prepared_data, tmp_path / "swarm.json")
    base = {
        "training": {"config": str(cfg_path)},
        "replication": {"sync_interval": 0.5},
        "rlhf": {"sample_every_rounds": 6, "prompts_per_batch": 2, "max_new_tokens": 8},
        "max_cpu_threads": 1,
        "admin_username": ADMIN["username"],
        "admin_password": ADMIN["password"],
        "log_level": "INFO",
    }
    with NodeNetwork(tmp_path, base) as net:
        full = net.start("full", "full")
        t1 = net.start("t1", "training", bootstrap=[full])
        t2 = net.start("t2", "training", bootstrap=[full])
        light = net.start("light", "lightweight", bootstrap=[full])
        ann = net.start("ann", "annotation", bootstrap=[full])
        nodes = [full, t1, t2, light, ann]
        for n in nodes:
            n.wait_for(lambda n=n: n.health()["status"] in ("ok", "degraded"), 30, "health")

        # -- training: rounds decide with the voter in the membership ----------------------
        wait_rounds(t1, 3, 180)
        genesis_members = {e["members"] for e in t1.events_of("round_decided")}
        assert genesis_members == {4}, genesis_members
        assert all(e["accepted"] == 0 for e in light.events_of("round_decided"))

        # -- curation: two annotators on two nodes, one task set created on the full node --
        admin = Api(full, **ADMIN, register=False)
        r = admin.http.post(
            "/api/task-sets",
            json={"name": "colours", "label_schema": {"kind": "single_choice",
                  "choices": ["red", "blue"]}, "k": 2, "gold_share": 0.0},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        ts_full = r.json()["id"]
        r = admin.http.post(
            f"/api/task-sets/{ts_full}/import",
            json={"format": "tasks", "tasks": [
                {"id": f"t{i}", "content": {"text": f"item {i}"}} for i in range(4)]},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        admin_ann = Api(ann, **ADMIN, register=False)
        ann.wait_for(lambda: admin_ann.task_set_id("colours") is not None, 20, "task set copy")
        ts_ann = admin_ann.task_set_id("colours")
        assert ts_ann is not None
        ann.wait_for(
            lambda: len(admin_ann.export(ts_ann, "consensus")) == 4, 20, "tasks replicated"
        )
        alice = Api(full, "alice", "alice-password-1", register=True)
        bob = Api(ann, "bob", "bob-password-12", register=True)
        labelled = 0
        while alice.label_one(ts_full, "red"):
            labelled += 1
        while bob.label_one(ts_ann, "red" if labelled % 2 else "blue") and labelled < 50:
            labelled += 1
        assert labelled >= 6, labelled

        def converged() -> bool:
            a, b = annotations_view(admin, "colours"), annotations_view(admin_ann, "colours")
            return len(a) == labelled and a == b

        full.wait_for(converged, 20, "annotations converged on both curation nodes")
        full.wait_for(
            lambda: consensus_view(admin, "colours") == consensus_view(admin_ann, "colours"),
            20,
            "identical consensus",
        )

        # -- ops: metrics parse, health per component --------------------------------------
        for n in (full, t1, light, ann):
            text = httpx.get(f"{n.url}/metrics", timeout=5).text
            names = {f.name for f in text_string_to_metric_families(text)}
            assert "swarmlm_node_info" in names, (n.name, sorted(names)[:20])
        assert "swarmlm_rounds_decided" in {
            f.name for f in text_string_to_metric_families(httpx.get(f"{t1.url}/metrics").text)
        }
        comps = full.health()["components"]
        assert {"p2p", "rounds", "training", "store", "disk", "resources"} <= set(comps)

        # -- hot reload: the safe subset applies, a restart-only change is refused --------
        net.edit_config("full", log_level="WARNING")
        full.wait("config_reloaded", 15)
        net.edit_config("full", log_level="WARNING", p2p_port=1)
        rejected = full.wait("config_rejected", 15)
        assert "p2p_port" in rejected["error"]
        assert full.health()["status"] in ("ok", "degraded")

        # -- a training node is SIGKILLed: the rest (voter included) keep deciding -------
        t2.kill()
        wait_rounds(t1, 2, 120)
        after_kill = [e for e in t1.events_of("round_decided")][-1]
        assert after_kill["accepted"] == 2  # full + t1; the voter completes the quorum of 3

        # ... and restarted: it resumes from its checkpoint and catches up to equal weights
        t2 = net.start("t2", "training", bootstrap=[full])
        t2.wait_for(lambda: len(rounds_of(t2)) >= 2, 180, "restarted node rounds")
        common = sorted(set(rounds_of(t2)) & set(rounds_of(t1)))
        assert common, "the restarted node applied no round the others applied"
        last = common[-1]
        assert rounds_of(t2)[last]["params_sha256"] == rounds_of(t1)[last]["params_sha256"]

        # -- the annotation node is SIGKILLed, misses annotations, and catches up ---------
        ann.kill()
        carol = Api(full, "carol", "carol-password-1", register=True)
        extra = 0
        while carol.label_one(ts_full, "blue"):
            extra += 1
        ann = net.start("ann", "annotation", bootstrap=[full])
        admin_ann = Api(ann, **ADMIN, register=False)

        def caught_up() -> bool:
            a, b = annotations_view(admin, "colours"), annotations_view(admin_ann, "colours")
            return len(a) == labelled + extra and a == b

        ann.wait_for(caught_up, 30, "restarted annotation node caught up")

        # -- alignment: model samples became comparison tasks, replicated everywhere -----
        full.wait_for(lambda: admin.task_set_id("model-samples") is not None, 120, "sampled tasks")
        ann.wait_for(
            lambda: admin_ann.task_set_id("model-samples") is not None, 30, "samples replicated"
        )

        # -- clean shutdown: SIGTERM checkpoints and exits 0 -----------------------------
        t1.stop(timeout=60)
        assert t1.proc.returncode == 0, t1.log_tail()
        assert t1.events_of("node_stopping")
