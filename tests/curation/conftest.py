"""Fixtures for the curation store tests: every store test runs on SQLite and PostgreSQL.

The PostgreSQL server is real: started once per session on a loopback port with its own data
directory (see ``swarmlm.curation.pgserver``); each test gets a fresh database in it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import Connection, insert

from swarmlm.curation.models import TaskSet
from swarmlm.curation.pgserver import PostgresUnavailableError, TemporaryPostgres
from swarmlm.curation.replica import ReplicaRecord, decode_record
from swarmlm.curation.store import CurationStore
from swarmlm.p2p.identity import NodeIdentity

# Cheap argon2 parameters: the tests exercise the logic, not the hash's cost.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
_db_counter = itertools.count()


class FakeClock:
    """A settable UTC clock so lease expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def postgres() -> Iterator[TemporaryPostgres]:
    try:
        pg = TemporaryPostgres()
    except PostgresUnavailableError as e:
        pytest.skip(f"PostgreSQL tests skipped: {e}")
    with pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'curation.db'}"
    pg: TemporaryPostgres = request.getfixturevalue("postgres")
    return pg.create_database(f"test_{next(_db_counter)}")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def identity() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture
def make_store(
    db_url: str, identity: NodeIdentity, clock: FakeClock
) -> Iterator[Callable[..., CurationStore]]:
    opened: list[CurationStore] = []

    def _make(seed: int = 0) -> CurationStore:
        s = CurationStore.open(
            db_url, identity, rng=random.Random(seed), password_hasher=FAST_HASHER, clock=clock
        )
        opened.append(s)
        return s

    yield _make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store: Callable[..., CurationStore]) -> CurationStore:
    return make_store()


def insert_old_task_set(conn: Connection, schema: dict[str, Any], k: int = 2) -> None:
    """A task set row as revisions before 0007 wrote it (for the upgrade tests)."""
    conn.execute(
        insert(TaskSet.__table__).values(
            name="old",
            description="",
            label_schema=schema,
            k=k,
            max_annotations=2 * k,
            agreement_threshold=0.0,
            gold_share=0.0,
            lease_seconds=600,
            active=True,
            created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        )
    )


def replicated_node(tmp_path: Path, name: str) -> CurationStore:
    """A replicating store of its own (SQLite file ``<name>.db``, its own identity): one node
    of a replication test."""
    return CurationStore.open(
        f"sqlite:///{tmp_path / name}.db",
        NodeIdentity.generate(),
        rng=random.Random(0),
        password_hasher=FAST_HASHER,
        replicated=True,
    )


def held_records(store: CurationStore) -> list[ReplicaRecord]:
    """Every replica record ``store`` holds, decoded (what it would send a peer)."""
    return [decode_record(r) for r in store.get_records(store.record_digests())]
