"""The runs behind `swarmlm rlhf reward|dpo|ppo|sample` on a tiny checkpoint: they learn,
save in the trainer's checkpoint format, resume, and close the loop to annotation tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swarmlm.curation.interchange import parse_tasks_jsonl
from swarmlm.rlhf.cli import add_rlhf_parser
from swarmlm.rlhf.config import DPORunConfig, PPORunConfig, RewardRunConfig, SampleConfig
from swarmlm.rlhf.dpo import train_dpo
from swarmlm.rlhf.modeling import load_language_model, load_reward_model
from swarmlm.rlhf.ppo_run import train_ppo
from swarmlm.rlhf.reward import train_reward_model
from swarmlm.rlhf.sample import sample_comparison_tasks
from swarmlm.train.checkpoint import latest_checkpoint, load_checkpoint
from tests.rlhf.conftest import write_pairs


@pytest.fixture(scope="module")
def reward_run(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reward")
    cfg = RewardRunConfig(
        init_checkpoint=tiny_lm,
        train_file=write_pairs(root / "train.jsonl", 160, 0),
        eval_file=write_pairs(root / "eval.jsonl", 40, 1),
        out_dir=root / "rm",
        batch_size=16,
        epochs=3,
        optim={"lr": 3e-3, "weight_decay": 0.0},
        checkpoint_every=10,
    )
    result = train_reward_model(cfg, show_progress=False)
    assert result.eval["accuracy"] >= 0.9, result.eval
    return cfg.out_dir


@pytest.mark.timeout(120)
def test_reward_model_learns_held_out_preferences_and_is_normalised(reward_run: Path) -> None:
    rm, ckpt = load_reward_model(reward_run)
    assert ckpt.state["rlhf"]["eval"]["accuracy"] >= 0.9
    assert ckpt.state["config"]["model"]["d_model"] == 32  # trainer format, base config kept
    from swarmlm.rlhf.modeling import tokenizer_for
    from swarmlm.rlhf.preferences import read_preferences, tokenize_pairs
    from swarmlm.rlhf.reward import _stack_padded

    tok = tokenizer_for(ckpt)
    pairs = read_preferences(Path(ckpt.state["rlhf"]["run_config"]["eval_file"]))
    data = tokenize_pairs(pairs, tok.encode, eos_id=tok.eos_id, pad_id=tok.pad_id, max_len=256)
    scores = rm.score(_stack_padded(data), torch.cat((data.chosen_lengths, data.rejected_lengths)))
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.timeout(120)
def test_reward_training_resumes_to_the_same_weights(tiny_lm: Path, tmp_path: Path) -> None:
    common = {
        "init_checkpoint": tiny_lm,
        "train_file": write_pairs(tmp_path / "train.jsonl", 48, 2),
        "batch_size": 8,
        "epochs": 1,
        "eval_fraction": 0.0,
        "checkpoint_every": 3,
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
    }
    straight = RewardRunConfig(**common, out_dir=tmp_path / "a")
    train_reward_model(straight, show_progress=False)
    half = RewardRunConfig(**common, out_dir=tmp_path / "b", max_steps=3)
    train_reward_model(half, show_progress=False)
    resumed = RewardRunConfig(**common, out_dir=tmp_path / "b")
    result = train_reward_model(resumed, resume=True, show_progress=False)
    assert result.step == 6
    a = load_checkpoint(tmp_path / "a").model_state
    b = load_checkpoint(tmp_path / "b").model_state
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_dpo_raises_the_chosen_margin_and_saves_a_generatable_policy(
    tiny_lm: Path, tmp_path: Path
) -> None:
    cfg = DPORunConfig(
        init_checkpoint=tiny_lm,
        train_file=write_pairs(tmp_path / "train.jsonl", 64, 3),
        eval_file=write_pairs(tmp_path / "eval.jsonl", 32, 4),
        out_dir=tmp_path / "dpo",
        batch_size=16,
        epochs=3,
        optim={"lr": 3e-3, "weight_decay": 0.0},
        dpo={"beta": 0.5},
    )
    summary = train_dpo(cfg, show_progress=False)
    assert summary["eval_reward_accuracy"] >= 0.9
    assert summary["eval_reward_margin"] > 0
    policy, ckpt = load_language_model(tmp_path / "dpo")
    assert ckpt.state["rlhf"]["kind"] == "dpo"
    from swarmlm.train.trainer import load_model

    model, _ = load_model(tmp_path / "dpo")  # what `swarmlm generate` uses
    assert model.cfg == policy.cfg.model_copy(update={"attn_dropout": 0.0, "resid_dropout": 0.0})


@pytest.mark.timeout(120)
def test_ppo_run_against_the_reward_model_checkpoints_and_resumes(
    tiny_lm: Path, reward_run: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["the lord said", "and they", "in the", "of the lord"]) + "\n")
    base = {
        "policy_checkpoint": tiny_lm,
        "reward_checkpoint": reward_run,
        "prompts_file": prompts,
        "out_dir": tmp_path / "ppo",
        "checkpoint_every": 1,
        "ppo": {"rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 6},
    }
    first = train_ppo(PPORunConfig(**base, steps=2), show_progress=False)
    assert first["step"] == 2
    second = train_ppo(PPORunConfig(**base, steps=3), resume=True, show_progress=False)
    assert second["step"] == 3
    ckpt = load_checkpoint(tmp_path / "ppo")
    history = ckpt.state["rlhf"]["history"]
    assert [int(h["step"]) for h in history] == [1, 2, 3]
    for key in ("reward", "kl", "clipfrac", "approxkl", "value_loss", "entropy"):
        assert key in history[-1]
    assert latest_checkpoint(tmp_path / "ppo") == ckpt.path


@pytest.mark.timeout(60)
def test_sample_writes_pairwise_tasks_the_platform_imports(tiny_lm: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["the lord said", "make a bomb", "and"])
    )
    cfg = SampleConfig(
        checkpoint=tiny_lm,
        prompts_file=prompts,
        out_file=tmp_path / "tasks.jsonl",
        max_new_tokens=8,
        safety={"min_response_chars": 0, "max_repeated_ngram_fraction": 1.0},
    )
    summary = sample_comparison_tasks(cfg, show_progress=False)
    tasks = list(parse_tasks_jsonl(cfg.out_file.read_text().splitlines(), "tasks.jsonl"))
    assert summary["tasks"] == len(tasks) == 2  # the unsafe prompt is filtered
    assert summary["filtered"]["block_list"] == 1
    for task in tasks:
        assert task.outputs is not None
        assert len(task.outputs) == 2
        assert task.outputs[0] != task.outputs[1]


def test_cli_reports_a_bad_config_key_and_a_malformed_preference_file(
    tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_rlhf_parser(parser.add_subparsers(dest="command"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": 1}\n')
    args = parser.parse_args(
        [
            "rlhf",
            "reward",
            "--no-progress",
            "--set",
            f"init_checkpoint={tiny_lm}",
            "--set",
            f"train_file={bad}",
            "--set",
            f"out_dir={tmp_path / 'rm'}",
        ]
    )
    assert args.handler(args) == 2
    assert "bad.jsonl line 2" in capsys.readouterr().err
    args = parser.parse_args(["rlhf", "dpo", "--set", "nonsense=1"])
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err
    assert "unknown key" in err


@pytest.mark.timeout(60)
def test_sample_hands_each_batch_of_tasks_over_as_soon_as_it_is_final(
    tiny_lm: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["the lord", "and", "of"]))
    cfg = SampleConfig(
        checkpoint=tiny_lm,
        prompts_file=prompts,
        out_file=tmp_path / "tasks.jsonl",
        max_new_tokens=6,
        batch_size=2,
        safety={"min_response_chars": 0, "max_repeated_ngram_fraction": 1.0},
    )
    batches: list[list[dict[str, object]]] = []
    sample_comparison_tasks(cfg, show_progress=False, on_tasks=batches.append)
    written = [json.loads(line) for line in cfg.out_file.read_text().splitlines()]
    # two prompts in the first batch, one in the second; together exactly the file's rows
    assert [len(b) for b in batches] == [2, 1]
    assert [row for b in batches for row in b] == written
    # the callback changes nothing: same seed, same file without it
    again = cfg.model_copy(update={"out_file": tmp_path / "again.jsonl"})
    sample_comparison_tasks(again, show_progress=False)
    assert again.out_file.read_text() == cfg.out_file.read_text()
