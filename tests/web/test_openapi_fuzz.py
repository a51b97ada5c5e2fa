"""Schemathesis fuzzes every operation in /openapi.json: no input may cause a 5xx.

Runs as an administrator (bearer token) so the admin operations are exercised too, against
a real SQLite store holding a task set of each interesting kind.
"""

from __future__ import annotations

import atexit
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from hypothesis import HealthCheck, settings

from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import WebSettings, create_app

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

_dir = Path(tempfile.mkdtemp(prefix="swarmlm-fuzz-"))
_store = CurationStore.open(
    f"sqlite:///{_dir / 'c.db'}",
    NodeIdentity.generate(),
    rng=random.Random(0),
    password_hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
)
atexit.register(lambda: (_store.close(), shutil.rmtree(_dir, ignore_errors=True)))
_ts = _store.create_task_set("fuzz", {"kind": "pairwise"}, k=2, gold_share=0.2)
_store.add_tasks(
    _ts.id,
    [
        TaskInput(content=f"q{i}", outputs=["a", "b"], gold="A" if i % 5 == 0 else None)
        for i in range(50)
    ],
)
_store.create_task_set("rating", {"kind": "rating", "min": 1, "max": 5})
_admin = _store.create_annotator("fuzzadmin", "fuzz admin password", role="admin")
TOKEN = _store.create_api_token(_admin.id)
APP = create_app(
    _store,
    WebSettings(node_dir=_dir, submit_per_second=1000.0, submit_burst=1000, login_per_minute=1000),
)

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.mark.timeout(300)
@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_input_makes_the_api_fail_with_a_server_error(case: Any) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
