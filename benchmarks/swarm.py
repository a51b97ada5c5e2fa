"""Decentralized training against the baselines: same model, same KJV data, same token budget.

The question (issue #7, "Benchmark"): what does swarm training over the P2P round protocol
cost in validation loss, bytes on the wire and idle CPU, compared with one process, with
synchronous peers, with a trusted torchrun cluster, and with hivemind 1.1.12's ``Optimizer``?

Configurations, run one after the other on this machine (4 peers share its 2 cores, one torch
thread each; one process gets both cores):

* **a** one process: ``swarmlm train``, micro-batch ``B`` x ``grad_accum`` 4 (the global batch of
  4 peers), ``H x R`` steps;
* **b** 4 synchronous peers (``swarm.mode=synchronous``, one round per step, codec ``none``:
  float32 gradients), ``H x R`` rounds;
* **c** 4 DiLoCo peers, ``H`` = 50 inner AdamW steps, int8 pseudo-gradients (the swarm
  default: blocks of 1024 values, zstd over the payload), ``R`` rounds;
* **d** as c with ``topk_sign`` (top-k of the pseudo-gradient, values sent as signs scaled by
  their block's mean magnitude, error feedback kept per peer by the swarm engine; ``k`` = 25 %,
  see ``TOPK_FRACTION``);
* **e** as c with peer 3 running the ALIE attack (honest peers' loss is reported);
* **h** as c with ``swarm.overlap``: round r's communication runs while round r + 1's inner
  steps compute, so each update is applied one round late (the loss cost of overlap);
* **f** ``torchrun`` DDP, 4 gloo processes, micro-batch ``B`` each, ``H x R`` steps;
* **g** hivemind 1.1.12 ``Optimizer`` with 4 peers (``_hivemind_peer.py`` in its own venv, see
  ``scripts/hivemind-env.sh``): the same model, loader shards, inner AdamW and LR schedule,
  ``use_local_updates=True`` and ``target_batch_size = 4 B H`` (parameter averaging once the
  swarm has processed what one DiLoCo round processes), int8 state averaging. Its matchmaking
  may fail to form a group: counted and reported, never retried or tuned.

Every configuration processes ``4 x B x seq x H x R`` training tokens, starts from the same
initial weights (``train.seed``) and is evaluated on the same validation batches every
``4 B H`` samples. Peer ``i`` reads data shard ``i`` of 4 (as DDP rank ``i`` does).

Measured per configuration: final validation loss (honest peers), bytes sent per peer (the
swarm transport's own counter, cumulative, handshakes and protocol messages included; for
DDP and hivemind an *estimate* from the all-reduce volume, marked as such), wall time (start
of the processes to the last one done), and the compute share: seconds computing (local
training, ``compute_s`` of the round reports, plus the evaluations, ``eval_s``) over the wall
time of the round loop (first round start to last round report); the rest is waiting for
rounds, applying them and checkpoints, each reported as its own share (``train_share`` is
training alone). hivemind's peers count the same way (forward, backward and evaluation; its
optimizer step, which holds the averaging, is not counted as computing).

Run:  .venv/bin/python benchmarks/swarm.py [--quick] [--skip-hivemind] [--only c,d]
Writes benchmarks/results/swarm.json and swarm.png (validation loss against bytes sent per
peer); the last stdout line is the headline JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress
from rich.table import Table

from _common import (  # the benchmarks folder is the script's sys.path[0]
    RESULTS_DIR,
    contention,
    emit_headline,
    environment,
    make_progress,
    save_figure,
    stderr_console,
    write_json,
)
from swarmlm.testing.swarm import SwarmProcesses

log = logging.getLogger("benchmarks.swarm")

NAME = "swarm"
ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "kjv.txt.gz"
TINY = ROOT / "configs" / "swarm-tiny.json"
SHARED_DATA = ROOT / "runs" / "data" / "kjv"  # what `make run` prepares
HIVEMIND_ENV_SCRIPT = ROOT / "scripts" / "hivemind-env.sh"
HIVEMIND_VENV = RESULTS_DIR / "hivemind-venv"
PEERS = 4
ATTACKER = 3

# Top-k keeps this fraction of each pseudo-gradient. With ``topk_sign`` a kept value costs
# 1 bit + 32 / 256 (its block scale) + its index (1-byte deltas, zstd: ~4 bits at 25 %),
# ~0.64 byte, against 4 bytes x H = 200 bytes a parameter per round in (b): 200 / (0.25 x
# 0.64) = 1,250x before protocol overheads. Over 3 rounds (quick) more coordinates matter
# more than exact values: topk_int8 at 10 % (about the same bytes) ended 5 % higher (session 5).
TOPK_FRACTION = 0.25

TARGETS = {
    "diloco_loss_ratio_vs_sync": ("<=", 1.03),
    "diloco_bytes_reduction": (">=", 200.0),
    "topk_bytes_reduction": (">=", 1000.0),
    "topk_loss_ratio": ("<=", 1.04),
    "attack_loss_ratio": ("<=", 1.05),
    "compute_share": (">=", 0.90),
}


@dataclass(frozen=True)
class Budget:
    """One token budget shared by every configuration. ``steps`` = H x R optimizer steps of
    the global batch ``peers x batch_size`` sequences of ``seq_len`` tokens."""

    model: dict[str, Any]
    batch_size: int
    seq_len: int
    inner_steps: int  # H
    rounds: int  # R (DiLoCo rounds)
    eval_batches: int
    topk_fraction: float
    p2p_round_timeout: float

    @property
    def steps(self) -> int:
        return self.inner_steps * self.rounds

    @property
    def samples_per_round(self) -> int:
        return PEERS * self.batch_size * self.inner_steps

    @property
    def tokens(self) -> int:
        return PEERS * self.batch_size * self.seq_len * self.steps


def full_budget(rounds: int) -> Budget:
    """The tiny model of configs/swarm-tiny.json at its batch and sequence length."""
    tiny = json.loads(TINY.read_text(encoding="utf-8"))
    return Budget(
        model=tiny["model"],
        batch_size=tiny["data"]["batch_size"],
        seq_len=tiny["data"]["seq_len"],
        inner_steps=50,
        rounds=rounds,
        eval_batches=tiny["train"]["eval_batches"],
        topk_fraction=TOPK_FRACTION,
        p2p_round_timeout=120.0,
    )


def quick_budget(rounds: int) -> Budget:
    """The tiny model's shape shrunk (width 128, 2 layers, 64-token windows) so all seven
    configurations fit in about five minutes on 2 cores; H stays 50."""
    tiny = json.loads(TINY.read_text(encoding="utf-8"))
    model = {**tiny["model"], "d_model": 128, "n_layers": 2, "d_ff": 344, "max_seq_len": 64}
    return Budget(
        model=model,
        batch_size=8,
        seq_len=64,
        inner_steps=50,
        rounds=rounds,
        eval_batches=8,
        topk_fraction=TOPK_FRACTION,
        p2p_round_timeout=30.0,
    )


@dataclass
class RunResult:
    """One configuration's measurements. ``curve``: (tokens, bytes sent per peer, val loss)."""

    key: str
    label: str
    ok: bool = False
    error: str | None = None
    final_val_loss: float | None = None
    bytes_per_peer: float | None = None
    bytes_measured: bool = True
    wall_s: float | None = None
    compute_share: float | None = None
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# -- data and configs --------------------------------------------------------------------------


def prepared_data(work: Path, vocab_size: int) -> Path:
    """The KJV corpus prepared as `make run` does (vocabulary of the tiny config); reuses
    runs/data/kjv when it matches, else prepares into the results folder once."""
    for candidate in (SHARED_DATA, RESULTS_DIR / "swarm-data"):
        meta = candidate / "meta.json"
        if meta.exists() and json.loads(meta.read_text())["vocab_size"] == vocab_size:
            return candidate
    from swarmlm.data import prepare_corpus

    out = RESULTS_DIR / "swarm-data"
    stderr_console.print(f"preparing {CORPUS.name} into {out} (vocabulary {vocab_size})")
    tmp = Path(tempfile.mkdtemp(prefix=".swarm-data.", dir=RESULTS_DIR))
    prepare_corpus([CORPUS], tmp, vocab_size=vocab_size, val_fraction=0.01, seed=0)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def run_config(budget: Budget, data: Path, out: Path) -> dict[str, Any]:
    """The run config every configuration shares (schedule over the H x R global steps)."""
    tiny = json.loads(TINY.read_text(encoding="utf-8"))
    return {
        "model": budget.model,
        "data": {"path": str(data), "batch_size": budget.batch_size, "seq_len": budget.seq_len},
        "optim": tiny["optim"],
        "schedule": tiny["schedule"],
        "train": {
            "eval_batches": budget.eval_batches,
            "out_dir": str(out),
            "seed": 0,
            "threads": 1,
            "max_steps": budget.steps,
            "eval_every": budget.inner_steps,
            "log_every": budget.inner_steps,
            "checkpoint_every": budget.steps,
        },
    }


def swarm_config(budget: Budget, data: Path, out: Path, **swarm: Any) -> dict[str, Any]:
    cfg = run_config(budget, data, out)
    for key in ("max_steps", "eval_every", "log_every", "checkpoint_every"):
        del cfg["train"][key]  # derived by the swarm worker from rounds x inner_steps
    cfg["swarm"] = {
        "mode": "diloco",
        "rounds": budget.rounds,
        "inner_steps": budget.inner_steps,
        "data_shards": PEERS,
        "expect_peers": PEERS,
        "genesis_timeout": 180,
        "checkpoint_every": 10_000,
        # H steps each, as every configuration here processes the same tokens (the default
        # samples pace lets a peer slower than the median stop early: issue 19 item 5)
        "round_pace": "steps",
        **swarm,
    }
    cfg["p2p"] = {"round_timeout": budget.p2p_round_timeout}
    return cfg


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


def param_count(budget: Budget) -> int:
    from swarmlm.model import ModelConfig, Transformer

    return int(Transformer(ModelConfig(**budget.model)).num_parameters())


# -- (b)-(e): real swarm peers ---------------------------------------------------------------


def run_swarm(
    key: str,
    label: str,
    budget: Budget,
    data: Path,
    work: Path,
    progress: Progress,
    *,
    attacker: int | None = None,
    timeout: float,
    **swarm: Any,
) -> RunResult:
    res = RunResult(key, label)
    root = work / key
    sync = swarm.get("mode") == "synchronous"
    if sync:
        swarm = {**swarm, "rounds": budget.steps, "eval_every": budget.inner_steps}
    cfg = write(root / "swarm.json", swarm_config(budget, data, root / "runs", **swarm))
    overrides = {i: [f"swarm.data_shard={i}"] for i in range(PEERS)}
    if attacker is not None:
        overrides[attacker].append("swarm.attack=alie")
    total_rounds = budget.steps if sync else budget.rounds
    task = progress.add_task(f"{key}: {label}", total=total_rounds)
    t0 = time.perf_counter()
    try:
        with SwarmProcesses(cfg, PEERS, root, overrides=overrides, ready_timeout=120) as swarm_:
            deadline = time.monotonic() + timeout
            while True:
                done = [any(e["event"] == "done" for e in p.history) for p in swarm_.peers]
                progress.update(task, completed=min(len(p.rounds()) for p in swarm_.peers))
                if all(done):
                    break
                dead = [p.index for p, d in zip(swarm_.peers, done, strict=True) if not p.alive]
                dead = [i for i in dead if not done[i]]
                if dead:
                    tails = "\n".join(swarm_.peers[i].log_tail(15) for i in dead)
                    raise RuntimeError(f"peer(s) {dead} exited before finishing:\n{tails}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not done within {timeout:.0f} s")
                time.sleep(0.5)
            res.wall_s = time.perf_counter() - t0
            histories = {p.index: list(p.history) for p in swarm_.peers}
    except (RuntimeError, TimeoutError) as exc:
        res.error = str(exc)[-2000:]
        res.wall_s = time.perf_counter() - t0
        return res
    honest = [i for i in range(PEERS) if i != attacker]
    summarise_swarm(res, budget, histories, honest, sync)
    return res


def summarise_swarm(
    res: RunResult,
    budget: Budget,
    histories: dict[int, list[dict[str, Any]]],
    honest: list[int],
    sync: bool,
) -> None:
    rounds = {
        i: {int(e["round"]): e for e in h if e["event"] == "round"} for i, h in histories.items()
    }
    genesis = {i: next(e for e in h if e["event"] == "genesis") for i, h in histories.items()}
    last = max(rounds[honest[0]])
    tokens_per_round = (
        PEERS * budget.batch_size * budget.seq_len * (1 if sync else budget.inner_steps)
    )
    res.curve.append((0, 0.0, float(genesis[honest[0]]["val_loss"])))
    for r in sorted(rounds[honest[0]]):
        loss = rounds[honest[0]][r]["val_loss"]
        if loss is None:
            continue
        sent = statistics.mean(rounds[i][r]["bytes_sent"] for i in honest if r in rounds[i])
        res.curve.append((r * tokens_per_round, float(sent), float(loss)))
    res.final_val_loss = float(rounds[honest[0]][last]["val_loss"])
    res.bytes_per_peer = statistics.mean(
        float(rounds[i][max(rounds[i])]["bytes_sent"]) for i in honest
    )
    shares, train_shares, waits, applies, eval_shares, saves = [], [], [], [], [], []
    for i in honest:
        evs = [rounds[i][r] for r in sorted(rounds[i])]
        # the round loop starts after genesis (its evaluation is not part of the loop)
        loop = evs[-1]["time"] - genesis[i]["time"]
        # computing = local training plus the evaluations (forward passes on the same CPU);
        # what is left is waiting for the round, applying it and writing checkpoints
        shares.append(sum(e["compute_s"] + e.get("eval_s", 0.0) for e in evs) / loop)
        train_shares.append(sum(e["compute_s"] for e in evs) / loop)
        waits.append(sum(e["wait_s"] for e in evs) / loop)
        applies.append(sum(e["apply_s"] for e in evs) / loop)
        eval_shares.append(sum(e.get("eval_s", 0.0) for e in evs) / loop)
        saves.append(sum(e.get("checkpoint_s", 0.0) for e in evs) / loop)
    res.compute_share = statistics.median(shares)
    hashes_equal = all(
        len({rounds[i][r]["params_sha256"] for i in honest if r in rounds[i]}) == 1
        for r in rounds[honest[0]]
    )
    ref = rounds[honest[0]]
    res.extra = {
        "rounds": last,
        "train_share": statistics.median(train_shares),
        "eval_share": statistics.median(eval_shares),
        "wait_share": statistics.median(waits),
        "apply_share": statistics.median(applies),
        "checkpoint_share": statistics.median(saves),
        "compute_share_per_peer": shares,
        "honest_params_identical_every_round": hashes_equal,
        "rounds_with_all_accepted": sum(1 for e in ref.values() if e["accepted"] == PEERS),
        "view_changes": sum(1 for e in ref.values() if e["view"] > 0),
        "resyncs": sum(1 for i in honest for e in rounds[i].values() if e["resynced"]),
        "payload_bytes_last_round": ref[last]["payload_bytes"],
        # Payload bytes a peer sent beyond pushing its own payload once to each other member,
        # per round (pulls served when a push was late): protocol waste, load-dependent.
        "payload_bytes_served_on_request_per_round": statistics.mean(
            rounds[i][max(rounds[i])].get("fetch_bytes_served", 0) / max(rounds[i]) for i in honest
        ),
        # which protocol path pulled them (all honest peers, whole run)
        "pulls": dict(
            sum(
                (Counter(rounds[i][max(rounds[i])].get("pulls", {})) for i in honest),
                Counter(),
            )
        ),
        "blob_bytes_per_round": statistics.mean(
            rounds[i][max(rounds[i])].get("blob_bytes_sent", 0) / max(rounds[i]) for i in honest
        ),
        "flagged_rounds": sum(1 for e in ref.values() if e["flagged"]),
        "excluded_rounds": sum(1 for e in ref.values() if e["excluded"]),
    }
    res.ok = True


# -- (a) and (f): the trainer alone and under torchrun ------------------------------------------


def run_trainer(
    key: str,
    label: str,
    budget: Budget,
    data: Path,
    work: Path,
    progress: Progress,
    *,
    nproc: int,
    n_params: int,
    timeout: float,
) -> RunResult:
    res = RunResult(key, label)
    root = work / key
    out = root / "run"
    cfg = run_config(budget, data, out)
    if nproc == 1:
        # one thread as every peer: on a shared 2-core machine 2-thread OpenMP regions
        # collapse under background load (benchmarks/README.md)
        cfg["train"]["grad_accum"] = PEERS  # the global batch of 4 peers
        cmd = [sys.executable, "-m", "swarmlm.cli", "train", "--config"]
    else:
        cfg["distributed"] = {"strategy": "ddp", "backend": "gloo"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "swarmlm.cli", "train", "--config"]  # fmt: skip
    path = write(root / "run.json", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    task = progress.add_task(f"{key}: {label}", total=budget.steps)
    metrics = out / "metrics.jsonl"
    t0 = time.perf_counter()
    with (root / "train.log").open("wb") as logf:
        proc = subprocess.Popen([*cmd, str(path)], stdout=logf, stderr=logf, env=env)
        try:
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    res.error = f"not done within {timeout:.0f} s"
                    return res
                progress.update(task, completed=_last_step(metrics))
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    res.wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (root / "train.log").read_text(errors="replace").splitlines()[-15:]
        res.error = f"exit code {proc.returncode}:\n" + "\n".join(tail)
        return res
    progress.update(task, completed=budget.steps)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["kind"] == "eval"]
    tokens_per_step = PEERS * budget.batch_size * budget.seq_len
    # DDP all-reduces the float32 gradient every step: a ring all-reduce sends
    # 2 (n - 1) / n of it per rank (gloo's algorithms send at least that much)
    per_step = 0.0 if nproc == 1 else 2 * (nproc - 1) / nproc * 4 * n_params
    res.curve = [
        (r["step"] * tokens_per_step, r["step"] * per_step, float(r["loss"])) for r in evals
    ]
    res.final_val_loss = float(evals[-1]["loss"])
    res.bytes_per_peer = budget.steps * per_step
    res.bytes_measured = nproc == 1
    res.extra = {"steps": evals[-1]["step"], "processes": nproc}
    res.ok = True
    return res


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
    return 0


# -- (g): hivemind ----------------------------------------------------------------------------


def hivemind_python(install: bool) -> Path:
    """The hivemind venv's python; installs it with scripts/hivemind-env.sh when asked."""
    python = HIVEMIND_VENV / "bin" / "python"
    stamp = HIVEMIND_VENV / ".installed-hivemind-1.1.12"
    if not stamp.exists():
        if not install:
            raise RuntimeError(
                f"no hivemind environment at {HIVEMIND_VENV}: run scripts/hivemind-env.sh "
                "(or pass --install-hivemind)"
            )
        proc = subprocess.run(
            ["bash", str(HIVEMIND_ENV_SCRIPT), str(HIVEMIND_VENV)],
            capture_output=True, text=True, check=False, timeout=1800,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/hivemind-env.sh failed:\n{proc.stderr[-2000:]}")
    return python


def run_hivemind(
    key: str,
    label: str,
    budget: Budget,
    data: Path,
    work: Path,
    progress: Progress,
    *,
    n_params: int,
    install: bool,
    timeout: float,
) -> RunResult:
    res = RunResult(key, label, bytes_measured=False)
    root = work / key
    root.mkdir(parents=True, exist_ok=True)
    try:
        python = hivemind_python(install)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res.error = str(exc)
        return res
    cfg = write(root / "run.json", run_config(budget, data, root / "runs"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    script = Path(__file__).resolve().parent / "_hivemind_peer.py"
    task = progress.add_task(f"{key}: {label}", total=budget.steps)
    procs: list[subprocess.Popen[str]] = []
    logs = []
    events: list[list[dict[str, Any]]] = [[] for _ in range(PEERS)]
    t0 = time.perf_counter()
    try:
        initial: list[str] = []
        for i in range(PEERS):
            logf = (root / f"peer{i}.log").open("w")
            logs.append(logf)
            argv = [str(python), str(script), "--config", str(cfg), "--index", str(i),
                    "--peers", str(PEERS), "--inner-steps", str(budget.inner_steps),
                    *[a for m in initial for a in ("--initial-peer", m)]]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, text=True, env=env)
            procs.append(proc)
            if i == 0:
                ready = _read_event(proc, events[0], "ready", 120)
                initial = list(ready["maddrs"])
        # stdout is line-buffered JSON; read each peer's lines until it reports done
        import threading

        def reader(i: int) -> None:
            stdout = procs[i].stdout
            assert stdout is not None
            for line in stdout:
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(ev, dict):
                    events[i].append(ev)

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(PEERS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            steps = [max((e.get("step", 0) for e in ev), default=0) for ev in events]
            progress.update(task, completed=min(steps))
            if time.monotonic() > deadline:
                raise TimeoutError(f"hivemind peers not done within {timeout:.0f} s")
            time.sleep(0.5)
        for t in threads:
            t.join(timeout=5)
        res.wall_s = time.perf_counter() - t0
    except (TimeoutError, RuntimeError, KeyError) as exc:
        res.error = str(exc)
        res.wall_s = time.perf_counter() - t0
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(
            "\n".join((root / f"peer{i}.log").read_text(errors="replace").splitlines()[-10:])
            for i in failed
        )
        res.error = f"peer(s) {failed} failed:\n{tails}"
        return res
    summarise_hivemind(res, budget, events, n_params)
    return res


def _read_event(
    proc: subprocess.Popen[str], sink: list[dict[str, Any]], name: str, timeout: float
) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hivemind peer exited (code {proc.wait()}) before {name!r}")
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        sink.append(ev)
        if ev.get("event") == name:
            return dict(ev)
    raise TimeoutError(f"hivemind peer sent no {name!r} within {timeout} s")


def summarise_hivemind(
    res: RunResult, budget: Budget, events: list[list[dict[str, Any]]], n_params: int
) -> None:
    done = [next(e for e in ev if e["event"] == "done") for ev in events]
    evals = [e for e in events[0] if e["event"] == "eval"]
    averagings = [e for ev in events for e in ev if e["event"] == "averaged"]

    # int8 state averaging, butterfly all-reduce: each peer sends (g - 1) / g of its
    # (1-byte-per-value) state to the group and the same again as averaged parts
    def sent(g: int) -> float:
        return 2 * (g - 1) / g * n_params if g > 1 else 0.0

    per_peer = [
        sum(sent(int(e["group_size"])) for e in ev if e["event"] == "averaged") for ev in events
    ]
    tokens_per_step = PEERS * budget.batch_size * budget.seq_len
    cum = 0.0
    curve = []
    for e in evals:
        cum = sum(
            sent(int(a["group_size"]))
            for a in events[0]
            if a["event"] == "averaged" and a["step"] <= e["step"]
        )
        curve.append((e["step"] * tokens_per_step, cum, float(e["val_loss"])))
    res.curve = curve
    res.final_val_loss = float(evals[-1]["val_loss"]) if evals else None
    res.bytes_per_peer = statistics.mean(per_peer)
    res.compute_share = statistics.median(
        (d["compute_s"] + d.get("eval_s", 0.0)) / d["loop_s"] for d in done
    )
    groups = [int(e["group_size"]) for e in averagings]
    res.extra = {
        "epochs_per_peer": [d["epoch"] for d in done],
        "averaging_rounds_per_peer": [d["averagings"] for d in done],
        "averaging_failures_per_peer": [d["averaging_failures"] for d in done],
        "group_sizes": groups,
        # peer 0's view: epochs it reached (each one an averaging attempt) and how many of
        # them averaged with all 4 peers
        "averaging_attempts_peer0": done[0]["epoch"],
        "full_groups": sum(
            1 for e in events[0] if e["event"] == "averaged" and e["group_size"] == PEERS
        ),
        "final_val_loss_per_peer": [d["val_loss"] for d in done],
        "bytes_estimate": "2 (g - 1) / g x parameters x 1 byte per successful averaging",
    }
    res.ok = res.final_val_loss is not None


# -- report -----------------------------------------------------------------------------------


def headline(results: dict[str, RunResult]) -> dict[str, Any]:
    def loss(k: str) -> float:
        r = results.get(k)
        return r.final_val_loss if r is not None and r.final_val_loss is not None else math.nan

    def sent(k: str) -> float:
        r = results.get(k)
        return r.bytes_per_peer if r is not None and r.bytes_per_peer else math.nan

    c = results.get("c")
    out: dict[str, Any] = {
        "diloco_loss_ratio_vs_sync": loss("c") / loss("b"),
        "diloco_bytes_reduction": sent("b") / sent("c"),
        "topk_bytes_reduction": sent("b") / sent("d"),
        "topk_loss_ratio": loss("d") / loss("b"),
        "attack_loss_ratio": loss("e") / loss("c"),
        "compute_share": c.compute_share if c is not None and c.compute_share else math.nan,
        # the price of overlapping communication with compute (issue #7 asks to measure it)
        "overlap_loss_ratio": loss("h") / loss("c"),
    }
    met = {}
    for k, (op, bound) in TARGETS.items():
        v = out[k]
        met[k] = bool(math.isfinite(v) and (v <= bound if op == "<=" else v >= bound))
    out = {
        k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else None)
        for k, v in out.items()
    }
    out["targets_met"] = met
    g = results.get("g")
    if g is not None:
        out["hivemind_ok"] = g.ok
        out["hivemind_full_groups"] = g.extra.get("full_groups")
    return out


def plot(path: Path, results: dict[str, RunResult], budget: Budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in results.values():
        if not r.ok or not r.curve:
            continue
        if r.key == "a":
            ax.axhline(r.curve[-1][2], ls=":", color="grey", label=f"a: {r.label} (no network)")
            continue
        pts = [(b, lo) for _, b, lo in r.curve if b > 0]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = "--" if not r.bytes_measured else "-"
        ax.plot(
            xs,
            ys,
            style,
            marker="o",
            ms=3,
            label=f"{r.key}: {r.label}" + ("" if r.bytes_measured else " (est.)"),
        )
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per peer (cumulative)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(
        f"4 peers, {budget.tokens / 1e6:.2f}M training tokens, H = {budget.inner_steps}",
        fontsize=10,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def table(results: dict[str, RunResult]) -> Table:
    t = Table(title="swarm benchmark")
    for col in ("config", "val loss", "bytes/peer", "wall s", "compute share", "note"):
        t.add_column(col)
    for r in results.values():
        if not r.ok:
            t.add_row(r.key, "-", "-", "-", "-", f"FAILED: {(r.error or '')[:80]}")
            continue
        sent = "0" if not r.bytes_per_peer else f"{r.bytes_per_peer / 1e6:,.3f} MB"
        if not r.bytes_measured and r.bytes_per_peer:
            sent += " (est.)"
        share = "-" if r.compute_share is None else f"{r.compute_share:.2f}"
        t.add_row(
            r.key + ": " + r.label, f"{r.final_val_loss:.4f}", sent, f"{r.wall_s:.0f}", share, ""
        )
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and budget (~5 min)")
    parser.add_argument("--rounds", type=int, default=None, help="DiLoCo rounds R (budget)")
    parser.add_argument("--skip-hivemind", action="store_true", help="leave out (g)")
    parser.add_argument(
        "--install-hivemind", action="store_true",
        help="create the hivemind venv with scripts/hivemind-env.sh when missing",
    )  # fmt: skip
    parser.add_argument("--only", default="abcdefgh", help="configurations to run, e.g. 'bc'")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    budget = quick_budget(args.rounds or 3) if args.quick else full_budget(args.rounds or 6)
    only = set(args.only.replace(",", ""))
    if args.skip_hivemind:
        only.discard("g")
    env_start = environment()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = prepared_data(RESULTS_DIR, int(budget.model["vocab_size"]))
    n_params = param_count(budget)
    # per-configuration bound: generous, so a slow (contended) machine finishes, but finite
    timeout = 900.0 if args.quick else 6 * 3600.0
    work = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    results: dict[str, RunResult] = {}
    d_swarm: dict[str, Any] = {"codec": "int8"}
    d_label = f"c + top-{budget.topk_fraction:.0%} scaled signs, error feedback"
    runs: list[tuple[str, str, Callable[[Progress], RunResult]]] = [
        ("a", "one process", lambda p: run_trainer(
            "a", "one process", budget, data, work, p, nproc=1, n_params=n_params,
            timeout=timeout)),
        ("b", "4 synchronous peers, float32", lambda p: run_swarm(
            "b", "4 synchronous peers, float32", budget, data, work, p, timeout=timeout,
            mode="synchronous", codec="none")),
        ("c", "4 DiLoCo peers, H=50, int8 + zstd", lambda p: run_swarm(
            "c", "4 DiLoCo peers, H=50, int8 + zstd", budget, data, work, p, timeout=timeout,
            **d_swarm)),
        ("d", d_label, lambda p: run_swarm(
            "d", d_label, budget, data, work, p, timeout=timeout, codec="topk_sign",
            codec_params={"fraction": budget.topk_fraction})),
        ("e", "c with one ALIE attacker", lambda p: run_swarm(
            "e", "c with one ALIE attacker", budget, data, work, p, timeout=timeout,
            attacker=ATTACKER, **d_swarm)),
        ("h", "c with overlap (updates applied one round late)", lambda p: run_swarm(
            "h", "c with overlap (updates applied one round late)", budget, data, work, p,
            timeout=timeout, overlap=True, **d_swarm)),
        ("f", "torchrun DDP, 4 processes", lambda p: run_trainer(
            "f", "torchrun DDP, 4 processes", budget, data, work, p, nproc=PEERS,
            n_params=n_params, timeout=timeout)),
        ("g", "hivemind 1.1.12 Optimizer, 4 peers", lambda p: run_hivemind(
            "g", "hivemind 1.1.12 Optimizer, 4 peers", budget, data, work, p,
            n_params=n_params, install=args.install_hivemind, timeout=timeout)),
    ]  # fmt: skip
    stderr_console.print(
        f"budget: {budget.tokens:,} training tokens, {n_params:,} parameters, "
        f"H = {budget.inner_steps}, R = {budget.rounds}; 4 peers share {os.cpu_count()} cores"
    )
    try:
        with make_progress() as progress:
            for key, _label, run in runs:
                if key in only:
                    results[key] = run(progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env_end = environment()
    head = headline(results)
    busy = contention(env_start, env_end)
    head["machine_contended"] = busy["contended"]
    payload = {
        "budget": {**asdict(budget), "steps": budget.steps, "tokens": budget.tokens,
                   "parameters": n_params, "peers": PEERS},
        "quick": args.quick,
        "results": {k: asdict(r) for k, r in results.items()},
        "headline": head,
        "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()},
        "environment_start": env_start,
        "environment_end": env_end,
        "contention": busy,
        "data": str(data),
    }  # fmt: skip
    write_json(args.out / f"{NAME}.json", payload)
    if any(r.ok for r in results.values()):
        plot(args.out / f"{NAME}.png", results, budget)
    stderr_console.print(table(results))
    for r in results.values():
        if r.error:
            stderr_console.print(f"[red]{r.key} failed:[/red] {r.error}")
    if busy["contended"]:
        stderr_console.print(
            f"[yellow]warning: load average reached {busy['max_load_1min']:.1f} on "
            f"{busy['cores']} cores; timings are contended[/yellow]"
        )
    emit_headline(head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
