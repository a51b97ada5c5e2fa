"""Swarm config files: shipped configs load, bad fields are named, overrides apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmlm.swarm.cli import main
from swarmlm.swarm.config import load_swarm_config
from swarmlm.swarm.errors import SwarmError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("swarm-*.json")), ids=lambda p: p.name)
def test_shipped_swarm_configs_load(path: Path) -> None:
    cfg = load_swarm_config(path)
    assert cfg.run_config().model == cfg.model


def test_overrides_reach_nested_fields() -> None:
    cfg = load_swarm_config(
        CONFIGS / "swarm-tiny.json", ["swarm.rounds=3", "swarm.mode=synchronous", "p2p.port=7001"]
    )
    assert (cfg.swarm.rounds, cfg.swarm.mode, cfg.p2p.port) == (3, "synchronous", 7001)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("swarm.codec=zip", "unknown codec 'zip'"),
        ('swarm.codec_params={"block_size": 0}', "block_size must be an int"),
        ('swarm.codec_params={"levels": 3}', "codec 'int8': bad parameters"),
        ("swarm.aggregator=vote", "swarm.aggregator 'vote' is unknown"),
        ("swarm.mode=gossip", "swarm.mode"),
        ("swarm.inner_steps=0", "swarm.inner_steps"),
        ('swarm.aggregator_params={"f": 1}', "use swarm.byzantine_f"),
        ("swarm.data_shard=99", "swarm.data_shard=99"),
        ("swarm.bogus=1", "swarm.bogus"),
        ("swarm.roundz=3", "swarm.roundz: unknown key (did you mean swarm.rounds?)"),
        ("swarm.objective=ppx", "swarm.objective 'ppx' is unknown; registered: dpo, grpo, lm"),
        ('swarm.grpo={"group_size": 4}', 'swarm.grpo is set but swarm.objective is "lm"'),
    ],
)
def test_bad_swarm_fields_are_named(override: str, named: str) -> None:
    with pytest.raises(SwarmError, match=r"swarm-tiny\.json") as err:
        load_swarm_config(CONFIGS / "swarm-tiny.json", [override])
    assert named in str(err.value)


def test_unreadable_or_non_json_config_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(SwarmError, match=r"bad\.json: cannot parse"):
        load_swarm_config(bad)
    with pytest.raises(SwarmError, match="swarm config: config file not found"):
        load_swarm_config(tmp_path / "missing.json")


def test_cli_reports_a_bad_config_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = json.loads((CONFIGS / "swarm-tiny.json").read_text())
    cfg["swarm"]["outer_lr"] = -1
    path = tmp_path / "neg.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    assert main(["--config", str(path), "--port", "0"]) == 2
    assert "swarm.outer_lr" in capsys.readouterr().out


def test_cli_reports_missing_data_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = json.loads((CONFIGS / "swarm-tiny.json").read_text())
    cfg["data"]["path"] = str(tmp_path / "nowhere")
    path = tmp_path / "nodata.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    code = main(["--config", str(path), "--port", "0", "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 1
    assert "nowhere" in out
    assert "Traceback" not in out


def test_cli_refuses_resume_without_a_persistent_identity(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--config", str(CONFIGS / "swarm-tiny.json"), "--resume"]) == 2
    assert "--resume needs --node-dir" in capsys.readouterr().out


def test_a_section_level_error_names_the_section_without_an_empty_key() -> None:
    import swarmlm.rlhf  # noqa: F401  (registers the reward objective)
    from swarmlm.swarm.config import SwarmConfig

    section = {"preferences": "a.jsonl", "curation_db": "x.db", "init_checkpoint": "c"}
    with pytest.raises(ValueError, match="exactly one of preferences") as err:
        SwarmConfig.model_validate({"objective": "reward", "reward": section})
    assert "swarm.reward: " in str(err.value)
    assert "swarm.reward.:" not in str(err.value)
