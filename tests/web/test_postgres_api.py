"""The API over a PostgreSQL store (credential lookups take the threadpool path there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from web_helpers import FAST_HASHER, PASSWORD, make_settings

from swarmlm.curation.pgserver import PostgresUnavailableError, TemporaryPostgres
from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import create_app


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    try:
        pg = TemporaryPostgres()
    except PostgresUnavailableError as e:
        pytest.skip(f"PostgreSQL tests skipped: {e}")
    with pg:
        yield pg.create_database("web_api")


@pytest.mark.timeout(120)
def test_token_clients_annotate_on_postgresql_until_their_token_is_revoked(
    pg_url: str, tmp_path: Path
) -> None:
    store = CurationStore.open(pg_url, NodeIdentity.generate(), password_hasher=FAST_HASHER)
    try:
        ts = store.create_task_set(
            "pg", {"kind": "single_choice", "choices": ["a", "b"]}, k=2, gold_share=0.0
        )
        store.add_tasks(ts.id, [TaskInput(content=f"item {i}") for i in range(3)])
        uid = store.create_annotator("pguser", PASSWORD).id
        token = store.create_api_token(uid)
        headers = {"authorization": f"Bearer {token}"}
        with TestClient(create_app(store, make_settings(tmp_path))) as client:
            done = 0
            while (
                task := client.get(f"/api/tasks?task_set_id={ts.id}", headers=headers).json()[
                    "task"
                ]
            ) is not None:
                r = client.post(
                    "/api/submit",
                    json={"task_id": task["task_id"], "value": "a", "time_spent_ms": 3},
                    headers=headers,
                )
                assert r.status_code == 200, r.text
                done += 1
            assert done == 3 == store.count_annotations(ts.id)
            store.revoke_api_tokens(uid)
            r = client.get(f"/api/tasks?task_set_id={ts.id}", headers=headers)
            assert r.status_code == 401
    finally:
        store.close()
