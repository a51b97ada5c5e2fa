"""Fixtures shared across test packages."""

from __future__ import annotations

import gzip
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

KJV = Path(__file__).resolve().parents[1] / "data" / "kjv.txt.gz"


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared corpus: the first ~3,000 verses of the KJV, BPE vocabulary 512."""
    from swarmlm.data import prepare_corpus

    root = tmp_path_factory.mktemp("corpus")
    lines = gzip.decompress(KJV.read_bytes()).decode("utf-8").splitlines()[:3000]
    text = root / "kjv-head.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "prepared"
    prepare_corpus([text], out, vocab_size=512, val_fraction=0.05, seed=0)
    return out


# -- browser tests ---------------------------------------------------------------------------
# Playwright drives Debian's Chromium headless (see ../shared/KNOWN.md for why these flags)
# against the real app served by uvicorn on 127.0.0.1. Used by tests/web/test_*_browser.py
# and tests/integration/test_web_browser.py; a test asking for `page` is skipped, with the
# reason, when /usr/bin/chromium or playwright is missing.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_ARTIFACTS = Path(os.environ.get("SWARMLM_ARTIFACTS", "test-artifacts")) / "web"


class ServedApp:
    """An ASGI app served by uvicorn on a free loopback port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def serve_app() -> Iterator[Callable[[Any], ServedApp]]:
    """Start apps with ``serve_app(app)``; each is stopped by ``.stop()`` or at module end."""
    served: list[ServedApp] = []

    def _serve(app: Any) -> ServedApp:
        served.append(ServedApp(app))
        return served[-1]

    yield _serve
    for s in served:
        s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip("browser tests need /usr/bin/chromium (run scripts/system-deps.sh as root)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context and page; a full-page screenshot is kept after the test."""
    BROWSER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    yield pg
    pg.screenshot(path=str(BROWSER_ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


@pytest.fixture
def browser_artifacts() -> Path:
    """Where browser tests keep screenshots."""
    BROWSER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return BROWSER_ARTIFACTS
