"""A throwaway PostgreSQL server on a loopback port, for tests and benchmarks.

Uses Debian's server binaries (``/usr/lib/postgresql/<version>/bin``): ``initdb`` a temporary
data directory, ``pg_ctl start`` listening on 127.0.0.1 only with trust authentication, and
``pg_ctl stop`` + delete on exit. ``initdb`` refuses to run as root, so as root the server runs
as the ``postgres`` system user (created by Debian's package) through ``runuser``.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from sqlalchemy import create_engine, text

log = logging.getLogger(__name__)

SUPERUSER = "swarmlm"


class PostgresUnavailableError(RuntimeError):
    """The binaries or a non-root user to run them are missing (the message says which)."""


def find_pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise PostgresUnavailableError(
            "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin "
            "(run scripts/system-deps.sh as root to install Debian's postgresql)"
        )
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TemporaryPostgres:
    """``with TemporaryPostgres() as pg: pg.create_database("x")`` -> a SQLAlchemy URL.

    ``durable=False`` turns off fsync (tests); benchmarks keep the default durability.
    """

    def __init__(self, durable: bool = False, timeout_s: float = 60.0) -> None:
        self.bin = find_pg_bin()
        self.durable = durable
        self.timeout_s = timeout_s
        self.port = 0
        self._tmp: Path | None = None
        self._prefix: list[str] = []
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError as e:
                raise PostgresUnavailableError(
                    "running as root and there is no 'postgres' user to run initdb as"
                ) from e
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailableError("running as root and 'runuser' is not available")
            self._prefix = [runuser, "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        cmd = [*self._prefix, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr.strip()[-2000:]}"
            )

    def start(self) -> TemporaryPostgres:
        self._tmp = Path(tempfile.mkdtemp(prefix="swarmlm-pg-"))
        data = self._tmp / "data"
        if self._user is not None:
            os.chown(self._tmp, self._user.pw_uid, self._user.pw_gid)
        self._tmp.chmod(0o700)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        self.port = _free_port()
        opts = f"-h 127.0.0.1 -p {self.port} -k {self._tmp} -c max_connections=200"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(self._tmp / "server.log"),
            "-w",
            "-t",
            str(int(self.timeout_s)),
            "start",
        )
        log.info("temporary PostgreSQL on 127.0.0.1:%d (%s)", self.port, self._tmp)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+pg8000://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (letters, digits, underscore) and return its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r} must be letters, digits and '_'")
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        if self._tmp is None:
            return
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self._tmp / "data"), "-m", "fast", "stop")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log.warning("stopping temporary PostgreSQL failed: %s", e)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
