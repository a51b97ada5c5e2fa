"""``swarmlm node``: start an integrated node of a given type.

``swarmlm node --type full|training|annotation|lightweight --node-id ID [--p2p-port 7777]
[--web-port 8080] [--bootstrap host:port,...] [--config FILE] [--node-dir DIR]``
(``--node-type`` is the original design's spelling of ``--type``).

Settings come from the config file (JSON, YAML or TOML), then ``SWARMLM_NODE__KEY``
environment variables, then the flags, then ``--set`` (``key.sub=value``, values parsed as
JSON); ``swarmlm config show --config FILE`` prints the result and where each value came
from. File names inside a config file
(``training.config``, ``rlhf.prompts``) are relative to that file's folder. A
``--set training.set=[...]`` is laid over the file's ``training.set`` key by key, so the
command line adds or replaces swarm overrides without dropping the file's others.

With ``--json`` every node event is printed as one JSON line on stdout (tests and scripts
read those); otherwise a short human log: what the node is doing (loading, waiting for
peers, training round r with a progress bar) and each decided round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from swarmlm.config import Sources, apply_env, apply_overrides
from swarmlm.node.config import (
    ConfigError,
    NodeConfig,
    TrainingSection,
    read_config_file,
    validate_config,
)
from swarmlm.node.events import Event

log = logging.getLogger(__name__)


def add_node_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "node",
        help="run an integrated node: swarm training, curation, web and alignment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--type",
        "--node-type",  # the original design's spelling
        dest="node_type",
        choices=["full", "training", "annotation", "lightweight"],
        default=None,
        help="which components run (default: the config's, else full)",
    )
    p.add_argument("--node-id", default=None, help="this node's name (required here or in config)")
    p.add_argument("--p2p-port", type=int, default=None, help="p2p port (default 7777; 0 = any)")
    p.add_argument("--web-port", type=int, default=None, help="http port (default 8080; 0 = any)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--bootstrap", default=None, help="host:port,... of peers to join")
    p.add_argument("--config", type=Path, default=None, help="node config (.json/.yaml/.toml)")
    p.add_argument("--node-dir", type=Path, default=None, help="identity, store, checkpoints")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. rlhf.sample_every_rounds=2 (value parsed as JSON)",
    )
    p.add_argument("--json", action="store_true", help="print node events as JSON lines")
    p.set_defaults(func=run_node)
    return p


ENV_PREFIX = "SWARMLM_NODE__"

# flag -> the config key it sets (the flags' own names label them in ``config show``)
FLAG_KEYS = {
    "node_type": ("type", "--type"),
    "node_id": ("node_id", "--node-id"),
    "p2p_port": ("p2p_port", "--p2p-port"),
    "web_port": ("web_port", "--web-port"),
    "host": ("host", "--host"),
    "bootstrap": ("bootstrap_peers", "--bootstrap"),
    "node_dir": ("node_dir", "--node-dir"),
}


def overlay(
    raw: dict[str, Any], args: argparse.Namespace, sources: Sources | None = None
) -> dict[str, Any]:
    """The environment and the command line over a config file's settings: ``SWARMLM_NODE__``
    variables, flags, then ``--set``. Applied at start and again to every reloaded file, so
    an edit never fights the command line. ``sources`` (if given) receives where each value
    came from; the file's own keys should be recorded in it by the caller."""
    raw = copy.deepcopy(raw)  # the caller's dict (a reloaded file) stays as read
    if args.config is not None:
        resolve_file_paths(raw, Path(args.config).parent)
    file_set = list((raw.get("training") or {}).get("set") or [])
    apply_env(raw, ENV_PREFIX, sources)
    for attr, (key, flag) in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        raw[key] = str(value) if isinstance(value, Path) else value
        if sources is not None:
            sources.record([key], raw[key], flag)
    raw = apply_overrides(raw, args.overrides, sources)
    use_shipped_swarm_config(raw)
    training = raw.get("training")
    if file_set and isinstance(training, dict) and isinstance(training.get("set"), list):
        merged = merge_overrides(file_set, training["set"])
        if sources is not None and merged != training["set"]:
            label = sources.source_of("training.set")
            sources.record(["training", "set"], merged, f"{args.config} + {label}")
        training["set"] = merged
    return raw


SHIPPED_SWARM_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "swarm-tiny.json"


def use_shipped_swarm_config(raw: dict[str, Any]) -> None:
    """No ``training.config`` given: the default names ``configs/swarm-tiny.json`` of the
    working directory; outside a checkout (the original quick start typed in a fresh
    directory) use the shipped file instead of refusing to start."""
    training = raw.get("training")
    if isinstance(training, dict) and training.get("config") is not None:
        return
    if TrainingSection().config.exists() or not SHIPPED_SWARM_CONFIG.exists():
        return
    raw.setdefault("training", {})
    if isinstance(raw["training"], dict):
        raw["training"]["config"] = str(SHIPPED_SWARM_CONFIG)


def resolve_file_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make the file names a config file gives relative to its own folder, so a node config
    works from any working directory (``configs/node.yaml`` names ``swarm-tiny.json`` beside
    it). A name that exists only relative to the working directory (configs written before
    this rule) is kept, with a warning, rather than breaking a running setup."""
    for section, key in (("training", "config"), ("rlhf", "prompts")):
        sub = raw.get(section)
        if not isinstance(sub, dict) or not isinstance(sub.get(key), str):
            continue
        name = Path(sub[key]).expanduser()
        if name.is_absolute():
            continue
        beside = folder / name
        if not beside.exists() and name.exists():
            logging.getLogger(__name__).warning(
                "%s.%s: %s is not beside the config file (%s); using ./%s, relative to the "
                "working directory (write it relative to the config's folder)",
                section,
                key,
                name,
                beside,
                name,
            )
            continue
        sub[key] = str(beside)


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """``base`` (``key=value`` items) with ``extra`` laid over it key by key: an item of
    ``extra`` replaces ``base``'s item of the same key in place, new keys come last. Without
    this a ``--set training.set=[...]`` dropped every override of the file it did not
    repeat (``make run NODES=3`` lost ``swarm.checkpoint_every``)."""

    def key(item: str) -> str:
        return str(item).split("=", 1)[0].strip()

    extra_by_key = {key(item): item for item in extra}
    merged = [extra_by_key.pop(key(item), item) for item in base]
    return merged + [item for item in extra if key(item) in extra_by_key]


def build_config(args: argparse.Namespace, sources: Sources | None = None) -> NodeConfig:
    """The node config from ``--config``, the environment and the command line; ``sources``
    (if given) receives where each value came from."""
    src = sources if sources is not None else Sources()
    raw = read_config_file(args.config) if args.config is not None else {}
    for key, value in raw.items():
        src.record([key], value, str(args.config))
    raw = overlay(raw, args, src)
    if "node_id" not in raw:
        raise ConfigError("a node needs a name: pass --node-id or set node_id in --config")
    source = str(args.config) if args.config is not None else "command line"
    return validate_config(raw, source, src)


def run_node(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    logging.getLogger().setLevel(cfg.log_level)
    logging.getLogger("swarmlm").setLevel(cfg.log_level)
    from swarmlm.node.runtime import NodeRuntime

    runtime = NodeRuntime(cfg, config_path=args.config, overlay=lambda raw: overlay(raw, args))

    def show(ev: Event) -> None:
        if args.json:
            sys.stdout.write(json.dumps(ev.to_json(), default=str) + "\n")
            sys.stdout.flush()
            return
        d = ev.data
        if ev.kind == "node_started":
            console.print(
                f"node [bold]{cfg.node_id}[/bold] ({cfg.type}) p2p port {d['p2p_port']}, "
                f"http://{cfg.host}:{d['web_port']}",
                highlight=False,
            )
            admin = admin_login_hint(cfg)
            if admin:
                console.print(admin, markup=False, highlight=False)
        elif ev.kind == "round_decided":
            loss = d.get("val_loss")
            console.print(
                f"round {d['round']:>4}  members {d['members']}  accepted {d['accepted']}  "
                f"val loss {'-' if loss is None else f'{loss:.4f}'}"
            )
        elif ev.kind in ("peer_joined", "peer_left"):
            console.print(f"{ev.kind.replace('_', ' ')}: {d.get('name') or d['peer']}")
        elif ev.kind in ("config_reloaded", "config_rejected", "attack_detected"):
            console.print(f"{ev.kind.replace('_', ' ')}: {d}")
        elif ev.kind == "checkpoint_saved":
            console.print(f"checkpoint (round {d['round']}): {d['path']}")

    runtime.bus.on(None, show)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        watcher = None if args.json else asyncio.create_task(show_activity(runtime, console))
        try:
            return await runtime.run(stop)
        finally:
            if watcher is not None:
                watcher.cancel()

    owns_process = getattr(args, "owns_process", False)
    try:
        rc = run_abandoning_threads(main(), WORKER_GRACE_S) if owns_process else asyncio.run(main())
    except (ConfigError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    if owns_process:
        exit_now(rc)
    return rc


# How long a stopped node waits for worker threads still running (an evaluation or a local
# phase it cannot interrupt) before it exits without them.
WORKER_GRACE_S = 0.5


def run_abandoning_threads(coro: Any, grace: float) -> int:
    """``asyncio.run(coro)``, except for the worker threads still busy once ``coro`` has
    returned: they get ``grace`` seconds, then the caller exits without them (``exit_now``).

    Why: ``asyncio.run`` joins its default executor without a timeout, so a node stopped
    during its start-up evaluation waited for the whole held-out set (5 s here, 11.6 s on a
    loaded 2-core machine, against the 3 s bound; issue 17 #13) although its state was
    already durable. What such a thread may still do is safe to drop: every file the node
    writes is replaced atomically (temporary + rename) and every database write is a
    transaction, so an interrupted one leaves the previous version."""
    import concurrent.futures
    import threading

    loop = asyncio.new_event_loop()
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="swarmlm-node")
    loop.set_default_executor(executor)
    try:
        asyncio.set_event_loop(loop)
        rc: int = loop.run_until_complete(coro)
        return rc
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            joined = threading.Thread(target=executor.shutdown, daemon=True)
            joined.start()
            joined.join(grace)
            if joined.is_alive():
                busy = [t.name for t in threading.enumerate() if t.name.startswith("swarmlm-node")]
                log.warning("exiting without %d worker thread(s) still running", len(busy))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def admin_login_hint(cfg: NodeConfig) -> str | None:
    """Where the web interface's admin password is, for the start-up banner: the first thing
    a user needs after the URL, and otherwise only in a log line among many."""
    if not cfg.runs("web"):
        return None
    if not cfg.admin_username:
        return "no admin account configured (set admin_username to create one at start)"
    if cfg.admin_password is not None:
        return f"log in as {cfg.admin_username!r} with the admin_password of the config"
    path = cfg.directory / "admin-password"
    if path.exists():  # written (0600) when the node created the account
        return f"log in as {cfg.admin_username!r}; password in {path}"
    return f"log in as {cfg.admin_username!r} (an existing account: its password is unchanged)"


async def show_activity(runtime: Any, console: Console, every: float = 1.0) -> None:
    """Print what the node is doing (:mod:`swarmlm.node.progress`) until cancelled."""
    from swarmlm.node.progress import ActivityPrinter

    printer = ActivityPrinter(lambda line: console.print(line, markup=False, highlight=False))
    while True:
        await asyncio.sleep(every)
        try:
            printer.poll(runtime)
        except Exception:  # a display must never take the node down
            logging.getLogger(__name__).debug("activity display failed", exc_info=True)


def exit_now(rc: int) -> None:
    """End the process without the interpreter's teardown.

    When ``asyncio.run`` has returned, the node's state is durable: the checkpoint is written
    (its thread was joined with the loop's executor), the store closed, the servers and the
    transport stopped. What remains is Python unloading torch and the rest module by
    module, 0.5-1 s on a 2-core machine that a stopping node (``make run``, a supervisor
    waiting to restart it, the 3 s shutdown bound) should not spend. Logging and the
    standard streams are flushed first; ``os._exit`` then skips only that teardown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)
