"""The `swarmlm p2p` command as a user runs it: headless swarms, the prompt, Ctrl+C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]

ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def p2p(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "swarmlm.p2p.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        **kw,  # type: ignore[call-overload]
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def decided_rows(output: str) -> dict[int, set[str]]:
    """round -> set of 'peer digest' rows printed in its table."""
    rounds: dict[int, set[str]] = {}
    current = None
    for line in output.splitlines():
        m = re.search(r"round (\d+) decided", line)
        if m:
            current = int(m.group(1))
            rounds[current] = set()
            continue
        row = re.match(r"│ ([0-9a-f]{12}) │ ([0-9a-f]{16}) │", line)
        if row and current is not None:
            rounds[current].add(f"{row.group(1)} {row.group(2)}")
    return rounds


def test_four_headless_nodes_started_from_one_bootstrap_print_identical_rounds(
    tmp_path: Path,
) -> None:
    port = free_port()
    common = ["--no-repl", "--expect", "4", "--rounds", "3", "--round-timeout", "10"]
    procs = [p2p("--port", str(port), "--node-dir", str(tmp_path / "n0"), *common)]
    time.sleep(0.5)
    for i in range(1, 4):
        procs.append(p2p("--bootstrap", f"127.0.0.1:{port}",
                         "--node-dir", str(tmp_path / f"n{i}"), *common))  # fmt: skip
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    tables = [decided_rows(o) for o in outputs]
    for r in (1, 2, 3):
        assert all(t.get(r) == tables[0][r] for t in tables), f"round {r} differs"
        assert len(tables[0][r]) >= 3
    for i in range(4):
        assert (tmp_path / f"n{i}" / "identity.key").stat().st_mode & 0o777 == 0o600


def test_prompt_runs_stats_peers_test_and_quit(tmp_path: Path) -> None:
    # --expect 1: a lone peer rounds by itself only when asked to (without it, `test` waits
    # for a connected peer; see tests/integration/test_quickstarts.py)
    proc = p2p("--node-dir", str(tmp_path), "--expect", "1", stdin=subprocess.PIPE)
    out, _ = proc.communicate("stats\npeers\ntest\nnonsense\nquit\n", timeout=60)
    assert proc.returncode == 0, out
    assert "rounds decided" in out
    assert "state" in out
    assert "round 1 decided" in out
    assert "unknown command 'nonsense'" in out
    assert "node stopped" in out


def test_ctrl_c_stops_a_headless_node_cleanly(tmp_path: Path) -> None:
    proc = p2p("--node-dir", str(tmp_path), "--no-repl")
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    seen = ""
    while "listening" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, seen + out
    assert "node stopped" in out


def test_bad_bootstrap_address_is_refused_with_the_address_named(tmp_path: Path) -> None:
    proc = p2p("--node-dir", str(tmp_path), "--no-repl", "--bootstrap", "localhost:notaport")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "localhost:notaport" in out


def _run_swarm(tmp_path: Path, rounds: int) -> list[str]:
    """Four headless nodes from one bootstrap, each with its node dir under ``tmp_path``."""
    port = free_port()
    common = ["--no-repl", "--expect", "4", "--rounds", str(rounds), "--round-timeout", "10"]
    procs = [p2p("--port", str(port), "--node-dir", str(tmp_path / "n0"), *common)]
    time.sleep(0.5)
    for i in range(1, 4):
        procs.append(p2p("--bootstrap", f"127.0.0.1:{port}",
                         "--node-dir", str(tmp_path / f"n{i}"), *common))  # fmt: skip
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


def test_nodes_restarted_from_their_node_dirs_resume_after_their_last_round(
    tmp_path: Path,
) -> None:
    _run_swarm(tmp_path, 3)
    outputs = _run_swarm(tmp_path, 2)  # same identities, same dirs
    for out in outputs:
        assert "resuming after round 3" in out, out
        assert set(decided_rows(out)) == {4, 5}, out
