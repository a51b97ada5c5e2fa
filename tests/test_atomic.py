"""swarmlm.atomic: the one way a file is replaced on disk."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from swarmlm.atomic import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old\n")

    def write_half_then_fail() -> None:
        with atomic_open(target) as fh:
            fh.write("half of the new")
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        write_half_then_fail()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_secrets_are_owner_only_and_other_files_follow_the_umask(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "key.pem"  # the folder is created
    atomic_write_bytes(key, b"secret", mode=0o600)
    assert mode_of(key) == 0o600
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "config.yaml") == 0o644


def test_concurrent_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Two writers of one path (a fixed temp name let them truncate each other's half-written
    file): every reader sees one writer's whole content."""
    target = tmp_path / "latest"
    payloads = [f"{i}" * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_text, args=(target, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_atomic_path_lets_any_writer_fill_the_file(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp != target
        tmp.write_bytes(b"\x00\x01")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == b"\x00\x01"
