"""The config loader: one strict base, errors that name the key (and the nearest valid one),
and a record of where each value came from (default, file, environment, --set)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from swarmlm.config import (
    DEFAULT,
    ConfigError,
    RateLimits,
    Sources,
    StrictModel,
    effective_values,
    env_overrides,
    load_config,
    nearest_key,
)


class Inner(StrictModel):
    rate: float = 1.0
    params: dict[str, int] = Field(default_factory=dict)


class Outer(StrictModel):
    name: str = "x"
    steps: int = Field(default=10, ge=1)
    inner: Inner = Field(default_factory=Inner)
    maybe: Inner | None = None


def test_every_config_model_shares_the_one_strict_base() -> None:
    from swarmlm.model.config import ModelConfig
    from swarmlm.node.config import NodeConfig, Thresholds
    from swarmlm.p2p.config import P2PConfig
    from swarmlm.rlhf.config import DPORunConfig, PPOConfig, SampleConfig
    from swarmlm.rlhf.safety import SafetyConfig
    from swarmlm.train.config import DataConfig, RunConfig
    from swarmlm.web.settings import WebSettings

    models = [ModelConfig, NodeConfig, Thresholds, P2PConfig, DPORunConfig, PPOConfig]
    models += [SampleConfig, SafetyConfig, DataConfig, RunConfig, WebSettings, RateLimits]
    for model in models:
        assert issubclass(model, StrictModel), model.__name__
        assert model.model_config.get("extra") == "forbid", model.__name__
    # the frozen and validate-on-assignment models keep their own settings on top
    assert ModelConfig.model_config.get("frozen") is True
    assert P2PConfig.model_config.get("validate_assignment") is True


def test_request_bodies_manifests_and_schemas_share_the_one_strict_base_too() -> None:
    from swarmlm.curation.schema import SingleChoiceSchema
    from swarmlm.curation.task_set_settings import TaskSetSettings
    from swarmlm.data.shards import CorpusMeta, ShardInfo
    from swarmlm.web.api import SubmitIn, TaskSetIn
    from swarmlm.web.data_manager import BulkIn
    from swarmlm.web.review import ReviewIn

    models = [SubmitIn, TaskSetIn, BulkIn, ReviewIn, CorpusMeta, ShardInfo, SingleChoiceSchema]
    for model in [*models, TaskSetSettings]:
        assert issubclass(model, StrictModel), model.__name__
        assert model.model_config.get("extra") == "forbid", model.__name__
    assert ShardInfo.model_config.get("frozen") is True
    # refusing unknown keys is declared in one place: a model that needs it derives from
    # StrictModel (there were four private copies, `_Strict`)
    src = Path(StrictModel.__module__.replace(".", "/") + ".py")
    package = Path(__file__).resolve().parents[1] / "src" / "swarmlm"
    declared = sorted(
        str(path.relative_to(package.parent))
        for path in package.rglob("*.py")
        if re.search(r"""extra\s*=\s*["']forbid""", path.read_text(encoding="utf-8"))
    )
    assert declared == [str(src)], "derive from swarmlm.config.StrictModel instead"


def test_the_web_app_and_a_node_config_share_one_rate_limits_model() -> None:
    from swarmlm.node.config import NodeConfig
    from swarmlm.web.settings import WebSettings

    assert NodeConfig.model_fields["rate_limits"].annotation is RateLimits
    limits = RateLimits(submit_burst=80)
    settings = WebSettings(node_dir=Path("n"), **limits.model_dump())
    assert settings.submit_burst == 80
    assert settings.login_per_minute == RateLimits().login_per_minute


def test_each_value_says_whether_it_came_from_the_default_the_file_or_set(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"name": "from-file", "inner": {"rate": 2.0}}))
    sources = Sources()
    cfg = load_config(Outer, path, ["inner.params={a: 1}"], sources=sources)
    rows = {k: (v, src) for k, v, src in effective_values(cfg, sources)}
    assert rows["name"] == ("from-file", str(path))
    assert rows["inner.rate"] == (2.0, str(path))
    assert rows["inner.params"] == ({"a": 1}, "--set inner.params={a: 1}")
    assert rows["steps"] == (10, DEFAULT)
    assert rows["maybe"] == (None, DEFAULT)


def test_environment_variables_override_the_file_and_set_overrides_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\ninner:\n  rate: 4.0\n")
    monkeypatch.setenv("SWARMLM_T__STEPS", "5")
    monkeypatch.setenv("SWARMLM_T__INNER__RATE", "6.5")
    sources = Sources()
    cfg = load_config(Outer, path, ["steps=9"], env_prefix="SWARMLM_T__", sources=sources)
    assert (cfg.steps, cfg.inner.rate) == (9, 6.5)
    assert sources.source_of("steps") == "--set steps=9"
    assert sources.source_of("inner.rate") == "env SWARMLM_T__INNER__RATE"


def test_a_later_layer_replacing_a_section_forgets_the_sources_below_it() -> None:
    sources = Sources()
    sources.record(["inner"], {"rate": 1.0, "params": {"a": 1}}, "file.yaml")
    assert sources.source_of("inner.params.a") == "file.yaml"
    sources.record(["inner"], {"rate": 2.0}, "--set inner={rate: 2.0}")
    assert "inner.params.a" not in sources
    assert sources.source_of("inner.params") == DEFAULT  # the new section did not set it
    sources.record(["inner", "rate"], 3.0, "env X", replace=True)
    assert sources.source_of("inner.rate") == "env X"
    assert Sources().source_of("anything") == DEFAULT


def test_an_unknown_key_is_named_with_the_nearest_valid_key_and_where_it_was_set(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("inner:\n  rat: 2.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path, ["stesp=3"])
    text = str(info.value)
    assert f"{path}: invalid configuration" in text
    assert f"inner.rat: unknown key (did you mean inner.rate?) [set by {path}]" in text
    assert "stesp: unknown key (did you mean steps?) [set by --set stesp=3]" in text


def test_an_unknown_key_with_nothing_close_lists_the_valid_keys_of_its_section() -> None:
    with pytest.raises(
        ConfigError, match=r"maybe\.zzz: unknown key \(valid keys here: rate, params\)"
    ):
        load_config(Outer, None, ["maybe.zzz=1"])
    assert nearest_key("rounds", ["round_timeout", "rounds_", "mode"]) == "rounds_"
    assert nearest_key("qqqq", ["rate"]) is None


def test_a_bad_value_names_the_key_the_rule_and_its_source() -> None:
    with pytest.raises(
        ConfigError,
        match=r"steps: Input should be greater than or equal to 1 "
        r"\[set by --set steps=0\]",
    ):
        load_config(Outer, None, ["steps=0"])


def test_a_malformed_environment_variable_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="SWARMLM_T__INNER____RATE: expected SWARMLM_T__KEY"):
        env_overrides("SWARMLM_T__", {"SWARMLM_T__INNER____RATE": "1"})
    found = env_overrides("SWARMLM_T__", {"SWARMLM_T__STEPS": "7", "OTHER": "1"})
    assert found == [(["steps"], 7, "SWARMLM_T__STEPS")]


def test_nested_models_are_walked_and_free_form_mappings_are_one_value() -> None:
    class M(BaseModel):
        a: Inner = Field(default_factory=Inner)

    rows = effective_values(M())
    assert [k for k, _, _ in rows] == ["a.rate", "a.params"]
    assert all(src == DEFAULT for _, _, src in rows)


def test_the_docs_name_every_node_key_and_the_environment_prefixes_the_code_uses() -> None:
    from swarmlm.node.cli import ENV_PREFIX as NODE_ENV
    from swarmlm.node.config import NodeConfig
    from swarmlm.train.config import ENV_PREFIX as TRAIN_ENV

    docs = Path(__file__).resolve().parents[1] / "docs"
    node_md = (docs / "node.md").read_text()
    missing = [name for name in NodeConfig.model_fields if f"`{name}" not in node_md]
    assert missing == [], f"docs/node.md's config table lacks {missing}"
    configuration_md = (docs / "configuration.md").read_text()
    assert NODE_ENV in configuration_md
    assert TRAIN_ENV in configuration_md


def test_a_swarm_config_error_names_the_nearest_valid_key(tmp_path: Path) -> None:
    from swarmlm.swarm.config import load_swarm_config
    from swarmlm.swarm.errors import SwarmError

    path = Path(__file__).resolve().parents[1] / "configs" / "swarm-tiny.json"
    with pytest.raises(SwarmError) as info:
        load_swarm_config(path, ["p2p.max_frme=8192", "optim.lr=0"])
    text = str(info.value)
    assert f"{path}: invalid swarm config" in text
    assert "p2p.max_frme: unknown key (did you mean p2p.max_frame?)" in text
    assert "optim.lr: Input should be greater than 0" in text
