"""The first hour with a trained model, typed as a user types it (issue 22 items 1-7):
`swarmlm train|eval|generate|export-hf` as subprocesses of the installed `swarmlm` script, in a
fresh directory, on a tiny run trained once for the module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SWARMLM = str(Path(sys.executable).with_name("swarmlm"))
# A prompt that is rich markup and longer than a narrow terminal: both must pass untouched.
MARKUP_PROMPT = "And God said [/cyan] let there be [bold]light[/bold]: and there was light"


def swarmlm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SWARMLM, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "40"},  # a narrow terminal: nothing may rewrap
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *names: str) -> str:
    """A user error: the expected exit code, no traceback, one line that names the culprit."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if " error: " in ln]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the tiny model (trained in-process: a subprocess would only add start-up)."""
    from swarmlm.train import RunConfig
    from swarmlm.train.trainer import Trainer

    run = tmp_path_factory.mktemp("first-hour") / "run"
    cfg = RunConfig.model_validate(
        tiny_run_config(prepared_data, run, max_steps=12, checkpoint_every=12)
    )
    Trainer(cfg, show_progress=False).fit()
    return run


@pytest.fixture(scope="module")
def export_from_latest(run_dir: Path) -> Path:
    out = run_dir.parent / "hf-latest"
    done = swarmlm(
        "export-hf", "--checkpoint", str(run_dir / "checkpoints" / "latest"), "--out", str(out),
        cwd=run_dir.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sha256 verified" in done.stdout
    return out


def test_user_errors_print_one_line_naming_the_problem_and_exit_2_or_1(
    run_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"model": {"vocab_size": 512}, "train": {"max_stepz": 3}}))
    # usage errors (the command line is wrong): exit 2
    line = assert_one_line_error(
        swarmlm("train", "--config", str(bad), "--set", "train.max_steps=2", cwd=tmp_path),
        2,
        "train.max_stepz",
        "unknown key",
    )
    assert "--set" in line  # what to do
    assert_one_line_error(
        swarmlm("eval", "--checkpoint", "runs/nowhere", cwd=tmp_path), 2, "runs/nowhere"
    )
    # runtime error (the input exists but is not a checkpoint): exit 1
    not_a_checkpoint = run_dir.parent  # holds the run, is not one
    line = assert_one_line_error(
        swarmlm("generate", "--checkpoint", str(not_a_checkpoint), "--prompt", "x", cwd=tmp_path),
        1,
        str(not_a_checkpoint),
    )
    assert "checkpoints/latest" in line  # what to give instead
    # the traceback, for a bug report, only when asked for (anywhere on the line)
    debug = swarmlm("train", "--config", "missing.yaml", "--debug", cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr
    assert "missing.yaml" in debug.stderr.splitlines()[-1]


def test_export_hf_refuses_a_checkpoint_whose_weights_fail_the_manifest(
    run_dir: Path, tmp_path: Path
) -> None:
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    weights = broken / "checkpoints" / step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern inside a tensor: same size, wrong content
    weights.write_bytes(bytes(data))
    result = swarmlm("export-hf", "--checkpoint", str(broken), "--out", "hf", cwd=tmp_path)
    assert_one_line_error(result, 1, "model.safetensors", "sha256")
    assert not (tmp_path / "hf").exists()


def test_export_hf_takes_a_run_directory_or_the_latest_pointer_alike(
    run_dir: Path, export_from_latest: Path, tmp_path: Path
) -> None:
    done = swarmlm("export-hf", "--checkpoint", str(run_dir), "--out", "hf", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (export_from_latest / name).read_bytes()


def test_hf_export_loads_with_autotokenizer_and_pipeline_and_writes_what_swarmlm_writes(
    prepared_data: Path, run_dir: Path, export_from_latest: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    prompts = ["In the beginning", "And the LORD said unto Moses"]
    ours = swarmlm(
        "generate", "--checkpoint", str(run_dir), "--prompt", prompts[0], "--prompt", prompts[1],
        "--max-new-tokens", "16", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    results = json.loads(ours.stdout)["results"]

    from swarmlm.data import Tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(export_from_latest)
    swarm_tokenizer = Tokenizer.load(prepared_data / "tokenizer.json")
    config = json.loads((export_from_latest / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    assert tokenizer.eos_token == "<|eos|>"
    generator = transformers.pipeline(
        "text-generation",
        model=transformers.AutoModelForCausalLM.from_pretrained(export_from_latest),
        tokenizer=tokenizer,
    )
    for prompt, result in zip(prompts, results, strict=True):
        assert tokenizer(prompt)["input_ids"] == swarm_tokenizer.encode(prompt)  # no BOS added
        theirs = generator(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]
        assert theirs == result["text"], (theirs, result["text"])


def test_generate_prints_the_text_verbatim_and_beams_1_is_greedy(
    run_dir: Path, tmp_path: Path
) -> None:
    common = ["--checkpoint", str(run_dir), "--prompt", MARKUP_PROMPT, "--max-new-tokens", "12"]
    plain = swarmlm("generate", *common, "--beams", "1", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    as_json = swarmlm("generate", *common, "--json", "--logprobs", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["settings"]["mode"] == "greedy"
    (result,) = doc["results"]
    # the prompt comes back byte for byte (no markup eaten, no wrapping at 40 columns), then
    # exactly the continuation --json reports for greedy decoding
    assert plain.stdout == result["text"] + "\n"
    assert result["text"] == MARKUP_PROMPT + result["completion"]
    assert len(result["tokens"]) == len(result["token_ids"]) > 0
    assert all(t["logprob"] <= 0 for t in result["tokens"])


def test_generate_logprobs_for_beam_search(run_dir: Path, tmp_path: Path) -> None:
    done = swarmlm(
        "generate", "--checkpoint", str(run_dir), "--prompt", "In the beginning",
        "--beams", "3", "--length-penalty", "0", "--max-new-tokens", "8", "--logprobs",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = [ln.split("\t") for ln in done.stdout.splitlines() if ln[:1].isdigit()]
    assert 0 < len(table) <= 8
    assert [int(row[0]) for row in table] == list(range(len(table)))
    assert all(float(row[1]) <= 0 for row in table)
    total = next(ln for ln in done.stdout.splitlines() if ln.startswith("# sum"))
    assert abs(float(total.split()[2]) - sum(float(row[1]) for row in table)) < 1e-3


def test_generate_samples_only_when_asked_and_refuses_contradictions() -> None:
    import argparse

    from swarmlm.cli import UsageError
    from swarmlm.train.model_cli import add_model_parsers, decoding_choice

    parser = argparse.ArgumentParser()
    add_model_parsers(parser.add_subparsers(dest="command"))

    def choice(*flags: str) -> tuple[str, float]:
        args = parser.parse_args(["generate", "--checkpoint", "r", "--prompt", "p", *flags])
        picked = decoding_choice(args)
        return picked.mode, picked.temperature

    assert choice() == ("greedy", 1.0)
    assert choice("--beams", "1") == ("greedy", 1.0)
    assert choice("--beams", "4") == ("beam", 1.0)
    assert choice("--top-p", "0.9") == ("sample", 0.8)
    assert choice("--sample") == ("sample", 0.8)
    assert choice("--temperature", "1.3") == ("sample", 1.3)
    for contradiction in (["--greedy", "--top-k", "5"], ["--beams", "3", "--sample"]):
        with pytest.raises(UsageError, match="drop"):
            choice(*contradiction)


def test_load_model_accepts_str_and_path(run_dir: Path) -> None:
    from swarmlm.train.trainer import load_model

    by_str, _ = load_model(str(run_dir))
    by_path, _ = load_model(run_dir / "checkpoints" / "latest")
    for (name, a), (_, b) in zip(
        by_str.state_dict().items(), by_path.state_dict().items(), strict=True
    ):
        assert a.equal(b), name


def test_generate_runs_an_imported_weights_file_with_its_tokenizer(
    prepared_data: Path,
    run_dir: Path,
    export_from_latest: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """import-hf's single file has no run around it: generate takes it with --tokenizer and
    writes what it writes for the run (in-process: the subprocess path is covered above)."""
    from swarmlm.cli import main

    weights = tmp_path / "imported.safetensors"
    assert main(["import-hf", "--hf", str(export_from_latest), "--out", str(weights)]) == 0
    common = ["generate", "--prompt", "In the beginning", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main([*common, "--checkpoint", str(weights)]) == 2  # which tokenizer?
    assert "--tokenizer" in capsys.readouterr().err
    tokenizer = str(prepared_data / "tokenizer.json")
    assert main([*common, "--checkpoint", str(weights), "--tokenizer", tokenizer]) == 0
    from_weights = capsys.readouterr().out
    assert main([*common, "--checkpoint", str(run_dir)]) == 0
    assert capsys.readouterr().out == from_weights
