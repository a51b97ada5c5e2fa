"""One hivemind 1.1.12 peer for ``benchmarks/swarm.py`` (configuration g).

Runs in the hivemind virtualenv (``scripts/hivemind-env.sh``), never in swarmlm's: swarmlm is
imported from ``src/`` through PYTHONPATH for the model, the loader and the schedule, so this
peer trains exactly what a swarmlm DiLoCo peer trains:

* the same ``Transformer`` initialised from ``train.seed`` (identical on every peer);
* ``BatchLoader`` on data shard ``index`` of ``peers`` (as swarm peer ``index`` reads it);
* swarmlm's AdamW (``build_adamw``), gradient clipping at ``train.grad_clip``, and the LR
  schedule over ``inner_steps x rounds`` local steps.

``hivemind.Optimizer`` with ``use_local_updates=True``: every local step applies AdamW at
once; when the swarm together has processed ``target_batch_size = peers x batch x H``
samples (one DiLoCo round's worth), the peers average their parameters and optimizer state
(int8 ``Uniform8BitQuantization``), i.e. local SGD with an outer learning rate of 1.
Matchmaking failures are whatever hivemind does on this machine: reported, not retried.

Stdout: one JSON object per line (ready, eval, averaged, done); hivemind's log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.compression import Uniform8BitQuantization

from swarmlm.data import BatchLoader, TokenShards, eval_batches
from swarmlm.model import Transformer
from swarmlm.train.config import RunConfig
from swarmlm.train.optim import build_adamw
from swarmlm.train.schedule import LRSchedule
from swarmlm.train.trainer import seed_everything


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), flush=True)


class AveragingLog(logging.Handler):
    """hivemind reports each state-averaging outcome only in its log: turn it into events."""

    OK = re.compile(r"Averaged parameters with (\d+) peers")
    FAILED = re.compile(r"Averaging failed|Discarding failed matchmaking|did not finish")

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.step = 0
        self.ok = 0
        self.failed = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if m := self.OK.search(msg):
            self.ok += 1
            emit("averaged", step=self.step, group_size=int(m.group(1)))
        elif self.FAILED.search(msg):
            self.failed += 1
            emit("averaging_failed", step=self.step, message=msg[:200])


@torch.no_grad()
def evaluate(model: Transformer, val: TokenShards, cfg: RunConfig) -> float:
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(eval_batches(val, cfg.data.batch_size, cfg.data.seq_len)):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        out = model(x, targets=y)
        assert out.lm_loss is not None
        n = int((y != -100).sum())
        total += float(out.lm_loss) * n
        count += n
    model.train()
    return total / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="run config JSON (swarm.py's)")
    p.add_argument("--index", type=int, required=True, help="this peer's data shard")
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--inner-steps", type=int, required=True, help="H: steps per averaging")
    p.add_argument("--initial-peer", action="append", default=[], help="a multiaddr to join")
    p.add_argument("--run-id", default="swarmlm-bench")
    args = p.parse_args()

    cfg = RunConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
    torch.set_num_threads(cfg.train.threads or 1)
    seed_everything(cfg.train.seed)
    model = Transformer(cfg.model)
    steps = cfg.train.max_steps  # H x R local steps, as a swarm peer's inner schedule
    schedule = LRSchedule(cfg.schedule, cfg.optim.lr, steps)
    loader = BatchLoader(
        TokenShards.open(cfg.data.path, split="train"),
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        seed=cfg.train.seed,
        rank=args.index,
        world_size=args.peers,
        prefetch=cfg.data.prefetch,
    )
    val = TokenShards.open(cfg.data.path, split="val")

    watcher = AveragingLog()
    for name in ("hivemind.optim.state_averager", "hivemind.averaging.averager"):
        lg = logging.getLogger(name)
        lg.addHandler(watcher)
        lg.setLevel(logging.INFO)

    # 127.0.0.1 only; NAT traversal and relays off (KNOWN.md)
    dht = hivemind.DHT(
        start=True,
        initial_peers=args.initial_peer or None,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        use_relay=False,
        use_auto_relay=False,
        auto_nat=False,
        nat_port_map=False,
    )
    emit("ready", maddrs=[str(a) for a in dht.get_visible_maddrs()])
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=args.run_id,
        params=decay_groups(model, cfg),
        optimizer=lambda groups: torch.optim.AdamW(
            groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
        ),
        batch_size_per_step=cfg.data.batch_size,
        target_batch_size=args.peers * cfg.data.batch_size * args.inner_steps,
        use_local_updates=True,
        delay_state_averaging=False,
        matchmaking_time=5.0,
        averaging_timeout=60.0,
        state_averaging_compression=Uniform8BitQuantization(),
        verbose=True,
    )
    emit("eval", step=0, epoch=opt.local_epoch, val_loss=evaluate(model, val, cfg))
    clip = cfg.train.grad_clip
    compute_s = eval_s = 0.0
    t_loop = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            watcher.step = step
            t0 = time.perf_counter()
            x, y = next(loader)
            out = model(x, targets=y)
            assert out.loss is not None
            out.loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
            for group in opt.param_groups:
                group["lr"] = schedule.lr(step - 1)
            compute_s += time.perf_counter() - t0
            opt.step()  # local AdamW step; averaging when the swarm reached the target batch
            opt.zero_grad()
            if step % args.inner_steps == 0 or step == steps:
                t0 = time.perf_counter()
                loss = evaluate(model, val, cfg)
                eval_s += time.perf_counter() - t0
                emit("eval", step=step, epoch=opt.local_epoch, val_loss=loss)
        loop_s = time.perf_counter() - t_loop
        emit(
            "done",
            step=steps,
            epoch=opt.local_epoch,
            val_loss=evaluate(model, val, cfg),
            compute_s=round(compute_s, 3),
            eval_s=round(eval_s, 3),
            loop_s=round(loop_s, 3),
            averagings=watcher.ok,
            averaging_failures=watcher.failed,
        )
    finally:
        loader.close()
        opt.shutdown()
        dht.shutdown()
    return 0


def decay_groups(model: Transformer, cfg: RunConfig) -> list[dict[str, Any]]:
    """swarmlm's AdamW parameter groups (weight decay on matrices only), as hivemind wants
    them: it builds the optimizer itself from the groups it is given."""
    reference = build_adamw(model, cfg.optim)
    return [
        {"params": list(g["params"]), "weight_decay": g["weight_decay"]}
        for g in reference.param_groups
    ]


if __name__ == "__main__":
    sys.exit(main())
