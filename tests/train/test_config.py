from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmlm.config import ConfigError, load_config
from swarmlm.train.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny.json", "small.json", "moe.json"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(RunConfig, CONFIGS / name)
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_overrides_reach_nested_keys_with_typed_values(tmp_path: Path) -> None:
    cfg = load_config(
        RunConfig,
        CONFIGS / "tiny.json",
        ["train.max_steps=7", "optim.lr=1e-4", "model.n_kv_heads=1", "train.compile=true"],
    )
    assert cfg.train.max_steps == 7
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.n_kv_heads == 1
    assert cfg.train.compile is True


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_yaml_toml_and_json_give_the_same_config(tmp_path: Path, suffix: str) -> None:
    body = {"data": {"path": "x"}, "train": {"max_steps": 3}}
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        path.write_text("data:\n  path: x\ntrain:\n  max_steps: 3\n")
    elif suffix == ".toml":
        path.write_text('[data]\npath = "x"\n[train]\nmax_steps = 3\n')
    else:
        path.write_text(json.dumps(body))
    cfg = load_config(RunConfig, path)
    assert cfg.train.max_steps == 3
    assert str(cfg.data.path) == "x"


def test_unknown_keys_are_errors_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        load_config(RunConfig, CONFIGS / "tiny.json", ["train.max_stepz=3"])


def test_invalid_values_are_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(RunConfig, CONFIGS / "tiny.json", ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"model"):
        load_config(RunConfig, CONFIGS / "tiny.json", ["model.n_kv_heads=3"])


def test_unreadable_config_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        load_config(RunConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, CONFIGS / "tiny.json", ["train.max_steps"])
