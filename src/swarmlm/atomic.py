"""Atomic file writes, the one way swarmlm replaces a file on disk.

A crash, a full disk or a concurrent writer must never leave a reader with half a file: every
write goes to a temporary file with a unique name in the target's folder (same filesystem, so
the rename is atomic; unique, so two writers never share one), the file is fsynced, given its
final permissions, renamed over the target, and the folder is fsynced so the rename itself
survives a power loss. Secrets pass ``mode=0o600``: the temporary file is private from its
first byte (``mkstemp`` creates it 0600), so a key is never readable by others, even briefly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal, cast, overload

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "fsync_dir",
]


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames and creations inside ``path`` durable (a no-op where folders cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write by any means (``save_file``, ``torch.save``); on a
    clean exit it replaces ``path``, on an exception it is removed and ``path`` is untouched.

    ``mode`` is the final permission bits; None means the usual ``0666 & ~umask``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, (0o666 & ~current_umask()) if mode is None else mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


@overload
def atomic_open(
    path: str | os.PathLike[str], *, binary: Literal[False] = ..., mode: int | None = ...
) -> contextlib.AbstractContextManager[IO[str]]: ...
@overload
def atomic_open(
    path: str | os.PathLike[str], *, binary: Literal[True], mode: int | None = ...
) -> contextlib.AbstractContextManager[IO[bytes]]: ...
def atomic_open(
    path: str | os.PathLike[str], *, binary: bool = False, mode: int | None = None
) -> contextlib.AbstractContextManager[IO[str]] | contextlib.AbstractContextManager[IO[bytes]]:
    """A file object (UTF-8 text, or bytes with ``binary=True``) for streaming writes that
    replace ``path`` atomically when the block ends without an exception."""
    return cast(
        "contextlib.AbstractContextManager[IO[str]] | contextlib.AbstractContextManager[IO[bytes]]",
        _atomic_open(path, binary, mode),
    )


@contextlib.contextmanager
def _atomic_open(
    path: str | os.PathLike[str], binary: bool, mode: int | None
) -> Iterator[IO[str] | IO[bytes]]:
    with atomic_path(path, mode=mode) as tmp:
        fh: IO[str] | IO[bytes]
        fh = open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8")  # noqa: SIM115
        with fh:
            yield fh


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, mode: int | None = None
) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, never a mix."""
    with atomic_open(path, binary=True, mode=mode) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8): readers see the old or the new file."""
    with atomic_open(path, mode=mode) as fh:
        fh.write(text)
