"""Fixtures for the web app tests: a real SQLite store behind the real FastAPI app."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from web_helpers import FAST_HASHER, PASSWORD, Web, make_settings

from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import create_app


@pytest.fixture
def make_web(tmp_path: Path) -> Iterator[Callable[..., Web]]:
    stores: list[CurationStore] = []

    def _make(**overrides: object) -> Web:
        store = CurationStore.open(
            f"sqlite:///{tmp_path / f'web{len(stores)}.db'}",
            NodeIdentity.generate(),
            rng=random.Random(0),
            password_hasher=FAST_HASHER,
        )
        stores.append(store)
        settings = make_settings(tmp_path, **overrides)
        app = create_app(store, settings)
        ts = store.create_task_set(
            "sentiment",
            {"kind": "single_choice", "choices": ["positive", "negative", "neutral"]},
            k=2,
            gold_share=0.0,
        )
        store.add_tasks(ts.id, [TaskInput(content=f"review number {i}") for i in range(6)])
        store.create_annotator("admin", PASSWORD, role="admin")
        return Web(store, app, settings, lambda: TestClient(app), ts.id)

    yield _make
    for s in stores:
        s.close()


@pytest.fixture
def web(make_web: Callable[..., Web]) -> Web:
    return make_web()
