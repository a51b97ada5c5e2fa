"""Shared helpers for swarmlm benchmarks: interleaved A/B timing, medians, JSON and PNG output.

Why interleave: speed on this machine drifts by about 15 % between runs even when idle, and
other jobs (test suites, other benchmarks) share the two cores. Timing contender A for a minute
and then B for a minute measures the drift as much as the code. Instead every contender runs
one *block* (a few steps) in turn, the order reverses every round (A B C, C B A, ...), and we
quote the median of the per-block throughputs. Ratios of medians from one interleaved run are
robust to slow drift; absolute numbers are only indicative.

Conventions every benchmark follows (see benchmarks/README.md):

* results go under ``benchmarks/results/`` (git-ignored): ``<name>.json`` and, where a plot
  helps, ``<name>.png``;
* progress bars and tables go to stderr, so the LAST stdout line is one JSON object with the
  headline keys (:func:`emit_headline`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from swarmlm.atomic import atomic_path, atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where benchmarks write their JSON and PNG files (git-ignored)."""

stderr_console = Console(stderr=True)
"""Progress bars and human-readable tables go here, keeping stdout for the headline JSON."""

T = TypeVar("T")

BlockRunner = Callable[[], float]
"""Runs one timed block and returns its throughput (units per second, higher is better)."""


@dataclass
class Samples:
    """Per-block throughputs of one contender, in ``unit`` per second."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median of the blocks; NaN when no block ran (callers must not divide by it)."""
        return statistics.median(self.values) if self.values else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: median, min, max, block count and the raw block values."""
        return {
            "unit": self.unit,
            "median": self.median,
            "min": min(self.values) if self.values else math.nan,
            "max": max(self.values) if self.values else math.nan,
            "blocks": len(self.values),
            "values": self.values,
        }


def make_progress() -> Progress:
    """A rich progress bar on stderr (start it with ``with make_progress() as progress:``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console,
    )


def alternating_orders(items: Sequence[T], rounds: int) -> list[list[T]]:
    """The running order of each round: forward, reversed, forward, ... so no contender
    always runs first (after a cold cache) or last. Used by :func:`interleave`, and by
    benchmarks whose contenders are whole processes (one per layout) and cannot share one."""
    return [list(items) if i % 2 == 0 else list(items)[::-1] for i in range(rounds)]


def median_or_none(values: Sequence[float]) -> float | None:
    """Median of ``values``; None when there are none (JSON null, never a division by NaN)."""
    return statistics.median(values) if values else None


def interleave(
    runners: Mapping[str, BlockRunner],
    *,
    blocks: int,
    unit: str,
    progress: Progress | None = None,
    description: str = "timing",
) -> dict[str, Samples]:
    """Time ``blocks`` rounds of every runner, alternating contenders and reversing the order
    every round so no contender always runs first (after a cold cache) or last.

    Each runner must do its own warm-up before being passed here: every block counts. Returns
    one :class:`Samples` per runner name, in the mapping's order.
    """
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if not runners:
        raise ValueError("interleave needs at least one runner")
    names = list(runners)
    samples = {name: Samples(name, unit) for name in names}
    task = None
    if progress is not None:
        task = progress.add_task(description, total=blocks * len(names))
    for order in alternating_orders(names, blocks):
        for name in order:
            samples[name].values.append(runners[name]())
            if progress is not None and task is not None:
                progress.advance(task)
    return samples


def ratio(numerator: Samples, denominator: Samples) -> float:
    """Ratio of medians (higher = numerator faster for throughputs)."""
    return numerator.median / denominator.median


def environment() -> dict[str, Any]:
    """What a reader needs to judge absolute numbers: versions, cores, load average."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = list(os.getloadavg())
    return info


def contention(*envs: Mapping[str, Any]) -> dict[str, Any]:
    """Was the CPU shared during the run? ``envs`` are :func:`environment` snapshots (start,
    end). ``contended`` is True when the 1-minute load average exceeded the core count: other
    processes then compete for the cores, multi-threaded small ops (batch-1 decoding above
    all) slow down far more than large matmuls, and even interleaved ratios become unreliable.
    """
    loads = [float(e["load_average_1_5_15min"][0]) for e in envs if "load_average_1_5_15min" in e]
    cores = os.cpu_count() or 1
    peak = max(loads) if loads else math.nan
    return {"max_load_1min": peak, "cores": cores, "contended": bool(loads) and peak > cores}


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON atomically (:mod:`swarmlm.atomic`), so a reader
    never sees a half-written result file."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=_json_default)
    atomic_write_text(path, text + "\n")


def _json_default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def bar_chart(
    path: Path,
    groups: Mapping[str, Sequence[Samples]],
    *,
    title: str,
    ylabel: str,
) -> None:
    """Grouped bar chart of medians with min-max whiskers, one panel per group (each group
    has its own unit and scale, e.g. training vs decoding tokens/s). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    for ax, (group, series) in zip(axes[0], groups.items(), strict=True):
        labels = [s.name for s in series]
        medians = [s.median for s in series]
        lows = [s.median - min(s.values) for s in series]
        highs = [max(s.values) - s.median for s in series]
        colours = ["tab:blue" if name.startswith("swarmlm") else "tab:orange" for name in labels]
        ax.bar(range(len(series)), medians, yerr=[lows, highs], capsize=4, color=colours)
        ax.set_xticks(range(len(series)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(group, fontsize=10)
        ax.set_ylabel(ylabel)
        for i, m in enumerate(medians):
            ax.text(i, m, f"{m:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure atomically (:mod:`swarmlm.atomic`) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            # the temporary name ends in .tmp: say the format the target's suffix names
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def emit_headline(payload: Mapping[str, Any]) -> None:
    """Print the headline JSON object as the last line of stdout (call it last)."""
    print(json.dumps(payload, default=_json_default), flush=True)
