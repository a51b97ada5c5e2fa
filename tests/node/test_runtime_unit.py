"""NodeRuntime without its network: hot reload (what is applied where, what is refused and
how the refusal is reported), health before start, the admin password file, private writes,
and how peers' announced types decide who votes, trains and replicates.

Each runtime is built from a NodeConfig and never ``run()``: the reload path is the same
method the file watcher calls.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from swarmlm.node.config import NodeConfig, validate_config
from swarmlm.node.events import Event
from swarmlm.node.runtime import NodeRuntime, write_private
from swarmlm.web.security import RateLimiter

REPO = Path(__file__).resolve().parents[2]
SWARM_TINY = REPO / "configs" / "swarm-tiny.json"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Iterator[None]:
    """A reload sets the root and swarmlm logger levels; other tests must not inherit them."""
    root, ours = logging.getLogger(), logging.getLogger("swarmlm")
    before = root.level, ours.level
    yield
    root.setLevel(before[0])
    ours.setLevel(before[1])


def node_config(tmp_path: Path, **fields: Any) -> NodeConfig:
    return validate_config({"node_id": "n1", "node_dir": str(tmp_path / "node"), **fields})


def fake_web_app(cfg: NodeConfig) -> Any:
    rl = cfg.rate_limits
    swarm = SimpleNamespace(
        login_limiter=RateLimiter(rl.login_per_minute / 60.0, rl.login_per_minute),
        register_limiter=RateLimiter(rl.register_per_minute / 60.0, rl.register_per_minute),
        submit_limiter=RateLimiter(rl.submit_per_second, rl.submit_burst),
    )
    return SimpleNamespace(state=SimpleNamespace(swarm=swarm))


class Reloading:
    """A runtime whose config file the test edits, with the events it published."""

    def __init__(
        self,
        tmp_path: Path,
        file: dict[str, Any],
        overlay: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **running: Any,
    ) -> None:
        self.path = tmp_path / "node.json"
        self.write(file)
        raw = dict(file)
        if overlay is not None:
            raw = overlay(raw)
        self.runtime = NodeRuntime(
            validate_config({**raw, **running}), config_path=self.path, overlay=overlay
        )
        self.events: list[Event] = []
        self.runtime.bus.on(["config_reloaded", "config_rejected"], self.events.append)

    def write(self, file: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(file), encoding="utf-8")


def annotation_file(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "node_id": "ann-1",
        "type": "annotation",
        "node_dir": str(tmp_path / "node"),
        "web_port": 0,
        **extra,
    }


# -- hot reload: applied -------------------------------------------------------------------
def test_reload_applies_rate_limits_to_the_running_web_app(tmp_path: Path) -> None:
    r = Reloading(tmp_path, annotation_file(tmp_path))
    rt = r.runtime
    rt.web_app = fake_web_app(rt.cfg)
    r.write(
        annotation_file(
            tmp_path,
            rate_limits={
                "login_per_minute": 2,
                "register_per_minute": 1,
                "submit_per_second": 0.5,
                "submit_burst": 3,
            },
        )
    )
    assert rt.reload() is True
    s = rt.web_app.state.swarm
    assert (s.login_limiter.rate, s.login_limiter.burst) == (2 / 60.0, 2.0)
    assert (s.register_limiter.rate, s.register_limiter.burst) == (1 / 60.0, 1.0)
    assert (s.submit_limiter.rate, s.submit_limiter.burst) == (0.5, 3.0)
    # the new limit bites at once: a fresh key gets its burst of 2 logins, not the old 10
    assert [s.login_limiter.allow("1.2.3.4", now=100.0) for _ in range(3)] == [True, True, False]
    assert rt.cfg.rate_limits.login_per_minute == 2
    assert [e.kind for e in r.events] == ["config_reloaded"]
    assert r.events[0].data["fields"] == ["rate_limits"]
    assert rt.health()["reloads"] == {"applied": 1, "rejected": 0, "last_error": None}


def test_reload_applies_the_log_level(tmp_path: Path) -> None:
    r = Reloading(tmp_path, annotation_file(tmp_path))
    r.write(annotation_file(tmp_path, log_level="ERROR"))
    assert r.runtime.reload()
    assert logging.getLogger("swarmlm").level == logging.ERROR
    assert logging.getLogger().level == logging.ERROR
    assert r.runtime.cfg.log_level == "ERROR"


def test_reload_without_changes_is_applied_as_no_change(tmp_path: Path) -> None:
    r = Reloading(tmp_path, annotation_file(tmp_path))
    assert r.runtime.reload()
    assert r.events[0].data["fields"] == []


def swarm_file(tmp_path: Path) -> Path:
    raw = json.loads(SWARM_TINY.read_text(encoding="utf-8"))
    raw["data"]["path"] = str(tmp_path / "data")
    path = tmp_path / "swarm.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def training_file(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "node_id": "train-1",
        "type": "training",
        "node_dir": str(tmp_path / "node"),
        "training": {"config": str(swarm_file(tmp_path))},
        **extra,
    }


def test_reload_applies_thresholds_and_aggregator_params_to_the_training_config(
    tmp_path: Path,
) -> None:
    r = Reloading(tmp_path, training_file(tmp_path))
    rt = r.runtime
    rt.swarm_cfg = rt._load_swarm_config()
    sw = rt.training_config().swarm
    assert (sw.exclude_below, sw.evict_below) == (0.2, 0.05)
    r.write(
        training_file(
            tmp_path,
            thresholds={"exclude_below": 0.35, "evict_below": 0.1, "outlier_z": 4.0},
            training={"config": str(tmp_path / "swarm.json"), "aggregator_params": {"tau": 2.0}},
        )
    )
    assert rt.reload()
    sw = rt.training_config().swarm
    assert (sw.exclude_below, sw.evict_below, sw.outlier_z) == (0.35, 0.1, 4.0)
    assert sw.aggregator_params == {"tau": 2.0}
    assert set(r.events[0].data["fields"]) == {"thresholds", "training"}


# -- hot reload: refused --------------------------------------------------------------------
def assert_refused(r: Reloading, before: NodeConfig, *phrases: str) -> str:
    assert r.runtime.reload() is False
    assert r.runtime.cfg == before  # the running config stays
    assert [e.kind for e in r.events] == ["config_rejected"]
    error = str(r.events[0].data["error"])
    for phrase in phrases:
        assert phrase in error
    reloads = r.runtime.health()["reloads"]
    assert (reloads["applied"], reloads["rejected"]) == (0, 1)
    assert reloads["last_error"] == error
    return error


def test_reload_refuses_a_restart_only_change_and_keeps_everything(tmp_path: Path) -> None:
    r = Reloading(tmp_path, annotation_file(tmp_path))
    rt = r.runtime
    rt.web_app = fake_web_app(rt.cfg)
    before = rt.cfg
    # one hot edit together with a restart-only one: nothing at all is applied
    r.write(annotation_file(tmp_path, p2p_port=9999, rate_limits={"login_per_minute": 1}))
    assert_refused(r, before, "p2p_port cannot change while the node runs", str(r.path))
    assert rt.web_app.state.swarm.login_limiter.burst == 10.0


def test_reload_refuses_invalid_aggregator_params_and_keeps_the_running_ones(
    tmp_path: Path,
) -> None:
    r = Reloading(tmp_path, training_file(tmp_path))
    rt = r.runtime
    rt.swarm_cfg = rt._load_swarm_config()
    before = rt.cfg
    r.write(
        training_file(
            tmp_path,
            thresholds={"exclude_below": 0.9},
            training={"config": str(tmp_path / "swarm.json"), "aggregator_params": {"tau": -1}},
        )
    )
    assert_refused(r, before, "training.aggregator_params for 'centered_clip'", "tau")
    sw = rt.training_config().swarm
    assert sw.exclude_below == 0.2
    assert sw.aggregator_params == {}


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ('{"node_id": "ann-1", ', "cannot parse"),
        ('{"node_id": "ann-1", "type": "annotation", "log_level": "LOUD"}', "log_level"),
    ],
)
def test_reload_refuses_a_broken_or_invalid_file(tmp_path: Path, text: str, phrase: str) -> None:
    r = Reloading(tmp_path, annotation_file(tmp_path))
    before = r.runtime.cfg
    r.path.write_text(text, encoding="utf-8")
    assert_refused(r, before, phrase)


def test_reload_of_a_deleted_file_is_refused(tmp_path: Path) -> None:
    r = Reloading(tmp_path, annotation_file(tmp_path))
    before = r.runtime.cfg
    r.path.unlink()
    assert_refused(r, before, "config file not found")


def test_a_command_line_flag_never_reads_as_an_edit(tmp_path: Path) -> None:
    """Started with ``--web-port 0`` over a file saying 8080: reloading that file again with
    the command line laid over it changes nothing, and a real edit still applies."""

    def command_line(raw: dict[str, Any]) -> dict[str, Any]:
        return {**raw, "web_port": 0}

    file = annotation_file(tmp_path, web_port=8080)
    r = Reloading(tmp_path, file, overlay=command_line)
    assert r.runtime.cfg.web_port == 0
    r.write({**file, "log_level": "WARNING"})
    assert r.runtime.reload()
    assert r.events[-1].data["fields"] == ["log_level"]
    assert r.runtime.cfg.web_port == 0


# -- health before start ------------------------------------------------------------------------
def test_health_before_start_reports_the_transport_down_and_names_the_node(
    tmp_path: Path,
) -> None:
    cfg = node_config(tmp_path, type="annotation")
    cfg.directory.mkdir(parents=True)
    rt = NodeRuntime(cfg)
    h = rt.health()
    assert h["status"] == "down"
    assert h["components"]["p2p"]["status"] == "down"
    assert h["components"]["disk"]["status"] in ("ok", "degraded")
    assert h["components"]["resources"]["status"] == "ok"
    assert (h["node_id"], h["type"], h["peer_id"]) == ("n1", "annotation", None)
    assert "rounds" not in h["components"]  # no swarm component on an annotation node
    json.dumps(h)  # served as JSON by /api/health


class FakeProcess:
    def __init__(self, rss: int) -> None:
        self.rss = rss

    def memory_info(self) -> SimpleNamespace:
        return SimpleNamespace(rss=self.rss)

    def num_threads(self) -> int:
        return 3

    def cpu_percent(self, interval: float | None) -> float:
        return 12.5


def test_resources_degrade_above_the_memory_ceiling(tmp_path: Path) -> None:
    rt = NodeRuntime(node_config(tmp_path, type="lightweight", max_memory_mb=64))
    rt._process = FakeProcess(100 * 2**20)
    res = rt.resources()
    assert res["status"] == "degraded"
    assert "max_memory_mb=64" in res["detail"]
    assert (res["rss_mb"], res["max_memory_mb"], res["threads"]) == (100.0, 64, 3)
    rt._process = FakeProcess(10 * 2**20)
    assert rt.resources()["status"] == "ok"
    assert "detail" not in rt.resources()


def test_a_training_node_bounds_its_data_caches_by_max_memory_mb(tmp_path: Path) -> None:
    from swarmlm.data.cache import process_budget, set_process_budget

    previous = set_process_budget(None)
    try:
        NodeRuntime(node_config(tmp_path, type="annotation", max_memory_mb=64))
        assert process_budget() is None  # no training: no data caches to bound
        NodeRuntime(node_config(tmp_path, type="training", max_memory_mb=512))
        budget = process_budget()
        assert budget is not None
        assert budget.cap_bytes == 512 * 2**20
    finally:
        set_process_budget(previous)


# -- peers: who votes, trains, replicates ---------------------------------------------
def node_info(sender: str, kind: str, name: str = "peer") -> Any:
    return SimpleNamespace(sender=sender, body={"type": kind, "name": name, "web_port": 0})


def test_announced_peer_types_decide_round_voter_and_curation_roles(tmp_path: Path) -> None:
    rt = NodeRuntime(node_config(tmp_path, type="annotation"))
    joined: list[Event] = []
    rt.bus.on("peer_joined", joined.append)
    for peer, kind in [("a", "full"), ("b", "training"), ("c", "annotation"), ("d", "lightweight")]:
        rt._on_node_info(node_info(peer, kind, name=f"n-{peer}"), peer)
    assert [p for p in "abcd" if rt.is_round_member(p)] == ["a", "b", "d"]
    assert [p for p in "abcd" if rt.is_voter(p)] == ["d"]
    assert [p for p in "abcd" if rt.is_curation_peer(p)] == ["a", "c"]
    assert not rt.is_round_member("unknown")
    assert not rt.is_curation_peer("unknown")
    assert [(e.data["name"], e.data["type"]) for e in joined] == [
        ("n-a", "full"),
        ("n-b", "training"),
        ("n-c", "annotation"),
        ("n-d", "lightweight"),
    ]
    rt._on_node_info(node_info("a", "full", name="n-a"), "a")  # repeated: joins once
    assert len(joined) == 4


def test_relayed_unknown_or_oversized_node_info_is_ignored(tmp_path: Path) -> None:
    rt = NodeRuntime(node_config(tmp_path, type="annotation"))
    rt._on_node_info(node_info("mallory", "full"), "a")  # signed by another peer than sent it
    rt._on_node_info(node_info("b", "coordinator"), "b")
    rt._on_node_info(node_info("c", "full", name="x" * 65), "c")
    assert rt.peer_types == {}
    assert rt.bus.recent("peer_joined") == []


def test_a_disconnected_peer_is_reported_left_and_marked(tmp_path: Path) -> None:
    rt = NodeRuntime(node_config(tmp_path, type="annotation"))
    rt._on_node_info(node_info("a" * 64, "training", name="t1"), "a" * 64)
    rt._on_disconnect("a" * 64)
    left = rt.bus.recent("peer_left")
    assert [(e.data["peer"], e.data["name"]) for e in left] == [("a" * 12, "t1")]
    assert rt.peer_types["a" * 64]["connected"] is False


# -- secrets -----------------------------------------------------------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_private_creates_an_owner_only_file_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("old", encoding="utf-8")
    os.chmod(path, 0o644)
    write_private(path, "new secret\n")
    assert path.read_text(encoding="utf-8") == "new secret\n"
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary left


def open_store(rt: NodeRuntime) -> Any:
    from swarmlm.curation.db import default_db_url
    from swarmlm.curation.store import CurationStore
    from swarmlm.p2p.identity import NodeIdentity

    identity = NodeIdentity.load_or_create(rt.dir / "identity")
    return CurationStore.open(default_db_url(rt.dir), identity)


def test_an_admin_without_a_configured_password_gets_a_random_one_in_a_private_file(
    tmp_path: Path,
) -> None:
    rt = NodeRuntime(node_config(tmp_path, type="annotation", admin_username="root-admin"))
    rt.store = open_store(rt)
    try:
        rt._ensure_admin()
        pw_file = rt.dir / "admin-password"
        assert mode(pw_file) == 0o600
        password = pw_file.read_text(encoding="utf-8").strip()
        assert len(password) >= 12
        assert rt.store.authenticate("root-admin", password).role == "admin"
        # a restart finds the account and neither changes it nor rewrites the file
        pw_file.unlink()
        rt._ensure_admin()
        assert not pw_file.exists()
        assert rt.store.authenticate("root-admin", password).role == "admin"
    finally:
        rt.store.close()


def test_a_configured_admin_password_is_used_and_no_file_written(tmp_path: Path) -> None:
    rt = NodeRuntime(
        node_config(
            tmp_path,
            type="annotation",
            admin_username="root-admin",
            admin_password="correct horse battery",
        )
    )
    rt.store = open_store(rt)
    try:
        rt._ensure_admin()
        assert not (rt.dir / "admin-password").exists()
        assert rt.store.authenticate("root-admin", "correct horse battery").role == "admin"
    finally:
        rt.store.close()


def test_two_nodes_never_share_a_generated_admin_password(tmp_path: Path) -> None:
    passwords = []
    for i in range(2):
        rt = NodeRuntime(
            validate_config(
                {
                    "node_id": f"n{i}",
                    "type": "annotation",
                    "node_dir": str(tmp_path / f"n{i}"),
                    "admin_username": "root-admin",
                }
            )
        )
        rt.store = open_store(rt)
        try:
            rt._ensure_admin()
        finally:
            rt.store.close()
        passwords.append((rt.dir / "admin-password").read_text(encoding="utf-8"))
    assert passwords[0] != passwords[1]


def test_reloading_bootstrap_peers_dials_the_new_ones(tmp_path: Path) -> None:
    r = Reloading(tmp_path, annotation_file(tmp_path, bootstrap_peers=["127.0.0.1:7001"]))
    dialled: list[tuple[str, int]] = []
    p2p = SimpleNamespace(
        config=SimpleNamespace(bootstrap=[("127.0.0.1", 7001)]),
        _spawn_dial=lambda host, port, peer: dialled.append((host, port)),
    )
    r.runtime.p2p = p2p  # type: ignore[assignment]
    r.write(annotation_file(tmp_path, bootstrap_peers=["127.0.0.1:7001", "127.0.0.1:7002"]))
    assert r.runtime.reload()
    assert p2p.config.bootstrap == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    assert ("127.0.0.1", 7002) in dialled


def test_a_lightweight_node_reloads_without_importing_torch(tmp_path: Path) -> None:
    """A shared config file may carry the trainers' aggregator parameters: a voter neither
    applies nor checks them, so a reload must not load torch (~225 MB) into it."""
    code = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from swarmlm.node.config import validate_config
        from swarmlm.node.runtime import NodeRuntime
        path = Path({str(tmp_path / "node.json")!r})
        file = {{"node_id": "light-1", "type": "lightweight",
                "node_dir": {str(tmp_path / "node")!r},
                "training": {{"config": {str(SWARM_TINY)!r},
                             "aggregator_params": {{"tau": 1.0}}}}}}
        path.write_text(json.dumps(file))
        rt = NodeRuntime(validate_config(file), config_path=path)
        file["log_level"] = "WARNING"
        path.write_text(json.dumps(file))
        assert rt.reload(), rt._reloads
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- fault tolerance of the round membership (issue 17, item 14) -------------------------------
class FakeRounds:
    """The two things health reads of a RoundProtocol: the last decided round, members."""

    def __init__(self, n: int) -> None:
        self.last_decided = 5
        self.ids = [f"{i:064x}" for i in range(n)]

    def members(self, r: int) -> list[str]:
        return self.ids


def test_health_warns_while_the_membership_tolerates_no_fault_and_clears_at_four(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = NodeRuntime(validate_config(training_file(tmp_path)))
    rt.swarm_cfg = rt._load_swarm_config()  # swarm-tiny: expect_peers = 3
    need = "(need n >= 4 for f = 1)"
    # before the swarm forms: the configured size
    h = rt.health()
    assert h["warnings"] == [f"n = 3 members tolerate no faulty or crashed member {need}"]
    json.dumps(h)
    # a formed membership of three, as the dashboard's components table shows it
    rt.swarm = SimpleNamespace(proto=FakeRounds(3))
    with caplog.at_level(logging.INFO, logger="swarmlm.node.runtime"):
        rt._swarm_event({"event": "genesis", "members": FakeRounds(3).ids, "round": 0})
    rounds = rt.health()["components"]["rounds"]
    assert (rounds["members"], rounds["faults_tolerated"]) == (3, 0)
    assert rounds["warning"] == f"n = 3 members tolerate no faulty or crashed member {need}"
    assert rounds["status"] == "ok"  # a risk, not a fault: probes stay green
    assert "genesis at round 0: n = 3 members tolerate no faulty" in caplog.text
    # a fourth member joins: the warning disappears, and the log says so
    caplog.clear()
    rt.swarm = SimpleNamespace(proto=FakeRounds(4))
    with caplog.at_level(logging.INFO, logger="swarmlm.node.runtime"):
        rt._swarm_event({"event": "round", "members_next": 4, "round": 6})
    h = rt.health()
    assert h["warnings"] == []
    assert "warning" not in h["components"]["rounds"]
    assert h["components"]["rounds"]["faults_tolerated"] == 1
    assert "after round 6: n = 4 members tolerate 1 faulty or crashed member" in caplog.text
    # one leaves again: back to the warning, logged once however many rounds report it
    caplog.clear()
    rt.swarm = SimpleNamespace(proto=FakeRounds(3))
    with caplog.at_level(logging.INFO, logger="swarmlm.node.runtime"):
        for r in (7, 8, 9):
            rt._swarm_event({"event": "round", "members_next": 3, "round": r})
    assert caplog.text.count("tolerate no faulty or crashed member") == 1
    assert rt.health()["warnings"] == [f"n = 3 members tolerate no faulty or crashed member {need}"]


def test_an_annotation_node_has_no_rounds_and_no_fault_tolerance_warning(tmp_path: Path) -> None:
    rt = NodeRuntime(node_config(tmp_path, type="annotation"))
    assert rt.health()["warnings"] == []
