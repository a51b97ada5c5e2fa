"""The node config contains the run config it trains with: the file ``training.config``
names, the node config's ``run`` section laid over it key by key, the older
``training.set``, then the node's own settings; each value remembers where it came from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarmlm.config import Sources
from swarmlm.node.config import (
    ConfigError,
    NodeConfig,
    node_run_config,
    read_config_file,
    validate_config,
)

REPO = Path(__file__).resolve().parents[2]


def _node(tmp_path: Path, **extra: Any) -> tuple[NodeConfig, Path]:
    shutil.copy(REPO / "configs" / "swarm-tiny.json", tmp_path / "swarm.json")
    raw: dict[str, Any] = {
        "node_id": "n1",
        "type": "training",
        "node_dir": str(tmp_path / "n1"),
        "training": {"config": str(tmp_path / "swarm.json")},
        **extra,
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(raw))
    sources = Sources()
    file_raw = read_config_file(path)
    for key, value in file_raw.items():
        sources.record([key], value, str(path))
    return validate_config(file_raw, str(path), sources), path


def test_the_run_section_is_laid_over_the_swarm_config_key_by_key(tmp_path: Path) -> None:
    cfg, path = _node(tmp_path, run={"swarm": {"rounds": 3}, "optim": {"lr": 0.01}})
    file = json.loads((tmp_path / "swarm.json").read_text())
    node_sources = Sources({"run": str(path)})
    run_sources = Sources()
    run: Any = node_run_config(cfg, cfg.directory, node_sources, run_sources)
    assert run.swarm.rounds == 3
    assert run.optim.lr == 0.01
    # the file's other keys of the same sections stay
    assert run.swarm.inner_steps == file["swarm"]["inner_steps"]
    assert run.optim.weight_decay == file["optim"]["weight_decay"]
    assert run_sources.source_of("swarm.rounds") == str(path)
    assert run_sources.source_of("swarm.inner_steps") == str(tmp_path / "swarm.json")
    # node_dir is not in node_sources: the node's key had its default
    assert run_sources.source_of("p2p.node_dir") == "node node_dir <- default"
    assert run.p2p.node_dir == cfg.directory / "identity"


def test_an_older_node_config_with_training_set_still_loads_and_set_wins_over_run(
    tmp_path: Path,
) -> None:
    cfg, _ = _node(
        tmp_path,
        run={"swarm": {"rounds": 3}},
        training={"config": str(tmp_path / "swarm.json"), "set": ["swarm.rounds=5"]},
    )
    run: Any = node_run_config(cfg, cfg.directory)
    assert run.swarm.rounds == 5


# configs/node.yaml as it was before the run section: swarm overrides as training.set
OLD_LAYOUT_NODE_YAML = """\
node_id: node-1
type: full
node_dir: runs/nodes/node-1
max_cpu_threads: 2
training:
  config: swarm-tiny.json
  set:
    - swarm.expect_peers=1
    - swarm.rounds=200
    - swarm.checkpoint_every=2
"""


def _as_before(cfg: NodeConfig) -> Any:
    """The run config as the node built it before composition: the swarm config file with
    training.set and the node's settings as --set style overrides."""
    from swarmlm.swarm.config import load_swarm_config

    d = cfg.directory
    old_sets = [
        *cfg.training.set,
        f"p2p.host={json.dumps(cfg.host)}",
        f"p2p.port={cfg.p2p_port}",
        f"p2p.advertise_host={json.dumps(cfg.advertise_host)}",
        "p2p.bootstrap=" + json.dumps(cfg.bootstrap_peers),
        "p2p.node_dir=" + json.dumps(str(d / "identity")),
        "train.out_dir=" + json.dumps(str(d / "train")),
        f"swarm.exclude_below={cfg.thresholds.exclude_below}",
        f"swarm.evict_below={json.dumps(cfg.thresholds.evict_below)}",
        f"swarm.outlier_z={cfg.thresholds.outlier_z}",
        f"train.threads={cfg.max_cpu_threads}",
    ]
    return load_swarm_config(cfg.training.config, old_sets)


def test_an_old_layout_node_config_composes_the_same_run_config_as_before_and_as_shipped(
    tmp_path: Path,
) -> None:
    """Backwards compatibility: a node config with training.set (the layout before the run
    section) gives the run config the node built before, and the shipped configs/node.yaml,
    now written with a run section, gives that same run config."""
    from swarmlm.node.cli import resolve_file_paths

    shutil.copy(REPO / "configs" / "swarm-tiny.json", tmp_path / "swarm-tiny.json")
    (tmp_path / "node.yaml").write_text(OLD_LAYOUT_NODE_YAML)
    old_raw = read_config_file(tmp_path / "node.yaml")
    resolve_file_paths(old_raw, tmp_path)
    old = validate_config(old_raw)
    before = _as_before(old)
    assert node_run_config(old, old.directory) == before

    shipped_raw = read_config_file(REPO / "configs" / "node.yaml")
    resolve_file_paths(shipped_raw, REPO / "configs")
    shipped = validate_config(shipped_raw)
    assert shipped.training.set == [], "configs/node.yaml uses the run section"
    assert shipped.run
    assert node_run_config(shipped, shipped.directory) == before


@pytest.mark.parametrize(
    ("key", "node_key"),
    [("p2p.port", "p2p_port"), ("train.out_dir", "node_dir"), ("swarm.outlier_z", "thresholds")],
)
def test_a_run_key_the_node_sets_itself_is_refused_naming_the_node_key(
    tmp_path: Path, key: str, node_key: str
) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"run\.{key} is set by the node from {node_key}"):
        _node(tmp_path, run={section: {name: 1}})


def test_an_unknown_run_key_is_named_with_the_nearest_valid_key_and_its_source(
    tmp_path: Path,
) -> None:
    cfg, path = _node(tmp_path, run={"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as info:
        node_run_config(cfg, cfg.directory, Sources({"run": str(path)}))
    text = str(info.value)
    assert "invalid swarm config" in text
    assert f"run.optim.lrr: unknown key (did you mean run.optim.lr?) [set by {path}]" in text


def test_a_node_that_trains_nothing_composes_its_run_config_without_torch(
    tmp_path: Path,
) -> None:
    shutil.copy(REPO / "configs" / "swarm-tiny.json", tmp_path / "swarm.json")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from swarmlm.node.config import validate_config, node_run_config\n"
        f"cfg = validate_config({{'node_id': 'v', 'type': 'lightweight', "
        f"'training': {{'config': {str(tmp_path / 'swarm.json')!r}}}, "
        "'run': {'swarm': {'rounds': 4}}})\n"
        "run = node_run_config(cfg, Path('v'))\n"
        "print(run.swarm.rounds, run.p2p.keep_rounds, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "2", "False"]


def test_editing_the_run_section_of_a_running_node_is_refused_until_a_restart(
    tmp_path: Path,
) -> None:
    from swarmlm.node.config import reload_changes

    cfg, _ = _node(tmp_path, run={"swarm": {"rounds": 3}})
    same = reload_changes(cfg, {"run": {"swarm": {"rounds": 3}}}, "node.yaml")
    assert same.run == cfg.run
    with pytest.raises(ConfigError, match=r"node\.yaml: run cannot change while the node runs"):
        reload_changes(cfg, {"run": {"swarm": {"rounds": 9}}}, "node.yaml")
