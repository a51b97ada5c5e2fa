"""The README's quick tour and the original design's quick starts, run as a user runs them.

Each test starts the installed ``swarmlm`` script in a fresh directory, on real ports of
127.0.0.1, and checks what it prints (issue 22, items 9-14): peers started as the original
P2P example shows find each other and ``train`` trains among them; ``swarmlm node
--node-type ...`` as the original node quick start; the banner names the admin password's
file and the node says what it is doing; ``swarmlm status``; ``swarmlm config init``;
``swarmlm demo``; the node config ``make run NODES=3`` builds. (train, eval, generate and
export-hf of the tour are in test_model_commands_cli.py.)

The models are tiny (the commands are under test, not the learning), so the file runs in
about a minute on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
SWARMLM = str(Path(sys.executable).with_name("swarmlm"))
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A running ``swarmlm`` command whose output is read as it comes."""

    def __init__(self, args: list[str], cwd: Path, stdin: bool = False) -> None:
        self.args = args
        self.p = subprocess.Popen(
            [SWARMLM, *args],
            cwd=cwd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
            start_new_session=True,
        )
        self.out = ""
        assert self.p.stdout is not None
        os.set_blocking(self.p.stdout.fileno(), False)

    def read(self) -> None:
        assert self.p.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.p.stdout, selectors.EVENT_READ)
            if sel.select(timeout=0.2):
                chunk = self.p.stdout.read()
                if chunk:
                    self.out += chunk

    def wait_for(self, pattern: str, timeout: float = 120.0, count: int = 1) -> str:
        """Read until ``pattern`` (a regex) has matched ``count`` times; returns the output."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.out, re.M)) < count:
            if time.monotonic() > deadline or self.p.poll() is not None:
                self.read()
                if len(re.findall(pattern, self.out, re.M)) >= count:
                    break
                raise AssertionError(
                    f"`swarmlm {shlex.join(self.args)}` did not print {pattern!r} "
                    f"(exit {self.p.poll()}):\n{self.out[-4000:]}"
                )
            self.read()
        return self.out

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def stop(self) -> int:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.read()
        return int(self.p.returncode)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def tiny_swarm_config(path: Path, data: Path, **swarm: object) -> Path:
    """A swarm run config of a very small model on the prepared test corpus."""
    cfg = {
        "model": {
            "vocab_size": 512,
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 1,
            "d_ff": 64,
            "max_seq_len": 32,
        },
        "data": {"path": str(data), "batch_size": 4, "seq_len": 32},
        "optim": {"lr": 0.003},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {"eval_batches": 2, "threads": 1, "precision": "fp32"},
        "swarm": {"rounds": 2, "inner_steps": 2, "expect_peers": 3, **swarm},
        "p2p": {"round_timeout": 20.0},
    }
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


# -- the original P2P example: --port, --bootstrap, --node-id, the p2p> prompt ------------------
def test_peers_started_as_the_original_shows_find_each_other_and_train_among_them(
    tmp_path: Path, prepared_data: Path, procs: list[Proc]
) -> None:
    cfg = tiny_swarm_config(tmp_path / "swarm.json", prepared_data)
    port = free_port()
    common = ["--train-config", str(cfg)]
    for i, name in enumerate(("peer_a", "peer_b", "peer_c")):
        boot = [] if i == 0 else ["--bootstrap", f"127.0.0.1:{port}"]
        args = ["p2p", "--node-id", name, "--port", str(port + i if i == 0 else 0), *boot]
        procs.append(Proc([*args, "--node-dir", str(tmp_path / name), *common], tmp_path, True))
    for proc in procs:
        proc.wait_for("listening on", 60)
    a = procs[0]
    # the others dial a, then each other (peer exchange): a sees both, by name
    deadline = time.monotonic() + 30
    while "peer_b" not in a.out or "peer_c" not in a.out:
        assert time.monotonic() < deadline, a.out
        a.send("peers")
        time.sleep(1.0)
        a.read()
    a.send("train")
    a.wait_for("starting training among 3 peers")
    for proc in procs:
        proc.wait_for(r"^train round +2 ", 150)
    digests = {
        re.findall(r"^train round +2 .*params ([0-9a-f]{12})", p.out, re.M)[0] for p in procs
    }
    assert len(digests) == 1, "every member holds the same weights after round 2"
    for proc in procs[1:]:
        assert "peer_a started training among 3 peers" in proc.out
    a.send("stats")
    a.wait_for(r"│ training +│ +(running|done) +│")  # stats shows the training
    for proc in procs:
        proc.send("quit")
        assert proc.p.wait(timeout=30) == 0
        proc.read()
        assert "node stopped" in proc.out


def test_test_at_the_prompt_forms_one_membership_of_the_connected_peers(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    procs.append(Proc(["p2p", "--port", str(port), "--node-dir", str(tmp_path / "a")],
                      tmp_path, True))  # fmt: skip
    procs.append(Proc(["p2p", "--port", "0", "--bootstrap", f"127.0.0.1:{port}",
                       "--node-dir", str(tmp_path / "b")], tmp_path, True))  # fmt: skip
    a, b = procs
    for proc in procs:
        proc.wait_for("listening on", 60)
    a.send("test")  # may come before b is connected: then it says so, and we retry
    deadline = time.monotonic() + 30
    while "membership formed: 2 peers" not in a.out:
        assert time.monotonic() < deadline, a.out
        a.read()
        if "no peer connected yet" in a.out:
            a.out = a.out.replace("no peer connected yet", "")
            a.send("test")
        time.sleep(0.3)
    a.wait_for(r"round 1 decided")
    b.wait_for(r"membership formed by [0-9a-f]{4}")
    assert "membership formed: 1" not in a.out + b.out, "no one-member swarm"
    for proc in procs:
        proc.send("quit")
        assert proc.p.wait(timeout=30) == 0


# -- the original node quick start, the banner, the activity lines, swarmlm status ----------------
def test_node_started_as_the_original_quick_start_shows_where_it_is_and_what_it_does(
    tmp_path: Path, prepared_data: Path, procs: list[Proc]
) -> None:
    cfg = tiny_swarm_config(tmp_path / "swarm.json", prepared_data, expect_peers=1, rounds=50)
    p2p_a, web_a, p2p_b, web_b = (free_port() for _ in range(4))
    # a peer to bootstrap from (annotation: no rounds, no torch), then the original's command
    procs.append(Proc(["node", "--node-type", "annotation", "--node-id", "peer_a",
                       "--p2p-port", str(p2p_a), "--web-port", str(web_a),
                       "--node-dir", str(tmp_path / "a")], tmp_path))  # fmt: skip
    procs[0].wait_for("http://127.0.0.1", 60)
    absent = free_port()
    node = Proc(["node", "--node-type", "full", "--node-id", "my_node_1",
                 "--p2p-port", str(p2p_b), "--web-port", str(web_b),
                 "--bootstrap", f"127.0.0.1:{p2p_a},127.0.0.1:{absent}",
                 "--set", "admin_username=admin", "--set", f"training.config={cfg}",
                 "--set", "rlhf.sample_every_rounds=null"], tmp_path)  # fmt: skip
    procs.append(node)
    node.wait_for(rf"http://127\.0\.0\.1:{web_b}", 90)
    password_file = tmp_path / "runs" / "nodes" / "my_node_1" / "admin-password"
    node.wait_for(r"log in as 'admin'; password in .*admin-password")
    assert str(password_file.relative_to(tmp_path)) in node.out
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert len(password_file.read_text().strip()) >= 12
    # then its first decided round (what it does until then is read once a second, which a
    # model this small can outrun: tests/node/test_progress.py checks those lines)
    node.wait_for(r"^round +1 +members 1", 120)
    status = subprocess.run(
        [SWARMLM, "status", "--node", f"http://127.0.0.1:{web_b}"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert "training" in status.stdout
    assert "p2p" in status.stdout
    assert node.stop() == 0


# -- make run NODES=3: the node config it builds --------------------------------------------------
def test_make_run_nodes_3_keeps_the_node_configs_overrides_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarmlm.cli import build_parser
    from swarmlm.node.cli import build_config
    from swarmlm.node.config import node_run_config

    # the arguments `make run NODES=3` gives every node (its recipe uses the same variable)
    dry = subprocess.run(
        ["make", "-s", "local-swarm-args", "NODES=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    node_args = dry.stdout.split()  # scripts/start_test_network.sh splits it so, too
    node_args[node_args.index("--config") + 1] = str(ROOT / "configs" / "node.yaml")
    monkeypatch.chdir(tmp_path)  # a node config works from any working directory
    args = build_parser(only="node").parse_args(["node", *node_args, "--node-id", "node-2"])
    cfg = build_config(args)
    assert cfg.max_cpu_threads == max(1, len(os.sched_getaffinity(0)) // 3)  # cores / nodes
    assert cfg.training.config.resolve() == ROOT / "configs" / "swarm-tiny.json"
    run: Any = node_run_config(cfg, cfg.directory)  # the run config the node trains with
    assert run.swarm.expect_peers == 3
    assert run.swarm.checkpoint_every == 2, "the node config's checkpoint_every survives"
    assert run.swarm.rounds == 200


# -- the training system's entry points: config init, demo ----------------------------------------
def test_config_init_writes_a_commented_node_config_a_node_loads(tmp_path: Path) -> None:
    from swarmlm.config import load_config
    from swarmlm.node.config import read_config_file, validate_config
    from swarmlm.train.config import RunConfig

    done = subprocess.run([SWARMLM, "config", "init"], cwd=tmp_path, capture_output=True,
                          text=True, env=ENV, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "swarmlm node --config node.yaml" in done.stdout
    text = (tmp_path / "node.yaml").read_text()
    assert "# which components run" in text
    assert "# p2p port" in text
    cfg = validate_config(read_config_file(tmp_path / "node.yaml"))
    assert cfg.node_id == "node-1"
    assert cfg.admin_username == "admin"
    assert Path(cfg.training.config).exists()
    again = subprocess.run([SWARMLM, "config", "init"], cwd=tmp_path, capture_output=True,
                           text=True, env=ENV, timeout=60)  # fmt: skip
    assert again.returncode == 2
    assert "exists (pass --force" in again.stderr
    train = subprocess.run([SWARMLM, "config", "init", "--kind", "train"], cwd=tmp_path,
                           capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip
    assert train.returncode == 0, train.stderr
    run = load_config(RunConfig, tmp_path / "train.yaml")
    assert run.model.d_model == 256
    assert run.model.norm_eps == pytest.approx(1e-5)


def test_demo_runs_data_train_eval_generate_and_says_what_next(tmp_path: Path) -> None:
    done = subprocess.run(
        [SWARMLM, "demo", "--quick", "--steps", "8", "--dir", "tour"],
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for command in ("$ swarmlm data prepare", "$ swarmlm train", "$ swarmlm eval",
                    "$ swarmlm generate"):  # fmt: skip
        assert command in out
    assert "In the beginning" in out
    assert "make run NODES=4" in out
    assert (tmp_path / "tour" / "run" / "checkpoints" / "latest").exists()
