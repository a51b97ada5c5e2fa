"""The admin and review side in a real browser: Playwright drives Debian's Chromium headless
against a live uvicorn on 127.0.0.1. The `browser`, `page` and `serve_app` fixtures are in
tests/conftest.py (skipped with a reason when Chromium or playwright is missing; screenshots
go to ``test-artifacts/web/``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from web_helpers import FAST_HASHER, PASSWORD

from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import WebSettings, create_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@dataclass
class Live:
    url: str
    store: CurationStore
    rating_set: int
    sentiment_set: int


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, serve_app: Callable[[Any], Any]
) -> Iterator[Live]:
    d = tmp_path_factory.mktemp("admin-web")
    store = CurationStore.open(
        f"sqlite:///{d / 'c.db'}",
        NodeIdentity.generate(),
        rng=random.Random(0),
        password_hasher=FAST_HASHER,
    )
    rating = store.create_task_set(
        "helpfulness", {"kind": "rating", "min": 0, "max": 10}, k=1, gold_share=0.0
    )
    store.add_tasks(rating.id, [TaskInput(content=f"answer {i}") for i in range(4)])
    sentiment = store.create_task_set(
        "sentiment",
        {"kind": "single_choice", "choices": ["positive", "negative", "neutral"]},
        k=2,
        gold_share=0.0,
    )
    store.add_tasks(
        sentiment.id,
        [
            TaskInput(content=f"review {i}: the soup was cold", external_id=f"r{i}")
            for i in range(6)
        ],
    )
    store.create_annotator("admin", PASSWORD, role="admin")
    store.create_annotator("rater", PASSWORD)
    store.create_annotator("rev", PASSWORD, role="reviewer")
    for name, answer in (("ann1", "negative"), ("ann2", "positive")):
        who = store.create_annotator(name, PASSWORD)
        while (lt := store.next_task(who.id, sentiment.id)) is not None:
            store.submit(who.id, lt.task_id, answer, 700)
    served = serve_app(create_app(store, WebSettings(node_dir=d)))
    yield Live(served.url, store, rating.id, sentiment.id)
    served.stop()
    store.close()


def log_in(page: Any, live: Live, username: str) -> None:
    page.goto(f"{live.url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(f"{live.url}/dashboard")


_CONTRAST_JS = """
(el) => {
  const rgb = (s) => (s.match(/[0-9.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  let node = el, bg = null;
  while (node) {
    const c = rgb(getComputedStyle(node).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) { bg = c.slice(0, 3); break; }
    node = node.parentElement;
  }
  bg = bg || [255, 255, 255];
  const fg = rgb(getComputedStyle(el).color).slice(0, 3);
  const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
  return (hi + 0.05) / (lo + 0.05);
}
"""


def test_admin_sub_navigation_is_readable(page: Any, live: Live) -> None:
    log_in(page, live, "admin")
    page.goto(f"{live.url}/admin")
    links = page.locator("nav.sub a")
    assert links.count() >= 3
    for i in range(links.count()):
        link = links.nth(i)
        ratio = link.evaluate(_CONTRAST_JS)
        assert ratio >= 4.5, f"{link.inner_text()!r} has contrast {ratio:.2f}:1"


def test_rating_keys_pick_the_value_pressed_on_a_zero_to_ten_scale(page: Any, live: Live) -> None:
    log_in(page, live, "rater")
    page.goto(f"{live.url}/annotate/{live.rating_set}")
    checked = "input[name=value]:checked"
    page.keyboard.press("5")
    assert page.locator(checked).get_attribute("value") == "5"
    page.keyboard.press("0")
    assert page.locator(checked).get_attribute("value") == "0"
    time.sleep(1.1)  # digits typed apart are separate choices
    page.keyboard.press("9")
    assert page.locator(checked).get_attribute("value") == "9"
    time.sleep(1.1)
    page.keyboard.press("1")
    page.keyboard.press("0")
    assert page.locator(checked).get_attribute("value") == "10"
    page.keyboard.press("Enter")
    page.wait_for_selector("#saved")
    rater = live.store.find_annotator("rater")
    values = [
        a.value for _, a in live.store.annotations(live.rating_set) if a.annotator_id == rater.id
    ]
    assert values == [10]


def test_admin_finds_a_task_and_a_reviewer_rejects_an_answer_with_the_keyboard(
    browser: Any, page: Any, live: Live
) -> None:
    log_in(page, live, "admin")
    page.goto(f"{live.url}/admin/task-sets/{live.sentiment_set}")
    page.click("#open-data-manager")
    assert "6 tasks match" in page.inner_text("#match-count")
    page.keyboard.press("/")  # jumps to the search box
    page.keyboard.type("review 3")
    page.keyboard.press("Enter")
    page.wait_for_url("**search=review+3**")
    assert "1 tasks match" in page.inner_text("#match-count")
    # a bulk action on the ticked row, from the keyboard
    page.locator("#task-table input[name=ids]").focus()
    page.keyboard.press("Space")
    page.select_option("#bulk-action", "raise_redundancy")
    page.locator("#bulk-apply").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#bulk-done")
    assert "raise_redundancy: 1 tasks" in page.inner_text("#bulk-done")
    assert "1 tasks match" in page.inner_text("#match-count")  # the filter is kept
    page.click("#task-table a")
    assert page.locator("#annotations tbody tr").count() == 2
    assert "ann1" in page.inner_text("#annotations")
    assert page.inner_text("#agreement") == "0.500"

    reviewer = browser.new_context().new_page()
    try:
        log_in(reviewer, live, "rev")
        reviewer.goto(f"{live.url}/review/{live.sentiment_set}")
        answered_by = reviewer.inner_text("#review-form strong")
        reviewer.keyboard.press("r")
        reviewer.wait_for_selector("#review-done")
        assert "rejected" in reviewer.inner_text("#review-done")
    finally:
        reviewer.context.close()
    annotator = browser.new_context().new_page()
    try:
        log_in(annotator, live, answered_by)
        assert "rejected by rev" in annotator.inner_text("#my-reviews")
    finally:
        annotator.context.close()


def test_admin_previews_an_import_resets_a_password_and_sees_charts(
    page: Any, live: Live, tmp_path: Path
) -> None:
    log_in(page, live, "admin")
    page.goto(f"{live.url}/admin")
    assert page.locator("svg[aria-label='annotations per day'] polyline").count() == 1
    page.goto(f"{live.url}/admin/task-sets/{live.sentiment_set}")
    upload = tmp_path / "new.csv"
    upload.write_text("id,text\nz1,a brand new review\nz2,another one\n")
    page.set_input_files("#import-form input[type=file]", str(upload))
    page.click("#import-preview")
    assert "2 tasks would be imported" in page.inner_text("#import-preview-result")
    assert len(live.store.list_tasks(live.sentiment_set)) == 6  # a dry run saved nothing
    # keyboard only: reach the annotator's page and reset the password
    page.goto(f"{live.url}/admin/annotators")
    page.get_by_role("link", name="rater").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/admin/annotators/*")
    page.locator("#reset-password").focus()
    page.keyboard.press("Enter")
    new_password = page.inner_text("#new-password").strip()
    assert len(new_password) >= 12
    page.context.clear_cookies()
    page.goto(f"{live.url}/login")
    page.fill("input[name=username]", "rater")
    page.fill("input[name=password]", new_password)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(f"{live.url}/dashboard")


def test_admin_edits_a_label_configuration_with_preview_and_confirmation(
    page: Any, live: Live
) -> None:
    colours = live.store.create_task_set(
        "colours", {"kind": "single_choice", "choices": ["red", "green"]}, k=1, gold_share=0.0
    )
    live.store.add_tasks(colours.id, [TaskInput(content=f"swatch {i}") for i in range(3)])
    painter = live.store.create_annotator("painter", PASSWORD)
    lt = live.store.next_task(painter.id, colours.id)
    assert lt is not None
    live.store.submit(painter.id, lt.task_id, "green", 500)
    log_in(page, live, "admin")
    page.goto(f"{live.url}/admin/task-sets/{colours.id}")
    page.click("#edit-label-config")
    page.wait_for_url(f"**/admin/task-sets/{colours.id}/label-config")
    assert page.inner_text("#config-version") == "1"
    # keyboard only: type the new schema, then Tab to Preview and press Enter
    page.locator("#label-schema").focus()
    page.keyboard.press("Control+A")
    page.keyboard.type('{"kind": "single_choice", "choices": ["red", "green", "blue"]}')
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_selector("#config-preview-result")
    assert "Choices added: blue" in page.inner_text("#config-preview-result")
    assert page.locator("#annotator-preview input[value=blue]").count() == 1
    assert live.store.get_task_set(colours.id).config_version == 1  # a preview saves nothing
    page.click("#config-save")
    page.wait_for_selector("#config-saved")
    assert "version 2" in page.inner_text("#config-saved")
    # removing "green", which the painter used, asks for confirmation first
    page.fill("#label-schema", '{"kind": "single_choice", "choices": ["red", "blue"]}')
    page.click("#config-save")
    page.wait_for_selector("#config-error")
    assert "'green' (1 annotation)" in page.inner_text("#config-error")
    assert live.store.get_task_set(colours.id).config_version == 2
    page.locator("#config-confirm").focus()
    page.keyboard.press("Space")
    page.locator("#config-save").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#config-saved")
    assert "version 3" in page.inner_text("#config-saved")
    assert "1 stored annotation" in page.inner_text("#config-stale")
    assert page.locator("#config-history tbody tr").count() == 3
    assert live.store.get_task_set(colours.id).schema.choices == ["red", "blue"]  # type: ignore[union-attr]
