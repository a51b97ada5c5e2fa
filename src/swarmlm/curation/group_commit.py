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
ordinary transaction (SQLite: ``BEGIN IMMEDIATE``, so batches of different processes take
the write lock in turn, waiting up to the busy timeout; PostgreSQL: row locks), and each
process acknowledges only what its own commit made durable.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

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

    def _run_batch(self, batch: list[_Request]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            with self._engine.connect() as conn, conn.begin():
                tx = WriteTx(conn, self._sql)
                for fn, fut in batch:
                    if not fut.set_running_or_notify_cancel():
                        continue  # its caller gave up before we started: never run, never acked
                    # Raw savepoints: SQLAlchemy's begin_nested() costs ~0.3 ms of Python.
                    tx.cur.execute("SAVEPOINT request")
                    try:
                        result = fn(tx)
                    except Exception as e:  # delivered to the caller that sent fn
                        tx.cur.execute("ROLLBACK TO SAVEPOINT request")
                        tx.cur.execute("RELEASE SAVEPOINT request")
                        outcomes.append((fut, None, e))
                    else:
                        tx.cur.execute("RELEASE SAVEPOINT request")
                        outcomes.append((fut, result, None))
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
