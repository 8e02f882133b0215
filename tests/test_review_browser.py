"""The review app in a real browser: Debian's chromium driven by Playwright (no browser download; the
Makefile's `test` target installs chromium with apt when it is absent). A curator reviews three faces
with the keyboard; the page, the screenshot and the `reviews` table must show the decisions."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from review_fixtures import ReviewCatalog, write_review_catalog

from app.review.service import ReviewService
from app.review.web import HOST, create_app


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "CHROMIUM MISSING: the real-browser review test needs Debian's chromium "
        "(`apt-get install -y chromium`; `make test` installs it when it can); test skipped"
    )


@pytest.fixture
def review(tmp_path: Path) -> ReviewCatalog:
    return write_review_catalog(str(tmp_path / "src"), str(tmp_path / "out"))


@pytest.fixture
def app_url(review: ReviewCatalog) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port) in a thread, as `dynface review` serves it."""
    import uvicorn

    service = ReviewService(review.catalog, reviewer="curator")
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=HOST, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the review server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://{HOST}:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_curator_reviews_three_faces_with_the_keyboard(review, app_url, tmp_path):
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="PLAYWRIGHT MISSING: pip install '.[dev]'")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{app_url}/")
        cards = page.locator(".card")
        assert cards.count() == 7
        decision = "i => document.querySelectorAll('.card')[i].dataset.decision"

        page.keyboard.press("a")  # the riskiest face is selected first
        page.wait_for_function(f"({decision})(0) === 'accept'")
        page.keyboard.press("n")
        page.keyboard.type("eyes changed shape")
        page.keyboard.press("Enter")
        page.keyboard.press("r")
        page.wait_for_function(f"({decision})(1) === 'reject'")
        page.keyboard.press("s")
        page.wait_for_function(f"({decision})(2) === 'skip'")
        page.wait_for_function("document.getElementById('count-reviewed').textContent === '2'")
        page.wait_for_function(
            "Array.from(document.querySelectorAll('.card img')).every(i => i.complete && i.naturalWidth > 0)"
        )

        badges = [cards.nth(i).locator("[data-role=decision]").text_content() for i in range(4)]
        assert badges == ["accept", "reject", "skip", "undecided"]
        assert cards.nth(1).locator("[data-role=note]").text_content() == "eyes changed shape"
        assert page.locator("#count-to-review").text_content() == "4"
        assert page.locator("#count-skipped").text_content() == "1"
        assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [2, 6]
        assert "selected" in (cards.nth(3).get_attribute("class") or "")  # the next face to review

        shot = tmp_path / "review-grid.png"
        page.screenshot(path=str(shot), full_page=True)
        with Image.open(shot) as im:
            assert im.size[0] == 1280 and im.size[1] >= 900

        page.keyboard.press("o")  # the selected face, with its whole photo and box
        page.wait_for_selector("h1")
        assert page.locator("h1").text_content() == "two.png · face 0"
        page.wait_for_function("document.getElementById('photo').naturalWidth === 300")
        assert page.locator(".box.current").count() == 1
        page.keyboard.press("Escape")
        page.wait_for_selector("#grid")
        browser.close()

    reviews = review.catalog.read("reviews").sort_values("decided_at")
    by_face = {f"{f.name}#{f.face_index}": (f.image_id, f.face_index) for f in review.faces.values()}
    got = [
        (r.image_id, r.face_index, r.decision, r.note if isinstance(r.note, str) else None, r.reviewer)
        for r in reviews.itertuples()
    ]
    assert got == [
        (*by_face["two.png#1"], "accept", None, "curator"),
        (*by_face["one.jpg#0"], "reject", "eyes changed shape", "curator"),
        (*by_face["whole.png#0"], "skip", None, "curator"),
    ]
