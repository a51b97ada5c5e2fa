"""Serving with several uvicorn worker processes (``swarmlm web --workers N``)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web_helpers import FAST_HASHER, PASSWORD, make_settings

from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import create_app
from swarmlm.web.cli import add_web_parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def two_worker_server(tmp_path: Path) -> Iterator[tuple[str, CurationStore, int]]:
    """A live ``serve(workers=2)`` over a SQLite store seeded with 8 tasks (k = 3)."""
    url = f"sqlite:///{tmp_path / 'curation.db'}"
    store = CurationStore.open(
        url, NodeIdentity.load_or_create(tmp_path), password_hasher=FAST_HASHER
    )
    ts = store.create_task_set(
        "shared", {"kind": "single_choice", "choices": ["a", "b"]}, k=3, gold_share=0.0
    )
    store.add_tasks(ts.id, [TaskInput(content=f"item {i}") for i in range(8)])
    for i in range(6):
        store.create_annotator(f"worker{i}", PASSWORD)
    port = _free_port()
    code = (
        "from pathlib import Path; from swarmlm.web import WebSettings;"
        "from swarmlm.web.app import serve;"
        f"serve(WebSettings(node_dir=Path({str(tmp_path)!r}), db_url={url!r}, workers=2,"
        " submit_per_second=1000, submit_burst=1000, login_per_minute=1000),"
        f" port={port}, log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "server exited"
            assert time.monotonic() < deadline, "server did not come up in 60 s"
            time.sleep(0.2)
        yield base, store, ts.id
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        store.close()


@pytest.mark.timeout(180)
def test_two_worker_processes_share_the_store_without_losing_or_overfilling_tasks(
    two_worker_server: tuple[str, CurationStore, int],
) -> None:
    base, store, ts_id = two_worker_server
    acked: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def annotate(username: str) -> None:
        try:
            # a fresh connection per request, so requests spread over both workers
            def client() -> httpx.Client:
                return httpx.Client(base_url=base, timeout=30)

            with client() as c:
                r = c.post("/api/login", json={"username": username, "password": PASSWORD})
                r.raise_for_status()
                headers = {"authorization": f"Bearer {r.json()['token']}"}
            while True:
                with client() as c:
                    r = c.get(f"/api/tasks?task_set_id={ts_id}", headers=headers)
                r.raise_for_status()
                task = r.json()["task"]
                if task is None:
                    return
                body = {"task_id": task["task_id"], "value": "a", "time_spent_ms": 5}
                with client() as c:
                    r = c.post("/api/submit", json=body, headers=headers)
                r.raise_for_status()
                with lock:
                    acked.append(r.json()["annotation_id"])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=annotate, args=(f"worker{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not errors
    assert len(acked) == len(set(acked)) == 24  # 8 tasks x k = 3, every ack distinct
    assert {a.id for _, a in store.annotations(ts_id)} == set(acked)
    tasks = store.list_tasks(ts_id)
    assert all(t.n_annotations == 3 and t.status == "finalised" for t in tasks)


def test_rate_limits_are_split_between_worker_processes(tmp_path: Path) -> None:
    store = CurationStore.open(
        f"sqlite:///{tmp_path / 'c.db'}", NodeIdentity.generate(), password_hasher=FAST_HASHER
    )
    try:
        one = create_app(store, make_settings(tmp_path, submit_per_second=20, submit_burst=40))
        two = create_app(
            store, make_settings(tmp_path, submit_per_second=20, submit_burst=40, workers=2)
        )
        assert one.state.swarm.submit_limiter.rate == 20
        assert two.state.swarm.submit_limiter.rate == 10
        assert two.state.swarm.submit_limiter.burst == 20
        assert two.state.swarm.login_limiter.burst == one.state.swarm.login_limiter.burst / 2
    finally:
        store.close()


def test_web_command_refuses_a_worker_count_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_web_parser(parser.add_subparsers())
    args = parser.parse_args(["web", "--workers", "0", "--node-dir", str(tmp_path)])
    assert args.func(args) == 2
    assert "--workers" in capsys.readouterr().out
