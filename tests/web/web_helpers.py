"""Helpers shared by the web tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient

from swarmlm.curation.store import CurationStore
from swarmlm.web import WebSettings

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "correct horse battery"


@dataclass
class Web:
    store: CurationStore
    app: FastAPI
    settings: WebSettings
    client: Callable[[], TestClient]
    task_set_id: int


def form_token(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "page has no CSRF token field"
    return m.group(1)


def register(client: TestClient, username: str, password: str = PASSWORD) -> None:
    token = form_token(client.get("/register").text)
    r = client.post(
        "/register", data={"username": username, "password": password, "csrf_token": token}
    )
    assert r.status_code == 200, r.text
    assert r.url.path == "/dashboard"


def login(client: TestClient, username: str, password: str = PASSWORD) -> None:
    token = form_token(client.get("/login").text)
    r = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )
    assert r.url.path == "/dashboard", r.text


def api_token(client: TestClient, username: str, password: str = PASSWORD) -> str:
    r = client.post("/api/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    return token


def make_settings(tmp_path: Path, **overrides: object) -> WebSettings:
    return WebSettings(node_dir=tmp_path, **overrides)  # type: ignore[arg-type]
