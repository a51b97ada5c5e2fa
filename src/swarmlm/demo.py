"""``swarmlm demo``: a few-minute end-to-end tour on the bundled corpus.

The original design's training system had ``--demo``. This one runs the README's quick tour
for real, printing each command before running it, so what a user sees is what they can
type next: tokenize the bundled King James Bible, train the tiny model, evaluate it,
generate from it, then say where to go next (a node, a local swarm, the p2p prompt).

Everything is written under ``--dir`` (default ``runs/demo``). ``--quick`` trains a smaller
model on an excerpt of the corpus in well under a minute (tests and a first look);
the default (200 steps of the tiny model, as the README's tour) takes about 2-3 minutes on
2 idle CPU cores (~9,000 tokens/s; a loaded machine is slower in proportion).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import time
from pathlib import Path
from typing import Any

from swarmlm.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data" / "kjv.txt.gz"
PROMPT = "In the beginning"
QUICK_EXCERPT_BYTES = 150_000


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="a few-minute end-to-end tour: data, train, eval, generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", type=Path, default=Path("runs/demo"), help="where everything goes")
    p.add_argument("--corpus", type=Path, default=CORPUS, help="text corpus (.txt or .txt.gz)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 200)")
    p.add_argument(
        "--quick", action="store_true", help="small model on an excerpt (under a minute)"
    )
    p.set_defaults(func=run_demo)
    return p


def _run(argv: list[str]) -> None:
    """Run one ``swarmlm`` command in this process, shown as the user would type it."""
    from swarmlm.cli import main

    print(f"\n$ swarmlm {shlex.join(argv)}", flush=True)
    t0 = time.monotonic()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`swarmlm {shlex.join(argv)}` exited {code}; the tour stops here")
    print(f"({time.monotonic() - t0:.1f} s)", flush=True)


def _excerpt(corpus: Path, out: Path, limit: int) -> Path:
    opener = gzip.open if corpus.suffix == ".gz" else open
    with opener(corpus, "rt", encoding="utf-8") as fh:
        text = fh.read(limit)
    atomic_write_text(out, text[: text.rfind("\n") + 1] or text)
    return out


def run_demo(args: argparse.Namespace) -> int:
    from swarmlm.cli import UsageError

    corpus: Path = args.corpus
    if not corpus.exists():
        raise UsageError(f"--corpus {corpus}: no such file (give the text to train on)")
    steps = args.steps if args.steps is not None else (30 if args.quick else 200)
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    data, run = out / "data", out / "run"
    print(f"swarmlm demo: {steps} training steps, everything under {out}", flush=True)

    print("\n1. tokenize the corpus (BPE tokenizer + checksummed token shards)")
    if (data / "meta.json").exists():
        print(f"   {data} is ready (delete it to tokenize again)")
        vocab = json.loads((data / "meta.json").read_text()).get("vocab_size", 2048)
    else:
        source = corpus
        vocab = 2048
        if args.quick:
            source = _excerpt(corpus, out / "excerpt.txt", QUICK_EXCERPT_BYTES)
            vocab = 512
        _run(["data", "prepare", "--input", str(source), "--out", str(data),
              "--vocab-size", str(vocab)])  # fmt: skip

    print("\n2. train a small transformer (AdamW, cosine schedule, checkpoints)")
    config = out / "train.json"
    model = {"vocab_size": int(vocab), "d_model": 256, "n_layers": 4, "n_heads": 4,
             "n_kv_heads": 2, "d_ff": 688, "max_seq_len": 256}  # fmt: skip
    batch = {"batch_size": 16, "seq_len": 256}
    if args.quick:
        model.update(d_model=64, n_layers=2, d_ff=172, max_seq_len=128)
        batch = {"batch_size": 8, "seq_len": 128}
    run_config = {
        "model": model,
        "data": {"path": str(data), **batch},
        "optim": {"lr": 0.003, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"kind": "cosine", "warmup_steps": min(50, steps // 5), "min_lr_ratio": 0.1},
        "train": {
            "max_steps": steps,
            "eval_every": steps,
            "eval_batches": 10,
            "log_every": max(1, steps // 10),
            "checkpoint_every": steps,
            "out_dir": str(run),
        },
    }
    atomic_write_text(config, json.dumps(run_config, indent=2) + "\n")
    print(f"   config: {config}")
    _run(["train", "--config", str(config), "--resume"])

    print("\n3. evaluate the checkpoint on the held-out split")
    _run(["eval", "--checkpoint", str(run)])

    print("\n4. generate (greedy; --top-p 0.9 samples, --logprobs shows probabilities)")
    _run(["generate", "--checkpoint", str(run), "--prompt", PROMPT, "--max-new-tokens", "40"])

    print(
        "\nDone. Next:\n"
        f"  swarmlm export-hf --checkpoint {run} --out {out / 'hf'}   # a Hugging Face model\n"
        "  swarmlm config init                 # a commented node config\n"
        "  make run                            # a full node: swarm training + web UI\n"
        "  make run NODES=4                    # a local swarm of four nodes\n"
        "  swarmlm p2p --port 7000             # a peer with a p2p> prompt (see README)",
        flush=True,
    )
    return 0
