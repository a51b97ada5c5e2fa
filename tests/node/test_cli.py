"""``swarmlm node`` on the command line: flags and ``--set`` over the config file, the errors
a user sees, and the light parser that keeps torch out of lightweight nodes."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from swarmlm.cli import LIGHT_COMMANDS, build_parser, main
from swarmlm.node.cli import build_config, overlay
from swarmlm.node.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(only="node").parse_args(["node", *argv])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- overlay --------------------------------------------------------------------------------
def test_flags_override_the_file_and_absent_flags_leave_it_alone() -> None:
    raw = {"node_id": "file", "p2p_port": 7001, "web_port": 8001, "host": "127.0.0.1"}
    out = overlay(raw, parse("--node-id", "cli", "--web-port", "0", "--type", "annotation"))
    assert out == {
        "node_id": "cli",
        "p2p_port": 7001,
        "web_port": 0,
        "host": "127.0.0.1",
        "type": "annotation",
    }
    assert raw["node_id"] == "file"  # the file's dict is not modified


def test_node_dir_and_bootstrap_flags_are_passed_as_text(tmp_path: Path) -> None:
    out = overlay({}, parse("--node-dir", str(tmp_path), "--bootstrap", "127.0.0.1:1,h:2"))
    assert out == {"node_dir": str(tmp_path), "bootstrap_peers": "127.0.0.1:1,h:2"}


def test_set_values_are_json_else_text_and_create_nested_sections() -> None:
    args = parse(
        "--set",
        "rlhf.sample_every_rounds=2",
        "--set",
        "log_level=DEBUG",
        "--set",
        "thresholds.evict_below=null",
        "--set",
        'training.aggregator_params={"tau": 1.5}',
        "--set",
        "rate_limits.login_per_minute=4",
    )
    raw = {"rate_limits": {"register_per_minute": 2}}
    out = overlay(raw, args)
    assert out["rlhf"] == {"sample_every_rounds": 2}
    assert out["log_level"] == "DEBUG"
    assert out["thresholds"] == {"evict_below": None}
    assert out["training"] == {"aggregator_params": {"tau": 1.5}}
    assert out["rate_limits"] == {"register_per_minute": 2, "login_per_minute": 4}
    assert raw == {"rate_limits": {"register_per_minute": 2}}  # nested file section kept intact


def test_set_applies_after_the_flags() -> None:
    out = overlay({}, parse("--p2p-port", "7001", "--set", "p2p_port=7002"))
    assert out["p2p_port"] == 7002


@pytest.mark.parametrize(
    ("item", "why"), [("noequals", "must look like key=value"), ("=5", "has an empty key")]
)
def test_malformed_set_item_is_refused_naming_it(item: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"override '{item}' {why}"):
        overlay({}, parse("--set", item))


def test_set_below_a_scalar_is_refused_naming_the_section() -> None:
    with pytest.raises(ConfigError, match="'log_level' is not a section"):
        overlay({"log_level": "INFO"}, parse("--set", "log_level.x=1"))


# -- build_config ---------------------------------------------------------------------------
def test_build_config_layers_file_flags_and_set(tmp_path: Path) -> None:
    path = write(
        tmp_path / "node.yaml",
        "node_id: from-file\ntype: training\np2p_port: 7001\nrlhf:\n  responses: 3\n",
    )
    cfg = build_config(
        parse("--config", str(path), "--p2p-port", "0", "--set", "rlhf.prompts_per_batch=2")
    )
    assert cfg.node_id == "from-file"
    assert cfg.type == "training"
    assert cfg.p2p_port == 0
    assert (cfg.rlhf.responses, cfg.rlhf.prompts_per_batch) == (3, 2)


def test_a_node_without_a_name_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="pass --node-id or set node_id in --config"):
        build_config(parse("--type", "lightweight"))


def test_bad_bootstrap_flag_is_refused_naming_the_address() -> None:
    with pytest.raises(ConfigError, match=r"command line.*\n.*bootstrap_peers.*'nohost'"):
        build_config(parse("--node-id", "a", "--bootstrap", "127.0.0.1:7000,nohost"))


def test_errors_in_the_file_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "node.toml", 'node_id = "a"\nweb_port = "eighty"\n')
    with pytest.raises(ConfigError, match=r"node\.toml: invalid node config\n.*web_port"):
        build_config(parse("--config", str(path)))


def test_swarmlm_node_with_a_bad_config_prints_the_error_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["node", "--node-id", "has space", "--type", "lightweight"]) == 2
    out = capsys.readouterr().out
    assert "error" in out
    assert "node_id" in out


def test_swarmlm_node_refuses_an_unknown_type_at_parse_time() -> None:
    with pytest.raises(SystemExit) as exc:
        parse("--type", "supernode")
    assert exc.value.code == 2


# -- the light parser -------------------------------------------------------------------------
def test_light_parser_knows_only_its_own_command() -> None:
    assert set(LIGHT_COMMANDS) == {"node", "status"}
    assert build_parser(only="status").parse_args(["status"]).command == "status"
    with pytest.raises(SystemExit):
        build_parser(only="node").parse_args(["train"])
    assert build_parser(only="node").parse_args(["node", "--node-id", "a"]).node_id == "a"


def test_lightweight_node_setup_imports_no_torch(tmp_path: Path) -> None:
    """From the command line to a constructed runtime, voter config and abstain entry: a
    lightweight node never loads torch (~225 MB resident)."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from swarmlm.cli import build_parser
        from swarmlm.node.cli import build_config
        args = build_parser(only="node").parse_args([
            "node", "--type", "lightweight", "--node-id", "light-1",
            "--node-dir", {str(tmp_path / "node")!r}, "--bootstrap", "127.0.0.1:7001",
            "--set", "max_cpu_threads=1",
            "--set", {"training.config=" + str(REPO / "configs" / "swarm-tiny.json")!r},
        ])
        cfg = build_config(args)
        from swarmlm.node.runtime import NodeRuntime
        rt = NodeRuntime(cfg)
        voter = rt._load_swarm_config()
        from swarmlm.swarm.abstain import encode_abstain, is_abstain
        assert is_abstain(encode_abstain(1, cfg.node_id))
        assert type(voter).__name__ == "VoterConfig", type(voter)
        assert voter.p2p.bootstrap == [("127.0.0.1", 7001)], voter.p2p.bootstrap
        assert voter.p2p.keep_rounds == 2
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "none", done.stdout


def test_swarmlm_main_picks_the_light_parser_for_node_and_status(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from swarmlm.cli import main\n"
        "rc = main(['node', '--node-id', 'bad id'])\n"
        "assert rc == 2, rc\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        "    main(['status', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout
