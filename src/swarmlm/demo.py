"""`swarmlm demo`: a short, real run on the bundled corpus until the trainer (issue #3) lands.

It trains a small byte-level model on the King James Bible for a fixed time budget with plain
AdamW, then samples from it, so a new user sees the model learn on a fresh clone in about a
minute. It is deliberately minimal: no checkpoints, no schedule, no validation split.
"""

from __future__ import annotations

import gzip
import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from swarmlm.model import ModelConfig, Transformer
from swarmlm.model.generate import generate

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "data" / "kjv.txt.gz"


def load_bytes(path: Path) -> torch.Tensor:
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if not raw:
        raise ValueError(f"corpus is empty: {path}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def run_demo(
    corpus: Path = DEFAULT_CORPUS,
    *,
    seconds: float = 60.0,
    batch_size: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    console: Console | None = None,
) -> float:
    """Train for ``seconds`` and print samples; returns the last training loss (nats/byte)."""
    console = console or Console()
    torch.manual_seed(seed)
    data = load_bytes(corpus)
    cfg = ModelConfig(
        vocab_size=256, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=seq_len
    )
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    console.print(
        f"[bold]demo[/bold]: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{data.numel() / 1e6:.1f}M bytes of {corpus.name}, {seconds:.0f} s budget"
    )
    start = time.perf_counter()
    step, loss_value, tokens = 0, float("nan"), 0
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=seconds, status="")
        while (elapsed := time.perf_counter() - start) < seconds:
            starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,))
            window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
            out = model(window[:, :-1], targets=window[:, 1:])
            assert out.loss is not None
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            tokens += batch_size * seq_len
            loss_value = float(out.loss)
            rate = tokens / max(elapsed, 1e-9)
            progress.update(
                task,
                completed=min(elapsed, seconds),
                status=f"step {step}  loss {loss_value:.3f}  {rate:,.0f} tok/s",
            )
    model.eval()
    for prompt in ("In the beginning", "And the LORD said"):
        out_gen = generate(
            model,
            [list(prompt.encode())],
            max_new_tokens=120,
            do_sample=True,
            temperature=0.8,
            top_k=40,
            seed=seed,
        )
        text = bytes(out_gen.sequences[0]).decode("utf-8", errors="replace")
        console.print(f"[cyan]{prompt}[/cyan]{text}")
    return loss_value
