"""``swarmlm config init``: write a commented config file to start from; ``swarmlm config
show``: print the effective configuration and where each value came from.

The original design's training system had ``--create-config``; this is its equivalent. The
file is generated from the pydantic models themselves (every key with its default and its
``Field`` description as a comment), so it never drifts from what the loader accepts, and
it is read back through the loader before the command reports success.

``--kind node`` (default) writes a node config for ``swarmlm node --config``; ``--kind
train`` a run config for ``swarmlm train --config``, starting from the shipped tiny model on
the bundled corpus.

``config show`` loads a config exactly as the command that uses it does (file, environment
variables, ``--set``) and prints every key, its value and its source: ``default``, the file
path, ``env NAME``, a flag or ``--set key=value``. A node config also shows the run config
it trains with under ``run.`` (composed from ``training.config``, the ``run`` section,
``training.set`` and the node's own settings).
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
        "config",
        help="write a commented config file to start from (config init); print the effective "
        "configuration and where each value came from (config show)",
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

    show = sub.add_parser(
        "show",
        help="print the effective configuration: every key, its value and where it came from",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("--config", type=Path, default=None, help="config file (.json/.yaml/.toml)")
    show.add_argument(
        "--kind",
        choices=["node", "train", "swarm"],
        default=None,
        help="node: `swarmlm node --config`; train: `swarmlm train --config`; swarm: a swarm "
        "run config (default: guessed from the file's keys; node without --config)",
    )
    # the flags of `swarmlm node`, so a node's command line can be shown as it will run
    show.add_argument("--node-id", default=None, help="node: as `swarmlm node --node-id`")
    show.add_argument(
        "--type",
        "--node-type",
        dest="node_type",
        choices=["full", "training", "annotation", "lightweight"],
        default=None,
        help="node: as `swarmlm node --type`",
    )
    show.add_argument("--p2p-port", type=int, default=None, help="node: as `swarmlm node`")
    show.add_argument("--web-port", type=int, default=None, help="node: as `swarmlm node`")
    show.add_argument("--host", default=None, help="node: as `swarmlm node`")
    show.add_argument("--bootstrap", default=None, help="node: as `swarmlm node`")
    show.add_argument("--node-dir", type=Path, default=None, help="node: as `swarmlm node`")
    show.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key as the command would (value parsed as YAML/JSON)",
    )
    show.add_argument("--json", action="store_true", help="one JSON document: kind and rows")
    show.set_defaults(func=run_config_show)
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
        "# Flags (--node-id, --p2p-port, ...) and --set key.sub=value override these keys;",
        f"#   swarmlm config show --config {out}",
        "# prints every value the node will use and where it came from.",
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


# -- config show -------------------------------------------------------------------------

NODE_KEYS = frozenset({"node_id", "type", "training", "run", "p2p_port", "web_port"})


def guess_kind(path: Path | None) -> str:
    """node, swarm or train, from a config file's top-level keys (node without a file)."""
    if path is None:
        return "node"
    from swarmlm.config import read_config_file

    keys = set(read_config_file(path))
    if keys & NODE_KEYS:
        return "node"
    return "swarm" if keys & {"swarm", "p2p"} else "train"


def effective_rows(
    kind: str,
    path: Path | None,
    overrides: list[str],
    node_flags: dict[str, Any] | None = None,
) -> list[tuple[str, Any, str]]:
    """``(key, value, source)`` of the configuration ``kind`` loads from ``path``, the
    environment and ``overrides`` (and for a node, ``node_flags``: the ``swarmlm node``
    flags by their argparse names), in field order."""
    from swarmlm.config import Sources, effective_values

    sources = Sources()
    if kind == "node":
        from swarmlm.node.cli import FLAG_KEYS, build_config
        from swarmlm.node.config import node_run_config

        flags = {attr: (node_flags or {}).get(attr) for attr in FLAG_KEYS}
        ns = argparse.Namespace(config=path, overrides=overrides, **flags)
        cfg = build_config(ns, sources)
        rows = [r for r in effective_values(cfg, sources) if r[0] != "run"]
        run_sources = Sources()
        run = node_run_config(cfg, cfg.directory, sources, run_sources)
        rows += [(f"run.{k}", v, src) for k, v, src in effective_values(run, run_sources)]
        return rows
    from swarmlm.config import load_config

    if path is None:
        from swarmlm.cli import UsageError

        raise UsageError(f"config show --kind {kind} needs --config FILE")
    if kind == "train":
        from swarmlm.train.config import ENV_PREFIX, RunConfig

        cfg_t = load_config(RunConfig, path, overrides, env_prefix=ENV_PREFIX, sources=sources)
        return effective_values(cfg_t, sources)
    from swarmlm.swarm.config import SwarmRunConfig

    cfg_s = load_config(SwarmRunConfig, path, overrides, sources=sources)
    return effective_values(cfg_s, sources)


def run_config_show(args: argparse.Namespace) -> int:
    kind = args.kind or guess_kind(args.config)
    from swarmlm.node.cli import FLAG_KEYS

    flags = {attr: getattr(args, attr) for attr in FLAG_KEYS}
    if kind != "node" and any(v is not None for v in flags.values()):
        from swarmlm.cli import UsageError

        raise UsageError(f"--node-id, --p2p-port, ... apply to a node config, not --kind {kind}")
    rows = effective_rows(kind, args.config, args.overrides, flags)
    if args.json:
        doc = {
            "kind": kind,
            "config": None if args.config is None else str(args.config),
            "values": [{"key": k, "value": v, "source": src} for k, v, src in rows],
        }
        print(json.dumps(doc, indent=1))
        return 0
    shown = [(k, json.dumps(v), src) for k, v, src in rows]
    wk = max(len("key"), *(len(k) for k, _, _ in shown))
    wv = min(40, max(len("value"), *(len(v) for _, v, _ in shown)))
    where = "defaults" if args.config is None else str(args.config)
    # plain print, not rich: values are config text (a "[...]" list is not markup) and a
    # piped table must keep one key a line
    print(f"# effective {kind} configuration ({where}); source: where each value was set")
    print(f"{'key':<{wk}}  {'value':<{wv}}  source")
    for k, v, src in shown:
        print(f"{k:<{wk}}  {v:<{wv}}  {src}")
    return 0
