"""Group commit: one writer thread runs many small write transactions under one commit.

A durable commit costs an fsync (~7-10 ms on this machine's disk), which caps a store that
commits each submission on its own at ~100 writes/s no matter how many cores serve HTTP.
Here callers hand a function to :meth:`GroupCommitter.run` and block; the writer thread
takes every request waiting (up to ``max_batch``), runs each inside its own SAVEPOINT (a
failing request is rolled back alone and gets its exception), commits once, and only then
wakes the callers. So a call that returns has been committed durably, and a call that
raises has changed nothing. The queue is bounded: when full, callers wait up to ``timeout``
and then get :class:`StoreBusyError`.

Several server processes may each run a committer on the same database: every batch is one
ordinary transaction, and each process acknowledges only what its own commit made durable.
Batches of different processes take turns: on SQLite through an exclusive ``flock`` on
``<database>-writer.lock`` and then ``BEGIN IMMEDIATE`` (waiting up to the busy timeout for
writers outside the group commit), on PostgreSQL through a transaction-scoped advisory lock.
Without that lock, two batches touching the same task and annotator rows in different orders
deadlock (measured: with two workers, within seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: SQLite's busy timeout alone
    fcntl = None  # type: ignore[assignment]
from sqlalchemy.exc import DBAPIError

from swarmlm.curation.db import RawSql
from swarmlm.curation.errors import CurationError

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreBusyError(CurationError):
    """The write queue stayed full (or the writer stopped) for longer than the timeout."""


class WriteTx:
    """What a request sees of the group transaction: a DB-API cursor (hot paths, via
    :meth:`execute`) and the SQLAlchemy connection of the same transaction (``conn``)."""

    def __init__(self, conn: Connection, sql: RawSql) -> None:
        self.conn = conn
        self.sql = sql
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        self.cur: Any = dbapi_conn.cursor()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run ``sql`` (``?`` placeholders, see :class:`RawSql`); returns the cursor."""
        self.cur.execute(self.sql.q(sql), tuple(params))
        return self.cur

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of ``sql`` or ``None`` (the rest, if any, is discarded)."""
        self.cur.execute(self.sql.q(sql), tuple(params))
        row = self.cur.fetchone()
        if row is not None:
            self.cur.fetchall()
        return row


_Request = tuple[Callable[[WriteTx], Any], "Future[Any]"]
_RETRIES = 5
_PG_BATCH_LOCK = 0x53574C4D_00000001  # advisory lock key: "SWLM", batch writer
# PostgreSQL: deadlock detected, serialization failure
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})


def _sqlstate(e: BaseException) -> str | None:
    """The SQLSTATE of a driver error (pg8000 puts its fields in ``args[0]``), if any."""
    if isinstance(e, DBAPIError) and e.orig is not None:
        e = e.orig
    code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
    if code is None and e.args and isinstance(e.args[0], dict):
        code = e.args[0].get("C")
    return code if isinstance(code, str) else None


def _is_transient(e: BaseException) -> bool:
    return _sqlstate(e) in _TRANSIENT_SQLSTATES


class _FileLock:
    """An exclusive ``flock`` on ``path`` (held per batch; a no-op without ``fcntl``).

    Batches of several processes on one SQLite file queue here rather than in SQLite's busy
    handler, which polls with sleeps growing to 100 ms: a process that lost the race kept
    sleeping while the other committed batch after batch (measured with two web workers:
    submit p99 400-900 ms; with this lock 160-270 ms, in alternating runs). A kernel lock
    wakes the next waiter as soon as it is released.
    """

    def __init__(self, path: str | None) -> None:
        self._fd: int | None = None
        if path is not None and fcntl is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sqlite_writer_lock(engine: Engine) -> _FileLock:
    """``<database file>-writer.lock`` for a SQLite file; a no-op lock otherwise."""
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    if not db or db == ":memory:":
        return _FileLock(None)
    return _FileLock(f"{db}-writer.lock")


class GroupCommitter:
    def __init__(
        self,
        engine: Engine,
        sql: RawSql,
        *,
        max_batch: int = 64,
        queue_size: int = 4096,
        timeout_s: float = 30.0,
    ) -> None:
        self._engine = engine
        self._sql = sql
        self._max_batch = max_batch
        self._timeout = timeout_s
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.batches = 0
        self.requests = 0
        self._writer_lock = _sqlite_writer_lock(engine)

    def run(self, fn: Callable[[WriteTx], T]) -> T:
        """Run ``fn(tx)`` in the next group transaction; return once it is committed."""
        self._ensure_started()
        fut: Future[T] = Future()
        try:
            self._queue.put((fn, fut), timeout=self._timeout)
        except queue.Full as e:
            raise StoreBusyError(
                f"write queue full for {self._timeout:.0f} s; the store is overloaded"
            ) from e
        try:
            return fut.result(timeout=self._timeout * 4)
        except TimeoutError as e:
            raise StoreBusyError("write did not complete in time") from e

    async def run_async(self, fn: Callable[[WriteTx], T]) -> T:
        """:meth:`run` for an event loop: awaits the commit without holding a thread.

        A caller cancelled before the writer took its request is dropped unexecuted (and was
        never acknowledged); once the writer has started it, it completes and commits.
        """
        self._ensure_started()
        fut: Future[T] = Future()
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                self._queue.put_nowait((fn, fut))
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    raise StoreBusyError(
                        f"write queue full for {self._timeout:.0f} s; the store is overloaded"
                    ) from None
                await asyncio.sleep(0.005)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self._timeout * 4)
        except TimeoutError as e:
            raise StoreBusyError("write did not complete in time") from e

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._stopped:
                raise StoreBusyError("the store is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="curation-writer", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=self._timeout)
        if thread is None or not thread.is_alive():
            self._writer_lock.close()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                return

    def _run_one(self, tx: WriteTx, fn: Callable[[WriteTx], Any]) -> tuple[Any, Exception | None]:
        """Run one request in its own savepoint; ``(result, None)`` or ``(None, error)``.

        Batches of several processes on PostgreSQL lock rows in different orders and can
        deadlock; the database then fails one statement of one of them. Rolling back to the
        savepoint releases what this request had locked (so the other batch proceeds), and
        the request runs again, up to ``_RETRIES`` times.
        """
        for attempt in range(_RETRIES + 1):
            # Raw savepoints: SQLAlchemy's begin_nested() costs ~0.3 ms of Python.
            tx.cur.execute("SAVEPOINT request")
            try:
                result = fn(tx)
            except Exception as e:
                tx.cur.execute("ROLLBACK TO SAVEPOINT request")
                tx.cur.execute("RELEASE SAVEPOINT request")
                if attempt < _RETRIES and _is_transient(e):
                    log.info("write request retried after %s", _sqlstate(e))
                    continue
                return None, e  # delivered to the caller that sent fn
            tx.cur.execute("RELEASE SAVEPOINT request")
            return result, None
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_batch(self, batch: list[_Request]) -> None:
        outcomes: list[tuple[Future[Any], Any, Exception | None]] = []
        try:
            with self._writer_lock, self._engine.connect() as conn, conn.begin():
                tx = WriteTx(conn, self._sql)
                if not self._sql.is_sqlite:
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (_PG_BATCH_LOCK,))
                    tx.cur.fetchall()
                for fn, fut in batch:
                    if not fut.set_running_or_notify_cancel():
                        continue  # its caller gave up before we started: never run, never acked
                    outcomes.append((fut, *self._run_one(tx, fn)))
        except Exception as e:  # the commit itself failed: nothing in the batch happened
            log.error("group commit of %d writes failed: %s", len(batch), e)
            for _, fut in batch:
                if not fut.done():
                    if not fut.running():  # never started (the commit failed first)
                        fut.set_running_or_notify_cancel()
                    fut.set_exception(e)
            return
        self.batches += 1
        self.requests += len(batch)
        for fut, result, exc in outcomes:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
