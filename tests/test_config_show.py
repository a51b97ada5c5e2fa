"""``swarmlm config show`` as a user types it: the effective configuration, one key a line,
with where each value came from; bad input is one line naming the key, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarmlm.config_cli import effective_rows
from swarmlm.swarm.objective_registry import objective_names, objective_spec

REPO = Path(__file__).resolve().parents[1]
SWARMLM = Path(sys.executable).with_name("swarmlm")


def _show(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``swarmlm config show ARGS`` in ``cwd``, with no SWARMLM_ variable but ``env``'s."""
    command = [str(SWARMLM)] if SWARMLM.exists() else [sys.executable, "-m", "swarmlm.cli"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SWARMLM_")}
    return subprocess.run(
        [*command, "config", "show", *args],
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _table(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """key -> (value, source) from the printed table (values never contain two spaces)."""
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines()[2:]:
        key, rest = line.split(None, 1)
        value, source = rest.split("  ", 1)
        rows[key] = (value.strip(), source.strip())
    return rows


def _rows(*args: str, cwd: Path) -> dict[str, tuple[str, str]]:
    """The table ``swarmlm config show ARGS`` prints in ``cwd``."""
    return _table(_show(*args, cwd=cwd))


def _refused(*args: str, cwd: Path) -> str:
    """The one-line error of a refused ``config show`` (exit 2, no traceback)."""
    result = _show(*args, cwd=cwd)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    return result.stderr


def _node_files(folder: Path, run: str = "  swarm:\n    rounds: 12\n") -> Path:
    shutil.copy(REPO / "configs" / "swarm-tiny.json", folder / "swarm-tiny.json")
    path = folder / "node.yaml"
    path.write_text(
        "node_id: n1\n"
        "p2p_port: 7100\n"
        "training:\n"
        "  config: swarm-tiny.json\n"
        "  set: ['swarm.checkpoint_every=2']\n"
        "run:\n" + run
    )
    return path


def test_config_show_prints_each_node_and_run_key_with_its_source(tmp_path: Path) -> None:
    _node_files(tmp_path)
    env = {"SWARMLM_NODE__LOG_LEVEL": "DEBUG"}
    result = _show("--config", "node.yaml", "--set", "web_port=9100", cwd=tmp_path, env=env)
    assert result.stdout.startswith("# effective node configuration (node.yaml)")
    rows = _table(result)
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
    result = _show("--config", "node.yaml", "--json", cwd=tmp_path)
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
    result = _show(
        "--config", "tiny.json", cwd=tmp_path, env={"SWARMLM_TRAIN__TRAIN__MAX_STEPS": "7"}
    )
    assert result.stdout.startswith("# effective train configuration (tiny.json)")
    rows = _table(result)
    assert rows["train.max_steps"] == ("7", "env SWARMLM_TRAIN__TRAIN__MAX_STEPS")
    assert rows["model.d_model"][1] == "tiny.json"
    assert rows["train.compile"][1] == "default"


def test_an_objective_section_is_shown_key_by_key_with_its_sources(tmp_path: Path) -> None:
    shutil.copy(REPO / "configs" / "swarm-dpo.json", tmp_path / "swarm-dpo.json")
    rows = _rows("--config", "swarm-dpo.json", "--set", "swarm.dpo.beta=0.2", cwd=tmp_path)
    assert rows["swarm.objective"] == ('"dpo"', "swarm-dpo.json")
    assert rows["swarm.dpo.beta"] == ("0.2", "--set swarm.dpo.beta=0.2")
    assert rows["swarm.dpo.preferences"] == ('"runs/prefs.jsonl"', "swarm-dpo.json")
    assert rows["swarm.dpo.label_smoothing"] == ("0.0", "default")
    assert rows["swarm.dpo.safety.enabled"] == ("true", "default")  # nested sections too
    assert "swarm.dpo" not in rows
    # a node training the objective shows it under run., with the same sources
    dpo = "  swarm:\n    objective: dpo\n    dpo: {preferences: p.jsonl, init_checkpoint: ck}\n"
    _node_files(tmp_path, run=dpo)
    node = _rows("--config", "node.yaml", "--set", "run.swarm.dpo.beta=0.3", cwd=tmp_path)
    assert node["run.swarm.dpo.preferences"] == ('"p.jsonl"', "node.yaml")
    assert node["run.swarm.dpo.beta"] == ("0.3", "--set run.swarm.dpo.beta=0.3")
    assert node["run.swarm.dpo.max_len"][1] == "default"


# what each objective's section needs besides its required fields (its own cross-checks)
_SECTION_EXTRAS = {"reward": {"preferences": "prefs.jsonl"}}


@pytest.mark.parametrize(
    "objective", [n for n in objective_names() if objective_spec(n).section is not None]
)
def test_every_registered_objective_section_has_a_row_per_field(
    objective: str, tmp_path: Path
) -> None:
    spec = objective_spec(objective)
    assert spec is not None
    assert spec.section is not None
    section = {
        name: f"x/{name}" for name, info in spec.section.model_fields.items() if info.is_required()
    }
    section.update(_SECTION_EXTRAS.get(objective, {}))
    config = json.loads((REPO / "configs" / "swarm-tiny.json").read_text())
    config["swarm"].update(objective=objective, **{objective: section})
    (tmp_path / "swarm.json").write_text(json.dumps(config))
    rows = effective_rows("swarm", tmp_path / "swarm.json", [])
    prefix = f"swarm.{objective}."
    shown = {key.removeprefix(prefix).split(".")[0] for key, _, _ in rows if key.startswith(prefix)}
    assert shown == set(spec.section.model_fields)
    sources = {key.removeprefix(prefix): src for key, _, src in rows if key.startswith(prefix)}
    for name in section:
        assert sources[name] == str(tmp_path / "swarm.json")


def test_an_unknown_key_is_one_line_naming_it_and_the_nearest_valid_key(tmp_path: Path) -> None:
    _node_files(tmp_path)
    stderr = _refused("--config", "node.yaml", "--set", "rate_limits.submit_burts=9", cwd=tmp_path)
    assert (
        "rate_limits.submit_burts: unknown key (did you mean rate_limits.submit_burst?) "
        "[set by --set rate_limits.submit_burts=9]"
    ) in stderr
    assert stderr.count("\n") == 1


def test_an_unknown_run_key_names_the_file_that_set_it(tmp_path: Path) -> None:
    path = _node_files(tmp_path)
    path.write_text(path.read_text() + "  optim:\n    weight_decey: 0.1\n")
    assert (
        "run.optim.weight_decey: unknown key (did you mean run.optim.weight_decay?) "
        "[set by node.yaml]"
    ) in _refused("--config", "node.yaml", cwd=tmp_path)


def test_a_node_config_without_a_name_says_how_to_give_one(tmp_path: Path) -> None:
    stderr = _refused(cwd=tmp_path)
    assert "a node needs a name: pass --node-id or set node_id in --config" in stderr
    assert _rows("--node-id", "solo", cwd=tmp_path)["node_id"] == ('"solo"', "--node-id")


def test_config_show_takes_a_node_command_line_as_swarmlm_node_does(tmp_path: Path) -> None:
    _node_files(tmp_path)
    rows = _rows(
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
    assert rows["type"] == ('"lightweight"', "--type")
    assert rows["p2p_port"] == ("7200", "--p2p-port")
    assert rows["bootstrap_peers"] == ('["127.0.0.1:7100"]', "--bootstrap")
    # a voter's run config: the parts it uses, with the node's network settings
    assert rows["run.p2p.port"] == ("7200", "node p2p_port <- --p2p-port")
    assert rows["run.p2p.keep_rounds"] == ("2", "node type lightweight")
    assert "run.model.d_model" not in rows
    wrong = _refused("--kind", "train", "--config", "node.yaml", "--host", "h", cwd=tmp_path)
    assert "apply to a node config, not --kind train" in wrong
