"""`swarmlm data prepare|verify` through the parser the lead wires into cli.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from swarmlm.data.cli import add_data_parser


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="swarmlm")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_prepare_then_verify_succeeds_and_prints_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i} of some text to tokenize\n" for i in range(1000)))
    out = tmp_path / "data"
    argv = ["data", "prepare", "--input", str(src), "--out", str(out), "--vocab-size", "300"]
    assert run([*argv, "--val-fraction", "0.05", "--minhash"]) == 0
    assert (out / "meta.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert "train" in capsys.readouterr().out
    assert run(["data", "verify", str(out)]) == 0
    assert "all shards verified" in capsys.readouterr().err


def test_bad_input_and_corruption_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": 1}\n')
    assert run(["data", "prepare", "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "x.jsonl:1" in capsys.readouterr().err
    src = tmp_path / "in.txt"
    src.write_text("hello there, general text\n" * 50)
    out = tmp_path / "d"
    assert (
        run(["data", "prepare", "--input", str(src), "--out", str(out), "--vocab-size", "280"]) == 0
    )
    shard = out / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x00")
    capsys.readouterr()
    assert run(["data", "verify", str(out)]) == 2
    assert "train_00000.bin" in capsys.readouterr().err


def test_vocab_size_and_tokenizer_are_mutually_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run(
            [
                "data",
                "prepare",
                "--input",
                "a.txt",
                "--out",
                "o",
                "--vocab-size",
                "300",
                "--tokenizer",
                "t.json",
            ]
        )
