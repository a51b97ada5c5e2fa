"""The node config: reading JSON/YAML/TOML, what each node type runs, refused combinations,
and the hot-reload subset (what a running node applies, what it refuses and why)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from swarmlm.node.config import (
    HOT_FIELDS,
    ConfigError,
    NodeConfig,
    load_node_config,
    read_config_file,
    reload_changes,
    validate_config,
)

REPO = Path(__file__).resolve().parents[2]
SWARM_TINY = REPO / "configs" / "swarm-tiny.json"

SAME_CONFIG = {
    ".json": json.dumps(
        {
            "node_id": "alpha-1",
            "type": "training",
            "p2p_port": 7001,
            "bootstrap_peers": ["127.0.0.1:7002"],
            "rate_limits": {"login_per_minute": 3},
        }
    ),
    ".yaml": (
        "node_id: alpha-1\ntype: training\np2p_port: 7001\n"
        "bootstrap_peers: ['127.0.0.1:7002']\nrate_limits:\n  login_per_minute: 3\n"
    ),
    ".toml": (
        'node_id = "alpha-1"\ntype = "training"\np2p_port = 7001\n'
        'bootstrap_peers = ["127.0.0.1:7002"]\n[rate_limits]\nlogin_per_minute = 3\n'
    ),
}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def cfg(**fields: Any) -> NodeConfig:
    return validate_config({"node_id": "n1", **fields})


# -- reading files ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_json_yaml_and_toml_files_give_the_same_config(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"node{suffix}", SAME_CONFIG[suffix])
    got = validate_config(read_config_file(path), str(path))
    assert got.node_id == "alpha-1"
    assert got.type == "training"
    assert got.p2p_port == 7001
    assert got.bootstrap_addresses() == [("127.0.0.1", 7002)]
    assert got.rate_limits.login_per_minute == 3
    assert got.rate_limits.register_per_minute == 5  # untouched fields keep their defaults


def test_yml_suffix_and_upper_case_suffix_read_as_yaml(tmp_path: Path) -> None:
    assert read_config_file(write(tmp_path / "a.yml", "node_id: a\n")) == {"node_id": "a"}
    assert read_config_file(write(tmp_path / "b.YAML", "node_id: b\n")) == {"node_id": "b"}


def test_unknown_file_format_is_refused_naming_the_suffix(tmp_path: Path) -> None:
    path = write(tmp_path / "node.ini", "[node]\nnode_id = a\n")
    with pytest.raises(ConfigError, match=r"unknown config format '\.ini'") as err:
        read_config_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.yaml", "node_id: [unclosed\n"),
        ("bad.toml", "node_id = \n"),
        ("bad.json", '{"node_id": '),
    ],
)
def test_unparsable_file_is_refused_naming_the_file(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError, match="cannot parse") as err:
        read_config_file(path)
    assert str(path) in str(err.value)


def test_missing_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere\.yaml"):
        read_config_file(tmp_path / "nowhere.yaml")


def test_top_level_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_config_file(write(tmp_path / "list.yaml", "- node_id: a\n"))


def test_empty_yaml_file_reads_as_no_settings(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.yaml", "")
    assert read_config_file(path) == {}
    with pytest.raises(ConfigError, match="node_id"):
        validate_config(read_config_file(path), str(path))


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "-leading-dash", "has space", "a/b", "x" * 65, "é"])
def test_bad_node_id_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match="node_id") as err:
        validate_config({"node_id": bad}, "node.yaml")
    assert "node.yaml" in str(err.value)


def test_good_node_ids_are_accepted() -> None:
    for good in ["a", "node-1", "Node_2.local", "x" * 64]:
        assert cfg(node_id=good).node_id == good


@pytest.mark.parametrize("bad", ["nohost", "127.0.0.1:", "127.0.0.1:http", "host:0", "h:70000"])
def test_bad_bootstrap_address_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(ConfigError, match="bootstrap_peers") as err:
        cfg(bootstrap_peers=["127.0.0.1:7000", bad])
    assert repr(bad) in str(err.value)


def test_bootstrap_given_as_comma_separated_string_becomes_a_list() -> None:
    got = cfg(bootstrap_peers="127.0.0.1:7000, 10.0.0.2:7001,,")
    assert got.bootstrap_peers == ["127.0.0.1:7000", "10.0.0.2:7001"]
    assert got.bootstrap_addresses() == [("127.0.0.1", 7000), ("10.0.0.2", 7001)]


def test_unknown_field_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="enable_curatoin"):
        cfg(enable_curatoin=True)
    with pytest.raises(ConfigError, match=r"rate_limits\.login_per_hour"):
        cfg(rate_limits={"login_per_hour": 3})


def test_out_of_range_values_are_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="p2p_port"):
        cfg(p2p_port=70000)
    with pytest.raises(ConfigError, match="max_memory_mb"):
        cfg(max_memory_mb=10)
    with pytest.raises(ConfigError, match=r"thresholds\.exclude_below"):
        cfg(thresholds={"exclude_below": 1.5})
    with pytest.raises(ConfigError, match="type"):
        cfg(type="supernode")


def test_aggregator_params_must_not_set_f() -> None:
    with pytest.raises(ConfigError, match="must not set 'f'"):
        cfg(training={"aggregator_params": {"f": 2}})


# -- what runs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("node_type", "expected"),
    [
        ("full", {"training": True, "curation": True, "web": True, "rlhf": True}),
        ("training", {"training": True, "curation": False, "web": False, "rlhf": True}),
        ("annotation", {"training": False, "curation": True, "web": True, "rlhf": False}),
        ("lightweight", {"training": False, "curation": False, "web": False, "rlhf": False}),
    ],
)
def test_each_node_type_runs_its_components_by_default(
    node_type: str, expected: dict[str, bool]
) -> None:
    c = cfg(type=node_type)
    assert {k: c.runs(k) for k in expected} == expected  # type: ignore[arg-type]


def test_explicit_enable_flags_override_the_type_defaults() -> None:
    c = cfg(type="full", enable_rlhf=False, enable_web_interface=False)
    assert not c.runs("rlhf")
    assert not c.runs("web")
    assert c.runs("training")
    assert c.runs("curation")
    assert cfg(type="training", enable_curation=True).runs("curation")


def test_web_interface_without_curation_is_refused() -> None:
    with pytest.raises(ConfigError, match="enable_web_interface needs enable_curation"):
        cfg(type="full", enable_curation=False)
    with pytest.raises(ConfigError, match="enable_web_interface needs enable_curation"):
        cfg(type="training", enable_web_interface=True)


@pytest.mark.parametrize("flag", ["enable_training", "enable_rlhf"])
def test_lightweight_node_with_training_compute_is_refused(flag: str) -> None:
    with pytest.raises(ConfigError, match="lightweight node runs no training compute"):
        cfg(type="lightweight", **{flag: True})


def test_node_directory_defaults_under_runs_nodes(tmp_path: Path) -> None:
    assert cfg().directory == Path("runs/nodes/n1")
    assert cfg(node_dir=str(tmp_path)).directory == tmp_path


def test_command_line_values_win_over_the_file_and_none_means_not_given(tmp_path: Path) -> None:
    path = write(tmp_path / "n.yaml", "node_id: from-file\np2p_port: 7001\nweb_port: 8001\n")
    got = load_node_config(path, node_id="from-cli", p2p_port=None, web_port=0)
    assert (got.node_id, got.p2p_port, got.web_port) == ("from-cli", 7001, 0)
    with pytest.raises(ConfigError, match="command line"):
        load_node_config(None, node_id="bad id")


# -- hot reload -----------------------------------------------------------------------------
def test_reload_applies_every_hot_field_and_keeps_fields_absent_from_the_file() -> None:
    running = cfg(type="annotation", web_port=0, max_cpu_threads=2)
    new = reload_changes(
        running,
        {
            "log_level": "DEBUG",
            "rate_limits": {"login_per_minute": 1, "submit_per_second": 2.5},
            "thresholds": {"exclude_below": 0.4, "evict_below": 0.1},
            "bootstrap_peers": ["127.0.0.1:7100"],
        },
        "node.yaml",
    )
    assert new.log_level == "DEBUG"
    assert new.rate_limits.login_per_minute == 1
    assert new.rate_limits.submit_per_second == 2.5
    assert new.thresholds.exclude_below == 0.4
    assert new.thresholds.evict_below == 0.1
    assert new.bootstrap_peers == ["127.0.0.1:7100"]
    # absent from the edited file: the running values stay, not the defaults
    assert (new.type, new.web_port, new.max_cpu_threads) == ("annotation", 0, 2)
    assert running.log_level == "INFO"  # the running config object is untouched


def test_hot_fields_are_exactly_the_documented_safe_subset() -> None:
    assert {"log_level", "rate_limits", "thresholds", "bootstrap_peers", "training"} == HOT_FIELDS


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"p2p_port": 9999}, "p2p_port"),
        ({"web_port": 9998}, "web_port"),
        ({"type": "training"}, "type"),
        ({"enable_rlhf": False}, "enable_rlhf"),
        ({"db_url": "sqlite:///elsewhere.db"}, "db_url"),
        ({"max_cpu_threads": 1}, "max_cpu_threads"),
    ],
)
def test_reload_refuses_a_restart_only_field_naming_it(edit: dict[str, Any], field: str) -> None:
    running = cfg(type="full", web_port=0)
    with pytest.raises(ConfigError, match=f"{field} cannot change while the node runs"):
        reload_changes(running, {"log_level": "DEBUG", **edit}, "node.yaml")


def test_reload_refuses_a_restart_only_training_subfield_naming_it() -> None:
    running = cfg(type="training")
    with pytest.raises(ConfigError, match=r"training\.config cannot change"):
        reload_changes(running, {"training": {"config": "configs/other.json"}}, "n.yaml")
    with pytest.raises(ConfigError, match=r"training\.set cannot change"):
        reload_changes(running, {"training": {"set": ["swarm.rounds=3"]}}, "n.yaml")


def test_reload_refuses_an_invalid_value_naming_file_and_field() -> None:
    running = cfg()
    with pytest.raises(ConfigError, match=r"node\.yaml: invalid node config\n.*log_level"):
        reload_changes(running, {"log_level": "LOUD"}, "node.yaml")
    with pytest.raises(ConfigError, match="bootstrap_peers"):
        reload_changes(running, {"bootstrap_peers": ["no-port"]}, "node.yaml")


def swarm_config_file(tmp_path: Path, aggregator: str = "centered_clip") -> Path:
    raw = json.loads(SWARM_TINY.read_text(encoding="utf-8"))
    raw["swarm"]["aggregator"] = aggregator
    return write(tmp_path / "swarm.json", json.dumps(raw))


def test_reload_applies_aggregator_params_the_aggregator_accepts(tmp_path: Path) -> None:
    running = cfg(type="training", training={"config": str(swarm_config_file(tmp_path))})
    new = reload_changes(
        running,
        {"training": {"config": str(tmp_path / "swarm.json"), "aggregator_params": {"tau": 2.0}}},
        "n.yaml",
    )
    assert new.training.aggregator_params == {"tau": 2.0}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"bogus": 1}, "no parameter"),
        ({"tau": "wide"}, ""),
        ({"tau": -1.0}, "tau"),
        ({"iterations": 0}, "iterations"),
    ],
)
def test_reload_refuses_aggregator_params_the_aggregator_rejects(
    tmp_path: Path, params: dict[str, Any], reason: str
) -> None:
    path = swarm_config_file(tmp_path)
    running = cfg(type="training", training={"config": str(path)})
    edit = {"training": {"config": str(path), "aggregator_params": params}}
    with pytest.raises(ConfigError, match=r"training\.aggregator_params for 'centered_clip'") as e:
        reload_changes(running, edit, "x")
    assert reason in str(e.value)
