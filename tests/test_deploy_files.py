"""The deployment files as an operator uses them, checked without a container engine.

No Docker engine or Kubernetes cluster runs here, so these tests hold the files to what can be
checked: every YAML file loads, every ``swarmlm`` command line in the Dockerfile, the compose
file, the StatefulSet and the test-network scripts parses with the real CLI parser, the compose
services form one swarm with no coordinator, and the Kubernetes node config validates. The
test-network script is run for real, with a stand-in ``swarmlm`` that records its command
lines and answers ``/api/health``, so the node processes it starts are the lines checked.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarmlm.cli import build_parser
from swarmlm.node.config import ConfigError, NodeConfig, validate_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
STATEFULSET = ROOT / "deploy" / "kubernetes" / "statefulset.yaml"
START_NETWORK = ROOT / "scripts" / "start_test_network.sh"
RUN_INTEGRATION = ROOT / "scripts" / "run_integration_tests.sh"
NODE_TYPES = {"full", "training", "annotation", "lightweight"}

# Sample values for what the orchestrator fills in at run time.
K8S_FIELDS = {"POD_NAME": "swarmlm-0"}
SAMPLE_ENV_VALUE = "sample-value-123"


# -- helpers ---------------------------------------------------------------------------------
def cli_commands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def parse_cli(argv: list[str], where: str) -> argparse.Namespace:
    """Parse ``swarmlm <argv>`` with the real parser; fail with argparse's message."""
    if not argv:
        pytest.fail(f"{where}: empty swarmlm command line")
    if argv[0] not in cli_commands():
        pytest.fail(f"{where}: `swarmlm {argv[0]}` is not a swarmlm command")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(
            f"{where}: `swarmlm {shlex.join(argv)}` does not parse:\n{err.getvalue().strip()}"
        )


def node_config(argv: list[str], where: str, config_file: Path | None = None) -> NodeConfig:
    """Parse a `swarmlm node` line and build the node config it starts with, as the node
    does (config file, then flags, then --set); ``config_file`` stands in for --config."""
    args = parse_cli(argv, where)
    from swarmlm.node.cli import build_config

    if config_file is not None:
        args.config = config_file
    try:
        return build_config(args)
    except ConfigError as exc:
        pytest.fail(f"{where}: `swarmlm {shlex.join(argv)}` parses but the node refuses it: {exc}")


def advertised_host(argv: list[str]) -> str | None:
    """The p2p address host a node tells peers to dial: the ``advertise_host`` of its config
    (``--set advertise_host=...``), else the ``--host`` it binds."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "--set" and argv[i + 1].startswith("advertise_host="):
            return argv[i + 1].split("=", 1)[1]
    return flag(argv, "--host")


def swarm_p2p_of(cfg: NodeConfig) -> Any:
    """The p2p settings the node runs with: its swarm config plus its training.set."""
    from swarmlm.swarm.config import load_swarm_config

    path = cfg.training.config if cfg.training.config.is_absolute() else ROOT / cfg.training.config
    return load_swarm_config(path, cfg.training.set).p2p


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in an argv (last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def substitute_compose_vars(text: str) -> str:
    """Compose interpolation: ${VAR:-default} -> default, ${VAR}, ${VAR:?msg}, $VAR -> sample."""

    def repl(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3)
        if op in (":-", "-"):
            return arg or ""
        return SAMPLE_ENV_VALUE

    text = re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", repl, text)
    return re.sub(r"\$(\w+)", SAMPLE_ENV_VALUE, text.replace("$$", "\0")).replace("\0", "$")


def substitute_k8s_vars(arg: str) -> str:
    """Kubernetes expands $(VAR) from the container's env; unknown names stay literal, which
    for a swarmlm flag would be a bug, so they fail here."""

    def repl(m: re.Match[str]) -> str:
        if m.group(1) not in K8S_FIELDS:
            pytest.fail(f"{STATEFULSET.name}: $({m.group(1)}) is not a variable the pod defines")
        return K8S_FIELDS[m.group(1)]

    return re.sub(r"\$\((\w+)\)", repl, arg)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            name, _, rest = full.partition(" ")
            out.append((name.upper(), rest.strip()))
    return out


def exec_form(text: str, where: str) -> list[str]:
    try:
        argv = json.loads(text)
    except json.JSONDecodeError:
        pytest.fail(
            f"{where}: use the exec (JSON array) form so no shell sits between PID 1 "
            f"and swarmlm's SIGTERM handler: {text!r}"
        )
    assert isinstance(argv, list), where
    assert all(isinstance(a, str) for a in argv), where
    return argv


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert isinstance(data.get("services"), dict)
    return data


def compose_command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if isinstance(cmd, str):
        return shlex.split(substitute_compose_vars(cmd))
    assert isinstance(cmd, list), f"compose command must be a string or list: {cmd!r}"
    return [substitute_compose_vars(str(a)) for a in cmd]


def k8s_documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(STATEFULSET.read_text(encoding="utf-8")) if d]


def k8s(kind: str) -> dict[str, Any]:
    docs = [d for d in k8s_documents() if d.get("kind") == kind]
    assert len(docs) == 1, f"{STATEFULSET.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def node_container() -> dict[str, Any]:
    containers = k8s("StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def configmap_node_config() -> dict[str, Any]:
    cm = k8s("ConfigMap")
    files = cm["data"]
    assert len(files) == 1, "the ConfigMap holds exactly one node config file"
    ((name, text),) = files.items()
    assert name.endswith((".yaml", ".yml"))
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict)
    return raw


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert m, f"unreadable memory quantity {quantity!r}"
    return float(m.group(1)) * (units[m.group(2)] if m.group(2) else 1 / 2**20)


# -- YAML --------------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    files = [COMPOSE, *sorted((ROOT / "deploy").rglob("*.y*ml"))]
    return [f for f in files if f.suffix in (".yaml", ".yml")]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_deployment_yaml_file_loads(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document is a mapping"


def test_kubernetes_manifest_holds_configmap_headless_service_and_statefulset() -> None:
    kinds = sorted(d["kind"] for d in k8s_documents())
    assert kinds == ["ConfigMap", "Service", "StatefulSet"]
    assert all("apiVersion" in d and "metadata" in d for d in k8s_documents())


# -- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_installs_pinned_cpu_torch_before_the_package_and_runs_as_non_root() -> None:
    instr = dockerfile_instructions()
    assert instr[0] == ("FROM", "python:3.11-slim")
    runs = [(i, args) for i, (name, args) in enumerate(instr) if name == "RUN"]
    torch_at = next(i for i, a in runs if "torch==2.13.0" in a)
    assert "--index-url https://download.pytorch.org/whl/cpu" in instr[torch_at][1]
    package_at = next(i for i, a in runs if re.search(r"pip install \.(\s|$)", a))
    assert torch_at < package_at, "torch must be installed before the package pulls any torch"
    users = [args for name, args in instr if name == "USER"]
    assert users, "the node must not run as root"
    assert not users[-1].startswith(("root", "0")), "the node must not run as root"
    exposed = {p for name, args in instr if name == "EXPOSE" for p in args.split()}
    assert {"7777", "8080"} <= exposed


def test_dockerfile_tokenizes_the_bundled_corpus_at_build_time_with_a_valid_command() -> None:
    instr = dockerfile_instructions()
    prepare = [args for name, args in instr if name == "RUN" and "swarmlm data prepare" in args]
    assert prepare, "the image must ship the tokenized corpus training nodes read"
    argv = shlex.split(prepare[0])
    argv = argv[argv.index("swarmlm") + 1 :]
    args = parse_cli(argv, "Dockerfile RUN")
    assert str(args.out) == "runs/data/kjv", "configs/swarm-tiny.json reads runs/data/kjv"
    user_at = max(i for i, (name, _) in enumerate(instr) if name == "USER")
    prep_at = next(i for i, (n, a) in enumerate(instr) if n == "RUN" and "data prepare" in a)
    assert user_at < prep_at, "the corpus must be written by the user the node runs as"


def test_dockerfile_entrypoint_cmd_and_healthcheck_parse_with_the_real_cli() -> None:
    instr = dict(dockerfile_instructions())
    entry = exec_form(instr["ENTRYPOINT"], "ENTRYPOINT")
    assert entry == ["swarmlm"]
    cmd = exec_form(instr["CMD"], "CMD")
    assert cmd[0] == "node"
    cfg = node_config(cmd, "Dockerfile ENTRYPOINT + CMD")
    assert cfg.web_port == 8080, "the HEALTHCHECK probes port 8080"
    health = instr["HEALTHCHECK"]
    assert " CMD " in f" {health} "
    probe = exec_form(health.split(" CMD ", 1)[1].strip(), "HEALTHCHECK")
    assert probe[:2] == ["swarmlm", "status"]
    assert flag(probe, "--node") == "http://127.0.0.1:8080"
    parse_cli(probe[1:], "Dockerfile HEALTHCHECK")


def test_dockerignore_keeps_local_state_out_and_lets_every_copied_path_in() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list keeps .venv, runs/ and .git out of the context"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for name, args in dockerfile_instructions():
        if name != "COPY":
            continue
        *sources, _dest = args.split()
        for src in sources:
            if src.startswith("--"):
                continue
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
            assert any(
                src == a or src.startswith(a + "/") or a.startswith(src + "/") for a in allowed
            ), f"COPY {src} is excluded by .dockerignore"


# -- docker-compose.yml ------------------------------------------------------------------------
def test_compose_services_are_one_full_three_training_two_annotation_nodes() -> None:
    types = {}
    for name, svc in compose()["services"].items():
        argv = compose_command(svc)
        assert argv[0] == "node", f"service {name} must run `swarmlm node`"
        types[name] = flag(argv, "--type")
    assert sorted(types.values()) == sorted(["full"] + ["training"] * 3 + ["annotation"] * 2)


@pytest.mark.parametrize("service", sorted(compose()["services"]))
def test_compose_command_and_healthcheck_parse_with_the_real_cli(service: str) -> None:
    svc = compose()["services"][service]
    argv = compose_command(svc)
    cfg = node_config(argv, f"docker-compose.yml service {service} command")
    assert cfg.node_id == service
    p2p = swarm_p2p_of(cfg)
    advertised = cfg.advertise_host or p2p.advertise_host or cfg.host
    assert advertised == service, "the node must advertise a dialable name"
    test = svc.get("healthcheck", {}).get("test")
    if test is None:
        # The image's HEALTHCHECK applies: it probes 127.0.0.1:8080 inside the container.
        assert cfg.web_port == 8080, f"{service}: the image healthcheck probes port 8080"
        assert cfg.host in ("0.0.0.0", "127.0.0.1"), f"{service}: 127.0.0.1 must reach the node"
        return
    assert test[0] in ("CMD", "CMD-SHELL")
    probe = test[1:] if test[0] == "CMD" else shlex.split(test[1])
    assert probe[:2] == ["swarmlm", "status"]
    parse_cli(probe[1:], f"docker-compose.yml service {service} healthcheck")


def test_compose_nodes_bootstrap_into_one_connected_swarm_with_no_coordinator() -> None:
    services = compose()["services"]
    assert not any("coordinator" in name for name in services)
    p2p_port = {}
    edges: dict[str, set[str]] = {}
    for name, svc in services.items():
        argv = compose_command(svc)
        # Peers dial the address a node advertises: it must be a name the network resolves.
        assert advertised_host(argv) == name, (
            f"{name}: must advertise its own service name (advertise_host) so peers can dial it"
        )
        p2p_port[name] = int(flag(argv, "--p2p-port") or 7777)
    for name, svc in services.items():
        bootstrap = flag(compose_command(svc), "--bootstrap")
        assert bootstrap, f"service {name} has no --bootstrap peers"
        edges[name] = set()
        for addr in bootstrap.split(","):
            host, _, port = addr.rpartition(":")
            assert host in services, f"{name} bootstraps from {addr}: not a compose service"
            assert host != name, f"{name} bootstraps from itself"
            assert int(port) == p2p_port[host], f"{name}: {addr} is not {host}'s p2p port"
            edges[name].add(host)
    # Any node may start first or restart alone: from every node, every other is reachable
    # following its bootstrap list (strongly connected), not just through one hub.
    for start in services:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert seen == set(services), f"from {start}, bootstrap reaches only {sorted(seen)}"


def test_compose_publishes_the_full_node_web_ui_and_gives_every_node_its_own_volume() -> None:
    data = compose()
    services = data["services"]
    full = next(n for n, s in services.items() if flag(compose_command(s), "--type") == "full")
    web_port = flag(compose_command(services[full]), "--web-port") or "8080"
    assert any(str(p).endswith(f":{web_port}") for p in services[full].get("ports", []))
    volumes = {}
    for name, svc in services.items():
        node_dir = flag(compose_command(svc), "--node-dir")
        mounts = [str(v).split(":") for v in svc.get("volumes", [])]
        match = [m[0] for m in mounts if len(m) >= 2 and m[1] == node_dir]
        assert match, f"{name}: its --node-dir {node_dir} is not a volume (state would be lost)"
        volumes[name] = match[0]
        assert match[0] in data.get("volumes", {}), f"{name}: volume {match[0]} is not declared"
    assert len(set(volumes.values())) == len(volumes), "two nodes share one node dir"


# -- Kubernetes --------------------------------------------------------------------------------
def test_configmap_node_config_validates() -> None:
    raw = configmap_node_config()
    assert "node_id" not in raw, "node_id is per pod: it comes from --node-id"
    cfg = validate_config({**raw, "node_id": K8S_FIELDS["POD_NAME"]}, f"{STATEFULSET.name}")
    assert cfg.max_memory_mb is not None
    assert cfg.max_cpu_threads is not None


def test_statefulset_args_parse_with_the_real_cli_and_name_each_pod() -> None:
    container = node_container()
    argv = [substitute_k8s_vars(str(a)) for a in container.get("command", []) + container["args"]]
    if argv and argv[0] == "swarmlm":
        argv = argv[1:]
    parse_cli(argv, "StatefulSet args")
    assert argv[0] == "node"
    assert flag(argv, "--node-id") == K8S_FIELDS["POD_NAME"]
    assert (
        flag(
            argv,
            "--config",
        )
        is not None
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        exec_cmd = container.get(probe, {}).get("exec", {}).get("command")
        if exec_cmd and exec_cmd[0] == "swarmlm":
            parse_cli(exec_cmd[1:], f"StatefulSet {probe}")


def test_statefulset_pods_bootstrap_from_the_stable_names_of_the_headless_service() -> None:
    sts, svc = k8s("StatefulSet"), k8s("Service")
    assert svc["spec"]["clusterIP"] == "None", "stable per-pod DNS names need a headless Service"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"].get("publishNotReadyAddresses") is True, (
        "pods must resolve each other before they are ready (they become ready by joining)"
    )
    cfg = validate_config({**configmap_node_config(), "node_id": K8S_FIELDS["POD_NAME"]})
    name, service, replicas = (
        sts["metadata"]["name"],
        svc["metadata"]["name"],
        sts["spec"]["replicas"],
    )
    expected = {f"{name}-{i}.{service}:{cfg.p2p_port}" for i in range(replicas)}
    assert set(cfg.bootstrap_peers) == expected
    argv = [substitute_k8s_vars(str(a)) for a in node_container()["args"]]
    assert advertised_host(argv) == f"{K8S_FIELDS['POD_NAME']}.{service}", (
        "a pod must advertise its own stable DNS name (what the other pods bootstrap from)"
    )
    ports = {p["name"]: p["containerPort"] for p in node_container()["ports"]}
    assert ports == {"p2p": cfg.p2p_port, "web": cfg.web_port}


def test_statefulset_probes_resources_and_node_dir_match_the_node_config() -> None:
    container = node_container()
    cfg = validate_config({**configmap_node_config(), "node_id": K8S_FIELDS["POD_NAME"]})
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/api/health"
        assert get["port"] in ("web", cfg.web_port)
    limits = container["resources"]["limits"]
    assert float(limits["cpu"]) == cfg.max_cpu_threads
    limit_mb = mebibytes(limits["memory"])
    assert cfg.max_memory_mb is not None
    assert 0.75 * limit_mb <= cfg.max_memory_mb < limit_mb, (
        "max_memory_mb should sit just under the container limit (the node sheds load first)"
    )
    sts = k8s("StatefulSet")
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    argv = [substitute_k8s_vars(str(a)) for a in container["args"]]
    node_dir = flag(argv, "--node-dir") or str(cfg.node_dir)
    assert any(mounts.get(c) == node_dir for c in claims), "the node dir must be on a PVC"
    config_path = flag(argv, "--config")
    assert config_path is not None
    config_mounts = [
        v["name"] for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v
    ]
    assert any(config_path.startswith(mounts[v] + "/") for v in config_mounts)


def test_scaling_edit_of_the_configmap_hot_reloads_into_a_running_pod(tmp_path: Path) -> None:
    """Adding a pod's name to bootstrap_peers must apply without restarts: the running
    config (file + this pod's flags) accepts the edited file."""
    from swarmlm.node.config import reload_changes

    argv = [substitute_k8s_vars(str(a)) for a in node_container()["args"]]
    local_config = tmp_path / "node.yaml"
    raw = configmap_node_config()
    local_config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    running = node_config(argv, "StatefulSet args", config_file=local_config)
    edited = {**raw, "bootstrap_peers": [*raw["bootstrap_peers"], "swarmlm-4.swarmlm:7777"]}
    try:
        new = reload_changes(running, edited, "node.yaml")
    except ConfigError as exc:
        pytest.fail(f"a bootstrap edit of the ConfigMap would be refused: {exc}")
    assert new.bootstrap_peers[-1] == "swarmlm-4.swarmlm:7777"
    assert new.node_id == running.node_id


# -- the test-network scripts ------------------------------------------------------------------
def test_scripts_are_valid_bash_and_shellcheck_clean() -> None:
    for script in (START_NETWORK, RUN_INTEGRATION):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert os.access(script, os.X_OK), f"{script} is not executable"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    out = subprocess.run(
        ["shellcheck", str(START_NETWORK), str(RUN_INTEGRATION)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout


FAKE_SWARMLM = textwrap.dedent(
    """\
    import http.server, json, os, signal, sys, threading
    argv = sys.argv[1:]
    with open(os.environ["FAKE_RECORD"], "a") as fh:
        fh.write(json.dumps(argv) + "\\n")
    if argv[:1] != ["node"]:
        sys.exit(0)
    node_id = argv[argv.index("--node-id") + 1]
    if node_id == os.environ.get("FAKE_FAIL"):
        print("fake node: failing on purpose", flush=True)
        sys.exit(3)
    port = int(argv[argv.index("--web-port") + 1])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if node_id == os.environ.get("FAKE_DEGRADED"):
                p2p = {"status": "degraded", "detail": "no bootstrap peer reachable"}
                body = json.dumps({"status": "degraded", "components": {"p2p": p2p}}).encode()
            else:
                body = json.dumps({"status": "ok", "components": {}}).encode()
            self.send_response(200 if self.path == "/api/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Health)

    def stop(*_):
        with open(os.environ["FAKE_RECORD"], "a") as fh:
            fh.write(json.dumps(["SIGTERM", node_id]) + "\\n")
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    """
)


def free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free ports above it on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no block of free ports found")


@pytest.fixture
def fake_network(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Environment running start_test_network.sh against the stand-in swarmlm."""
    fake = tmp_path / "swarmlm"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SWARMLM}", encoding="utf-8")
    fake.chmod(0o755)
    record = tmp_path / "record.jsonl"
    base = free_port_block(8)
    env = {
        **os.environ,
        "SWARMLM": str(fake),
        "PYTHON": sys.executable,
        "FAKE_RECORD": str(record),
        "TESTNET_DIR": str(tmp_path / "testnet"),
        "TESTNET_P2P_BASE": str(base),
        "TESTNET_WEB_BASE": str(base + 4),
        "TESTNET_HEALTH_TIMEOUT": "30",
        "TESTNET_STOP_TIMEOUT": "10",
    }
    yield {"env": env, "record": record, "dir": tmp_path / "testnet", "web_base": base + 4}
    subprocess.run([str(START_NETWORK), "stop"], env=env, capture_output=True, timeout=30)


def recorded(record: Path) -> list[list[str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]


def test_start_test_network_starts_n_nodes_that_parse_and_stop_on_sigterm(
    fake_network: dict[str, Any],
) -> None:
    env, record, testnet = fake_network["env"], fake_network["record"], fake_network["dir"]
    env = {**env, "TESTNET_ANNOTATION": "1"}  # the integration suite's layout
    run = subprocess.run(
        [str(START_NETWORK), "4"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    # 3 round members (the annotation node holds no rounds): one crash would stop them
    assert "warning: n = 3 round member(s) tolerate no faulty or crashed member" in run.stderr
    # Recorded in the order the processes started, which is not the order they were launched.
    nodes = sorted(
        (argv for argv in recorded(record) if argv[:1] == ["node"]),
        key=lambda argv: int((flag(argv, "--node-id") or "node-0").split("-")[1]),
    )
    assert len(nodes) == 4
    for argv in nodes:
        node_config(argv, "start_test_network.sh node command")
    assert [flag(a, "--type") for a in nodes] == ["full", "training", "training", "annotation"]
    p2p = [f"127.0.0.1:{flag(a, '--p2p-port')}" for a in nodes]
    webs = [int(flag(a, "--web-port") or 0) for a in nodes]
    assert len(set(p2p)) == 4
    assert len(set(webs)) == 4
    assert not set(webs) & {int(a.rsplit(":", 1)[1]) for a in p2p}
    for addr, argv in zip(p2p, nodes, strict=True):
        assert flag(argv, "--host") == "127.0.0.1", "test networks bind loopback only"
        assert set((flag(argv, "--bootstrap") or "").split(",")) == set(p2p) - {addr}
        assert Path(flag(argv, "--node-dir") or "").parent == testnet
    env_file = dict(
        line.split("=", 1)
        for line in (testnet / "network.env").read_text(encoding="utf-8").splitlines()
    )
    assert env_file["SWARMLM_TEST_NETWORK"].split(",") == [f"http://127.0.0.1:{w}" for w in webs]
    assert env_file["SWARMLM_TEST_NETWORK_TYPES"] == "full,training,training,annotation"
    pids = (testnet / "network.pid").read_text(encoding="utf-8").split()
    assert pids[0::2] == ["node-1", "node-2", "node-3", "node-4"]

    again = subprocess.run(
        [str(START_NETWORK), "2"], env=env, capture_output=True, text=True, timeout=30
    )
    assert again.returncode == 1
    assert "already running" in again.stderr

    stop = subprocess.run(
        [str(START_NETWORK), "stop"], env=env, capture_output=True, text=True, timeout=30
    )
    assert stop.returncode == 0, stop.stderr
    terminated = {argv[1] for argv in recorded(record) if argv[:1] == ["SIGTERM"]}
    assert terminated == {"node-1", "node-2", "node-3", "node-4"}
    assert not (testnet / "network.pid").exists()


def test_start_test_network_defaults_to_four_round_members_and_warns_below_four(
    fake_network: dict[str, Any],
) -> None:
    env, record = fake_network["env"], fake_network["record"]
    run = subprocess.run([str(START_NETWORK)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    types = [flag(a, "--type") for a in recorded(record) if a[:1] == ["node"]]
    assert sorted(types, key=str) == ["full", "training", "training", "training"]
    assert "tolerate no faulty" not in run.stderr  # n = 4 tolerates f = 1
    subprocess.run([str(START_NETWORK), "stop"], env=env, capture_output=True, timeout=30)
    run = subprocess.run(
        [str(START_NETWORK), "3"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert (
        "warning: n = 3 round member(s) tolerate no faulty or crashed member (need n >= 4 for"
        " f = 1): one crash stops every round" in run.stderr
    )


def test_start_test_network_reports_a_node_that_dies_and_stops_the_others(
    fake_network: dict[str, Any],
) -> None:
    env = {**fake_network["env"], "FAKE_FAIL": "node-2"}
    run = subprocess.run(
        [str(START_NETWORK), "3"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert "node-2 exited during start" in run.stderr
    assert "failing on purpose" in run.stderr, "the dead node's log tail is shown"
    terminated = {a[1] for a in recorded(fake_network["record"]) if a[:1] == ["SIGTERM"]}
    assert terminated == {"node-1", "node-3"}
    assert not (fake_network["dir"] / "network.pid").exists()


def test_start_test_network_accepts_a_degraded_node_after_the_grace_and_names_why(
    fake_network: dict[str, Any],
) -> None:
    env = {**fake_network["env"], "FAKE_DEGRADED": "node-2", "TESTNET_DEGRADED_GRACE": "1"}
    run = subprocess.run(
        [str(START_NETWORK), "2"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "node-2 answers but is degraded (p2p: no bootstrap peer reachable)" in run.stderr
    assert "node-1 answers but is degraded" not in run.stderr


@pytest.mark.parametrize("arg", ["0", "abc", "-3"])
def test_start_test_network_refuses_a_bad_node_count(
    fake_network: dict[str, Any], arg: str
) -> None:
    run = subprocess.run(
        [str(START_NETWORK), arg],
        env=fake_network["env"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert "usage:" in run.stderr
    assert recorded(fake_network["record"]) == []


def test_stopping_when_no_network_runs_says_so_and_succeeds(
    fake_network: dict[str, Any],
) -> None:
    run = subprocess.run(
        [str(START_NETWORK), "stop"],
        env=fake_network["env"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0
    assert "no network running" in run.stderr


def test_integration_script_runs_the_node_network_suite_through_the_network_env() -> None:
    text = RUN_INTEGRATION.read_text(encoding="utf-8")
    assert "tests/integration/test_node_network.py" in text
    assert re.search(r"trap .*start_test_network\.sh stop.* EXIT", text)
    assert "SWARMLM_TEST_NETWORK" in text
