"""A node running the RLHF loop, with simulated annotators: shared by the end-to-end test
(``tests/node/test_rlhf_loop_e2e.py``) and ``benchmarks/rlhf_swarm.py``'s loop stage.

:func:`loop_node_config` writes a node config (the shipped ``configs/node.yaml`` and
``configs/swarm-tiny.json`` with a tiny model, free loopback ports and ``rlhf.loop`` on);
:class:`SimulatedAnnotators` label the loop's pairwise tasks through the web API as people
would (``/api/register``, ``/api/login``, ``/api/tasks``, ``/api/submit``), each in its own
thread; :func:`loop_health` reads the loop's health component.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[3]
PASSWORD = "annotator-password-1"

Judge = Callable[[str, str, str], str]
"""(prompt, answer A, answer B) -> the pairwise label: "A", "B", "tie" or "both_bad"."""


def longer_answer(prompt: str, a: str, b: str) -> str:
    """A judge every annotator agrees with: the longer answer (then the later in text order)."""
    return "A" if (len(a), a) >= (len(b), b) else "B"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def loop_node_config(
    data: Path,
    root: Path,
    loop: dict[str, Any],
    run_swarm: dict[str, Any] | None = None,
    **node: Any,
) -> Path:
    """Write ``root/node.yaml``: a full node on the prepared corpus ``data`` with a tiny
    model (rounds well under a second), the RLHF loop with settings ``loop``
    (``swarm.rlhf_loop``), its directory under ``root``; ``run_swarm`` overrides keys of the
    run's ``swarm`` section (e.g. ``expect_peers``), ``node`` overrides node keys."""
    configs = REPO / "configs"
    if not (configs / "node.yaml").is_file():
        raise FileNotFoundError(f"{configs}: the shipped configs (a source checkout) are needed")
    swarm = json.loads((configs / "swarm-tiny.json").read_text(encoding="utf-8"))
    from swarmlm.data import Tokenizer

    vocab = Tokenizer.load(data / "tokenizer.json").vocab_size
    swarm["model"] = {"vocab_size": int(vocab), "d_model": 32, "n_layers": 1, "n_heads": 2,
                      "n_kv_heads": 1, "max_seq_len": 64}  # fmt: skip
    swarm["data"] = {"path": str(data), "batch_size": 2, "seq_len": 16, "prefetch": 2}
    swarm["train"].update(eval_batches=2, threads=1)
    swarm["swarm"].update(inner_steps=3, genesis_timeout=5)
    swarm_path = root / "swarm.json"
    root.mkdir(parents=True, exist_ok=True)
    swarm_path.write_text(json.dumps(swarm), encoding="utf-8")
    cfg: dict[str, Any] = yaml.safe_load((configs / "node.yaml").read_text(encoding="utf-8"))
    cfg["training"]["config"] = str(swarm_path)
    cfg["rlhf"]["loop"] = True
    cfg["run"]["swarm"].update(
        checkpoint_every=1, rounds=100_000, rlhf_loop=loop, **(run_swarm or {})
    )
    cfg.update(
        node_dir=str(root / "node"),
        p2p_port=free_port(),
        web_port=free_port(),
        max_cpu_threads=1,
        admin_password="admin-password-1",
        **node,
    )
    path = root / "node.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def start_node(cfg_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """``swarmlm node --config cfg_path`` as a user starts it, its output appended to ``log``."""
    script = Path(sys.executable).parent / "swarmlm"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "swarmlm.cli"]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*cmd, "node", "--config", str(cfg_path)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


def loop_health(port: int) -> dict[str, Any]:
    """The node's ``rlhf_loop`` health component ({} while it is not up)."""
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}
    comps = body.get("components") if isinstance(body, dict) else None
    return dict((comps or {}).get("rlhf_loop") or {})


class SimulatedAnnotators:
    """``n`` annotators labelling every pairwise task of ``task_set`` over HTTP until
    stopped (a context manager); ``judge`` decides each label."""

    def __init__(
        self,
        port: int,
        n: int = 3,
        judge: Judge = longer_answer,
        task_set: str = "model-samples",
    ) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.judge = judge
        self.task_set = task_set
        self.stop = threading.Event()
        self.submitted = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._work, args=(f"sim-annotator-{i}",), daemon=True)
            for i in range(n)
        ]

    def __enter__(self) -> SimulatedAnnotators:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _work(self, name: str) -> None:
        try:
            with httpx.Client(base_url=self.base, timeout=30) as c:
                r = self._register(c, name)
                if r is None:
                    return  # stopped before the node's web server came up
                if r.status_code not in (201, 409):
                    raise RuntimeError(f"register: HTTP {r.status_code} {r.text}")
                r = c.post("/api/login", json={"username": name, "password": PASSWORD})
                if r.status_code != 200:
                    raise RuntimeError(f"login: HTTP {r.status_code} {r.text}")
                auth = {"authorization": f"Bearer {r.json()['token']}"}
                while not self.stop.is_set():
                    task = self._next_task(c, auth)
                    if task is None:
                        self.stop.wait(0.2)
                        continue
                    a, b = task["outputs"]
                    value = self.judge(str(task.get("content") or ""), a, b)
                    body = {"task_id": task["task_id"], "value": value, "time_spent_ms": 900}
                    r = c.post("/api/submit", json=body, headers=auth)
                    if r.status_code != 200:
                        raise RuntimeError(f"submit: HTTP {r.status_code} {r.text}")
                    with self._lock:
                        self.submitted += 1
        except Exception as exc:  # reported by the caller, not lost in a thread
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def _register(self, c: httpx.Client, name: str) -> httpx.Response | None:
        """Register once the node's web server answers (annotators may start first)."""
        while not self.stop.is_set():
            try:
                return c.post("/api/register", json={"username": name, "password": PASSWORD})
            except httpx.TransportError:
                self.stop.wait(0.5)
        return None

    def _next_task(self, c: httpx.Client, auth: dict[str, str]) -> dict[str, Any] | None:
        sets = c.get("/api/task-sets", headers=auth)
        if sets.status_code != 200:
            return None
        ids = [s["id"] for s in sets.json() if s.get("name") == self.task_set]
        if not ids:
            return None
        task: dict[str, Any] | None = c.get(
            f"/api/tasks?task_set_id={ids[0]}", headers=auth
        ).json()["task"]
        return task
