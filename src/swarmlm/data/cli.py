"""``swarmlm data prepare|generate|verify``: the CLI face of ``prepare_corpus`` and ``TokenShards``.

Wire into the main CLI with ``add_data_parser(subparsers)``; the handler is stored as the
``handler`` default and returns the exit code (0 ok, 2 bad input or corrupt data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from swarmlm.data.codecs import CODECS
from swarmlm.data.errors import DataError
from swarmlm.data.generate import GenerateReport, generate_corpus
from swarmlm.data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VOCAB_SIZE, prepare_corpus
from swarmlm.data.shards import CorpusMeta, TokenShards, compress_corpus

__all__ = ["add_data_parser", "run_data"]

_PHASES = {"tokenizer": "training tokenizer", "tokenize": "tokenizing"}


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``swarmlm data`` with its ``prepare`` and ``verify`` subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "data", help="prepare and check tokenized training data"
    )
    sub = parser.add_subparsers(dest="data_command", required=True)

    prep = sub.add_parser(
        "prepare",
        help="tokenize text files into checksummed train/val token shards",
        description=(
            "Read .txt/.md/.jsonl files or directories (optionally .gz/.zst), drop duplicate "
            "documents, train or load a byte-level BPE tokenizer and write token shards, "
            "tokenizer.json and meta.json to --out."
        ),
    )
    prep.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH")
    prep.add_argument("--out", required=True, type=Path, metavar="DIR")
    tok = prep.add_mutually_exclusive_group()
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="N",
        help=f"train a tokenizer of N tokens (default {DEFAULT_VOCAB_SIZE})",
    )
    tok.add_argument("--tokenizer", type=Path, default=None, metavar="FILE", help="tokenizer.json")
    prep.add_argument("--val-fraction", type=float, default=0.01, metavar="F")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--minhash", action="store_true", help="also drop near-duplicate documents")
    prep.add_argument("--minhash-threshold", type=float, default=0.8, metavar="J")
    prep.add_argument(
        "--format",
        choices=("text", "sft"),
        default="text",
        help="sft: one 'prompt|target' example per line, loss on target tokens only",
    )
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N")
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    prep.set_defaults(handler=run_data)

    gen = sub.add_parser(
        "generate",
        help="build a mixed, deduplicated corpus of the 8 content types (offline)",
        description=(
            "Draw records of the 8 content types (technical, scientific, code, mathematics, "
            "philosophy, creative, conversational, multilingual) from built-in offline sources "
            "or --source folders, drop exact and near duplicates, check every generated "
            "problem's answer, and write token shards plus mixture.json and records.jsonl.zst "
            "(type, difficulty, source and licence of every record) to --out."
        ),
    )
    gen.add_argument("--out", required=True, type=Path, metavar="DIR")
    gen.add_argument("--size-mb", type=float, default=8.0, metavar="MB", help="MB of text")
    gen.add_argument(
        "--shares",
        default=None,
        metavar="TYPE=F,...",
        help="fractions of tokens per type, summing to 1 (default: the original design's)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="TYPE=PATH",
        help="user data for a type (folder, .jsonl, or HF dataset dir); replaces its built-ins",
    )
    gen.add_argument(
        "--licence", action="append", default=[], metavar="TYPE=SPDX", help="licence of --source"
    )
    gtok = gen.add_mutually_exclusive_group()
    gtok.add_argument("--vocab-size", type=int, default=None, metavar="N")
    gtok.add_argument("--tokenizer", type=Path, default=None, metavar="FILE")
    gen.add_argument("--val-fraction", type=float, default=0.02, metavar="F")
    gen.add_argument("--near-dup-threshold", type=float, default=0.8, metavar="J")
    gen.add_argument("--no-near-dup", action="store_true", help="exact deduplication only")
    gen.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N")
    gen.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    gen.set_defaults(handler=run_data)

    comp = sub.add_parser(
        "compress",
        help="rewrite a data directory's token shards as chunked, checksummed compressed files",
    )
    comp.add_argument("dir", type=Path, metavar="DIR")
    comp.add_argument(
        "--codec",
        default="auto",
        choices=("auto", *CODECS),
        help="auto: measured per shard (ratio and speed)",
    )
    comp.set_defaults(handler=run_data)

    verify = sub.add_parser("verify", help="check every shard's checksum and print the summary")
    verify.add_argument("dir", type=Path, metavar="DIR")
    verify.set_defaults(handler=run_data)
    return parser


def run_data(args: argparse.Namespace) -> int:
    """Handler of ``swarmlm data ...``."""
    console = Console(stderr=True)
    try:
        if args.data_command == "generate":
            report = _generate(args, console)
            Console().print(_generate_summary(report, args.out))
            return 0
        if args.data_command == "compress":
            chosen = compress_corpus(args.dir, args.codec)
            for shard, codec in chosen.items():
                console.print(f"{escape(shard)}: {codec}")
            out, meta = args.dir, CorpusMeta.read(args.dir)
            for name in ("train", "val"):
                if meta.splits[name].tokens:
                    TokenShards.open(out, name)
            Console().print(_summary(meta, out))
            return 0
        if args.data_command == "prepare":
            meta = _prepare(args, console)
            out = args.out
        else:
            out = args.dir
            meta = CorpusMeta.read(out)
            for split in ("train", "val"):
                if meta.splits[split].tokens:
                    TokenShards.open(out, split)  # verifies sizes and sha256
            console.print(f"[green]{escape(str(out))}: all shards verified[/green]", soft_wrap=True)
    except DataError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        return 2
    Console().print(_summary(meta, out))
    return 0


def _prepare(args: argparse.Namespace, console: Console) -> CorpusMeta:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    tasks: dict[str, TaskID] = {}
    start = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as bar:

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(_PHASES.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done)

        meta = prepare_corpus(
            args.input,
            args.out,
            vocab_size=args.vocab_size,
            tokenizer_path=args.tokenizer,
            val_fraction=args.val_fraction,
            seed=args.seed,
            minhash=args.minhash,
            minhash_threshold=args.minhash_threshold,
            fmt=args.format,
            shard_tokens=args.shard_tokens,
            overwrite=args.overwrite,
            progress=progress,
        )
    elapsed = time.perf_counter() - start
    raw = sum(s.bytes for s in meta.splits.values())
    rate = raw / 1e6 / max(elapsed, 1e-9)
    console.print(f"prepared in {elapsed:.1f} s ({rate:.2f} MB/s of text)")
    return meta


def _pairs(items: list[str], what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise DataError(f"{what} {item!r}: expected TYPE=VALUE")
        key, value = item.split("=", 1)
        out.setdefault(key.strip(), []).append(value)
    return out


def _generate(args: argparse.Namespace, console: Console) -> GenerateReport:
    sources = {k: [Path(v) for v in vs] for k, vs in _pairs(args.source, "--source").items()}
    licences = {k: vs[-1] for k, vs in _pairs(args.licence, "--licence").items()}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        report = generate_corpus(
            args.out,
            size_mb=args.size_mb,
            shares=args.shares,
            seed=args.seed,
            sources=sources,
            licences=licences,
            vocab_size=args.vocab_size,
            tokenizer_path=args.tokenizer,
            val_fraction=args.val_fraction,
            near_dup_threshold=None if args.no_near_dup else args.near_dup_threshold,
            shard_tokens=args.shard_tokens,
            overwrite=args.overwrite,
            progress=progress,
        )
    console.print(
        f"generated in {report.seconds:.1f} s ({report.mb_per_s:.2f} MB/s of text); "
        f"{report.problems_passed}/{report.problems_checked} problem answers verified"
    )
    return report


def _generate_summary(report: GenerateReport, out: Path) -> Table:
    table = Table(title=f"{out}: {report.total_tokens:,} tokens, {report.text_bytes:,} bytes")
    for col in ("type", "share", "realised", "tokens", "records", "exact dup", "near dup"):
        table.add_column(col, justify="right")
    for t, share in report.shares.items():
        table.add_row(
            t,
            f"{share:.3f}",
            f"{report.realised_shares[t]:.3f}",
            f"{report.tokens_by_type[t]:,}",
            f"{report.records_by_type[t]:,}",
            str(report.exact_duplicates_by_type[t]),
            str(report.near_duplicates_by_type[t]),
        )
    skipped = ", ".join(f"{n} {why}" for why, n in report.skipped_files.items()) or "none"
    table.caption = f"max share error {report.share_max_abs_err:.4f}; skipped files: {skipped}" + (
        f"; limited by {report.limiting_type}" if report.limiting_type else ""
    )
    return table


def _summary(meta: CorpusMeta, out: Path) -> Table:
    table = Table(title=f"{out} ({meta.format}, {meta.dtype}, vocab {meta.vocab_size})")
    for col in ("split", "tokens", "loss tokens", "bytes", "documents", "shards"):
        table.add_column(col, justify="right")
    for name, s in meta.splits.items():
        table.add_row(
            name,
            f"{s.tokens:,}",
            f"{s.loss_tokens:,}",
            f"{s.bytes:,}",
            f"{s.documents:,}",
            str(len(s.shards)),
        )
    st = {
        k: meta.stats.get(k, 0)
        for k in (
            "files",
            "documents",
            "exact_duplicates_removed",
            "near_duplicates_removed",
            "empty_documents",
            "replaced_bytes",
        )
    }
    if "records" in meta.stats:  # a generated corpus (details in mixture.json)
        table.caption = f"{meta.stats['records']} records written by `swarmlm data generate`"
        return table
    table.caption = (
        f"{st['files']} files, {st['documents']} documents; removed "
        f"{st['exact_duplicates_removed']} exact and {st['near_duplicates_removed']} near "
        f"duplicates, {st['empty_documents']} empty; "
        f"{st['replaced_bytes']} non-UTF-8 bytes replaced"
    )
    return table
