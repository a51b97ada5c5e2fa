"""``swarmlm config init``: write a commented config file to start from.

The original design's training system had ``--create-config``; this is its equivalent. The
file is generated from the pydantic models themselves (every key with its default and its
``Field`` description as a comment), so it never drifts from what the loader accepts, and
it is read back through the loader before the command reports success.

``--kind node`` (default) writes a node config for ``swarmlm node --config``; ``--kind
train`` a run config for ``swarmlm train --config``, starting from the shipped tiny model on
the bundled corpus.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from swarmlm.atomic import atomic_write_text

# the checkout's configs (an editable install); a wheel has none, then ./configs (the image's
# working directory, /app, holds them)
_CHECKOUT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REPO_CONFIGS = _CHECKOUT_CONFIGS if _CHECKOUT_CONFIGS.is_dir() else Path("configs").resolve()


def add_config_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "config", help="write a commented config file to start from (config init)"
    )
    sub = p.add_subparsers(dest="config_command")
    init = sub.add_parser(
        "init",
        help="write a commented node (or run) config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument(
        "--kind",
        choices=["node", "train"],
        default="node",
        help="node: for `swarmlm node --config`; train: for `swarmlm train --config`",
    )
    init.add_argument(
        "--out", type=Path, default=None, help="file to write (default node.yaml / train.yaml)"
    )
    init.add_argument("--node-id", default="node-1", help="node_id to write (--kind node)")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(func=run_config_init)
    return p


def _yaml_scalar(value: Any) -> str:
    # JSON scalars and flow lists/maps are valid YAML; keeps strings quoted and exact
    text = json.dumps(value, default=str)
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e", 1)  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
    return text


def _emit(model: type[BaseModel] | None, values: dict[str, Any], indent: int) -> list[str]:
    """YAML lines for ``values`` with each key's description (from ``model``) above it."""
    lines: list[str] = []
    pad = "  " * indent
    fields = model.model_fields if model is not None else {}
    for key, value in values.items():
        info = fields.get(key)
        desc = info.description if info is not None else None
        if desc:
            lines.append(f"{pad}# {desc}")
        sub_model = info.annotation if info is not None else None
        if isinstance(value, dict) and value:
            nested = (
                sub_model
                if isinstance(sub_model, type) and issubclass(sub_model, BaseModel)
                else None
            )
            lines.append(f"{pad}{key}:")
            lines.extend(_emit(nested, value, indent + 1))
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar(value)}")
    return lines


def node_config_text(node_id: str, out: Path) -> str:
    from swarmlm.node.config import NodeConfig

    swarm_config = REPO_CONFIGS / "swarm-tiny.json"
    cfg = NodeConfig(node_id=node_id)
    values = cfg.model_dump(mode="json")
    # names in a node config are relative to its folder (swarmlm node resolves them so)
    folder = out.resolve().parent
    values["training"]["config"] = (
        os.path.relpath(swarm_config, folder)
        if folder.is_relative_to(REPO_CONFIGS.parent)
        else str(swarm_config)
    )
    values["admin_username"] = "admin"
    header = [
        "# swarmlm node config, written by `swarmlm config init`. Start a node with",
        f"#   swarmlm node --config {out}",
        "# Flags (--node-id, --p2p-port, ...) and --set key.sub=value override these keys.",
        "# File names here are relative to this file's folder. Keys marked hot-reloadable",
        "# apply while the node runs; see docs/node.md for every key. The swarm config's own",
        "# data.path (runs/data/kjv) is relative to the directory the node starts in.",
        "",
    ]
    return "\n".join(header + _emit(NodeConfig, values, 0)) + "\n"


def train_config_text(out: Path) -> str:
    from swarmlm.config import read_config_file
    from swarmlm.train.config import RunConfig

    shipped = read_config_file(REPO_CONFIGS / "tiny.json")
    values = RunConfig.model_validate(shipped).model_dump(mode="json")
    header = [
        "# swarmlm run config, written by `swarmlm config init --kind train`: the tiny model",
        "# on the bundled corpus. Prepare the data, then train:",
        "#   swarmlm data prepare --input data/kjv.txt.gz --out runs/data/kjv --vocab-size 2048",
        f"#   swarmlm train --config {out}",
        "# --set key.sub=value overrides any key; see docs/training.md.",
        "",
    ]
    return "\n".join(header + _emit(RunConfig, values, 0)) + "\n"


def run_config_init(args: argparse.Namespace) -> int:
    from swarmlm.cli import UsageError

    out: Path = args.out or Path("node.yaml" if args.kind == "node" else "train.yaml")
    if out.suffix not in (".yaml", ".yml"):
        raise UsageError(f"--out {out}: the file is written as YAML, name it .yaml")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists (pass --force to replace it)")
    text = node_config_text(args.node_id, out) if args.kind == "node" else train_config_text(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    # read it back the way the commands will: a file we write must load
    if args.kind == "node":
        from swarmlm.node.config import read_config_file, validate_config

        validate_config(read_config_file(out), str(out))
        print(f"wrote {out}; start a node with: swarmlm node --config {out}")
    else:
        from swarmlm.config import load_config
        from swarmlm.train.config import RunConfig

        load_config(RunConfig, out)
        print(f"wrote {out}; train with: swarmlm train --config {out}")
    return 0
