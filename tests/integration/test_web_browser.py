"""Browser tests: Playwright drives Debian's Chromium (headless) against a live uvicorn server.

Skipped with a reason when /usr/bin/chromium or the playwright package is missing (run
scripts/system-deps.sh as root to install Chromium). Screenshots are kept under
``test-artifacts/web/`` (or ``$SWARMLM_ARTIFACTS/web``) for inspection.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import WebSettings, create_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


@dataclass
class LiveServer:
    url: str
    store: CurationStore
    task_set_id: int
    xss_task_set_id: int


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, serve_app: Callable[[Any], Any]
) -> Iterator[LiveServer]:
    d = tmp_path_factory.mktemp("web")
    store = CurationStore.open(
        f"sqlite:///{d / 'c.db'}",
        NodeIdentity.generate(),
        rng=random.Random(0),
        password_hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
    )
    ts = store.create_task_set(
        "sentiment",
        {"kind": "single_choice", "choices": ["positive", "negative", "neutral"]},
        k=3,
        gold_share=0.0,
    )
    store.add_tasks(ts.id, [TaskInput(content=f"Review {i}: it was fine.") for i in range(5)])
    xss = store.create_task_set("xss", {"kind": "pairwise"}, k=1, gold_share=0.0)
    store.add_tasks(xss.id, [TaskInput(content={"prompt": XSS}, outputs=[XSS, "plain"])])
    # a rival already on the leaderboard with 2 points
    rival = store.create_annotator("rival", "rival password")
    for _ in range(2):
        lt = store.next_task(rival.id, ts.id)
        assert lt is not None
        store.submit(rival.id, lt.task_id, "neutral", 100)
    served = serve_app(create_app(store, WebSettings(node_dir=d)))
    yield LiveServer(served.url, store, ts.id, xss.id)
    served.stop()
    store.close()


def _points_of(page: Any, name: str) -> int:
    row = page.locator("#leaderboard tr", has=page.locator("td.name", has_text=name))
    return int(row.locator("td.points").inner_text())


def test_register_annotate_three_tasks_by_keyboard_and_climb_the_leaderboard(
    live: LiveServer, page: Any, browser_artifacts: Path
) -> None:
    page.goto(f"{live.url}/register")
    # keyboard only: the username field has autofocus
    page.keyboard.type("keyboarder")
    page.keyboard.press("Tab")
    page.keyboard.type("typing is fun")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live.url}/dashboard")
    page.goto(f"{live.url}/leaderboard")
    assert _points_of(page, "keyboarder") == 0
    assert _points_of(page, "rival") == 2
    page.screenshot(path=str(browser_artifacts / "leaderboard_before.png"))

    page.goto(f"{live.url}/annotate/{live.task_set_id}")
    for n in range(3):
        page.wait_for_selector("#annotate-form")
        page.keyboard.press("2")  # second choice: "negative"
        assert page.locator('input[data-key="2"]').is_checked()
        page.keyboard.press("Enter")
        page.wait_for_selector("#saved")
        assert "Saved" in page.inner_text("#saved"), f"submission {n + 1}"
    page.screenshot(path=str(browser_artifacts / "annotate_after_three.png"))

    values = [a.value for _, a in live.store.annotations(live.task_set_id)]
    assert values.count("negative") == 3
    spent = [a.time_spent_ms for _, a in live.store.annotations(live.task_set_id)]
    assert all(s > 0 for s in spent[-3:])  # the page timed each annotation

    page.goto(f"{live.url}/leaderboard")
    assert _points_of(page, "keyboarder") >= 3
    first = page.locator("#leaderboard tbody tr").first.locator("td.name").inner_text()
    assert first == "keyboarder"


def test_skip_key_moves_on_without_annotating(live: LiveServer, page: Any) -> None:
    live.store.create_annotator("skipper", "skipper password")
    page.goto(f"{live.url}/login")
    page.fill("#username", "skipper")
    page.fill("#password", "skipper password")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live.url}/dashboard")
    page.goto(f"{live.url}/annotate/{live.task_set_id}")
    before = page.locator('input[name="task_id"]').get_attribute("value")
    page.keyboard.press("s")
    page.wait_for_selector("#saved")
    assert page.inner_text("#saved") == "Skipped."
    after = page.locator('input[name="task_id"]').get_attribute("value")
    assert after != before


def test_script_inside_task_content_stays_inert(live: LiveServer, page: Any) -> None:
    live.store.create_annotator("target", "target password")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{live.url}/login")
    page.fill("#username", "target")
    page.fill("#password", "target password")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live.url}/dashboard")
    page.goto(f"{live.url}/annotate/{live.xss_task_set_id}")
    page.wait_for_selector("#task-content")
    page.wait_for_timeout(300)
    assert page.title() != "pwned"
    assert dialogs == []
    # the payload is shown as text, not parsed into elements
    assert page.locator("#task-content img").count() == 0
    assert page.locator("main script").count() == 0
    assert "<script>" in page.inner_text("#task-content")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.wait_for_selector("#all-done")
    ((_, ann),) = live.store.annotations(live.xss_task_set_id)
    assert ann.value == "B"
