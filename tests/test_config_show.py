"""``swarmlm config show`` as a user types it: the effective configuration, one key a line,
with where each value came from; bad input is one line naming the key, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWARMLM = Path(sys.executable).with_name("swarmlm")


def _swarmlm(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [str(SWARMLM)] if SWARMLM.exists() else [sys.executable, "-m", "swarmlm.cli"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SWARMLM_")}
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _table(stdout: str) -> dict[str, tuple[str, str]]:
    """key -> (value, source) from the printed table (values never contain two spaces)."""
    rows = {}
    for line in stdout.splitlines()[2:]:
        key, rest = line.split(None, 1)
        value, source = rest.split("  ", 1)
        rows[key] = (value.strip(), source.strip())
    return rows


def _node_files(folder: Path) -> Path:
    shutil.copy(REPO / "configs" / "swarm-tiny.json", folder / "swarm-tiny.json")
    path = folder / "node.yaml"
    path.write_text(
        "node_id: n1\n"
        "p2p_port: 7100\n"
        "training:\n"
        "  config: swarm-tiny.json\n"
        "  set: ['swarm.checkpoint_every=2']\n"
        "run:\n"
        "  swarm:\n"
        "    rounds: 12\n"
    )
    return path


def test_config_show_prints_each_node_and_run_key_with_its_source(tmp_path: Path) -> None:
    _node_files(tmp_path)
    result = _swarmlm(
        "config",
        "show",
        "--config",
        "node.yaml",
        "--set",
        "web_port=9100",
        cwd=tmp_path,
        env={"SWARMLM_NODE__LOG_LEVEL": "DEBUG"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# effective node configuration (node.yaml)")
    rows = _table(result.stdout)
    assert rows["node_id"] == ('"n1"', "node.yaml")
    assert rows["web_port"] == ("9100", "--set web_port=9100")
    assert rows["log_level"] == ('"DEBUG"', "env SWARMLM_NODE__LOG_LEVEL")
    assert rows["max_memory_mb"] == ("null", "default")
    # the run config the node trains with, composed and labelled layer by layer
    assert rows["run.swarm.rounds"] == ("12", "node.yaml")
    assert rows["run.swarm.checkpoint_every"] == (
        "2",
        "training.set swarm.checkpoint_every=2 <- node.yaml",
    )
    assert rows["run.model.d_model"][1] == "swarm-tiny.json"  # beside node.yaml
    assert rows["run.p2p.port"] == ("7100", "node p2p_port <- node.yaml")
    assert rows["run.swarm.exclude_below"][1] == "node thresholds.exclude_below <- default"


def test_config_show_json_lists_every_key_once(tmp_path: Path) -> None:
    _node_files(tmp_path)
    result = _swarmlm("config", "show", "--config", "node.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kind"] == "node"
    keys = [row["key"] for row in doc["values"]]
    assert len(keys) == len(set(keys))
    by_key = {row["key"]: row for row in doc["values"]}
    assert by_key["run.swarm.rounds"] == {
        "key": "run.swarm.rounds",
        "value": 12,
        "source": "node.yaml",
    }
    assert "run" not in by_key  # shown composed, key by key


def test_config_show_of_a_run_config_uses_the_train_environment_prefix(tmp_path: Path) -> None:
    shutil.copy(REPO / "configs" / "tiny.json", tmp_path / "tiny.json")
    result = _swarmlm(
        "config",
        "show",
        "--config",
        "tiny.json",
        cwd=tmp_path,
        env={"SWARMLM_TRAIN__TRAIN__MAX_STEPS": "7"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# effective train configuration (tiny.json)")
    rows = _table(result.stdout)
    assert rows["train.max_steps"] == ("7", "env SWARMLM_TRAIN__TRAIN__MAX_STEPS")
    assert rows["model.d_model"][1] == "tiny.json"
    assert rows["train.compile"][1] == "default"


def test_an_unknown_key_is_one_line_naming_it_and_the_nearest_valid_key(tmp_path: Path) -> None:
    _node_files(tmp_path)
    result = _swarmlm(
        "config",
        "show",
        "--config",
        "node.yaml",
        "--set",
        "rate_limits.submit_burts=9",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "rate_limits.submit_burts: unknown key (did you mean rate_limits.submit_burst?) "
        "[set by --set rate_limits.submit_burts=9]"
    ) in result.stderr
    assert result.stderr.count("\n") == 1


def test_an_unknown_run_key_names_the_file_that_set_it(tmp_path: Path) -> None:
    path = _node_files(tmp_path)
    path.write_text(path.read_text() + "  optim:\n    weight_decey: 0.1\n")
    result = _swarmlm("config", "show", "--config", "node.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        "run.optim.weight_decey: unknown key (did you mean run.optim.weight_decay?) "
        "[set by node.yaml]"
    ) in result.stderr


def test_a_node_config_without_a_name_says_how_to_give_one(tmp_path: Path) -> None:
    result = _swarmlm("config", "show", cwd=tmp_path)
    assert result.returncode == 2
    assert "a node needs a name: pass --node-id or set node_id in --config" in result.stderr
    ok = _swarmlm("config", "show", "--node-id", "solo", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert _table(ok.stdout)["node_id"] == ('"solo"', "--node-id")


def test_config_show_takes_a_node_command_line_as_swarmlm_node_does(tmp_path: Path) -> None:
    _node_files(tmp_path)
    result = _swarmlm(
        "config",
        "show",
        "--config",
        "node.yaml",
        "--node-type",
        "lightweight",
        "--p2p-port",
        "7200",
        "--bootstrap",
        "127.0.0.1:7100",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert rows["type"] == ('"lightweight"', "--type")
    assert rows["p2p_port"] == ("7200", "--p2p-port")
    assert rows["bootstrap_peers"] == ('["127.0.0.1:7100"]', "--bootstrap")
    # a voter's run config: the parts it uses, with the node's network settings
    assert rows["run.p2p.port"] == ("7200", "node p2p_port <- --p2p-port")
    assert rows["run.p2p.keep_rounds"] == ("2", "node type lightweight")
    assert "run.model.d_model" not in rows
    wrong = _swarmlm(
        "config", "show", "--kind", "train", "--config", "node.yaml", "--host", "h", cwd=tmp_path
    )
    assert wrong.returncode == 2
    assert "apply to a node config, not --kind train" in wrong.stderr
