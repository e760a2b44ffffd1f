"""A real browser (Debian's headless Chromium, driven by Playwright) uses the web app: uploads an image, asks a
question, sees the reply arrive in pieces and equal to a ChatSession's, and saves screenshots at laptop and phone
sizes (into $BLIP2_SCREENSHOTS when set, e.g. docs/images). Skipped, with the reason, where Chromium is missing."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from blip2.serve.prompts import UserImage

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="no Chromium: `apt-get install -y chromium` (CI's .ci/run installs it)")  # fmt: skip
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]  # fmt: skip
LAST_REPLY = "() => { const all = document.querySelectorAll('#chatbot .bot-row .message-content');" \
             " return all.length ? all[all.length - 1].innerText.trim() : ''; }"
HANG_GUARD_MS = 300_000  # not a speed limit: only so that a broken page fails instead of hanging


def upload_and_ask(page, url: str, photo: Path, question: str):
    """Open the app in ``page``, upload ``photo`` and send ``question``; returns the page."""
    page.set_default_timeout(HANG_GUARD_MS)
    page.goto(url + "/")
    page.locator("#image input[type=file]").set_input_files(str(photo))
    page.wait_for_selector("#image img")
    page.locator("#question textarea").fill(question)
    page.locator("#question textarea").press("Enter")
    return page


def test_upload_ask_and_watch_the_reply_stream(serve, pngs, tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    server, engine = serve("llama", web_app=True)
    forward = engine.llm.model.forward

    def slow_forward(*args, **kwargs):  # ~40 ms per token, so that the page shows the reply growing
        time.sleep(0.04)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.llm.model, "forward", slow_forward)
    photo = tmp_path / "photo.png"
    photo.write_bytes(pngs[0])
    question = "what is on the mat"
    expected = engine.pipe.chat(UserImage.from_bytes(pngs[0], 10**7).image).ask(question, max_new_tokens=64)
    assert len(expected.split()) >= 3
    shots = Path(os.environ.get("BLIP2_SCREENSHOTS") or tmp_path)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            laptop = browser.new_page(viewport={"width": 1280, "height": 760})
            page = upload_and_ask(laptop, server.url, photo, question)
            page.wait_for_function(f"full => {{ const t = ({LAST_REPLY})(); return t.length > 0 && t !== full; }}",
                                   arg=expected)  # part of the reply, not all of it yet: it streams
            page.wait_for_function(f"full => ({LAST_REPLY})() === full", arg=expected)
            assert page.locator("#chatbot .user-row").last.inner_text().strip() == question
            page.screenshot(path=str(shots / "serve_app.png"))
            phone = upload_and_ask(browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True,
                                                    has_touch=True), server.url, photo, question)  # fmt: skip
            phone.wait_for_function(f"full => ({LAST_REPLY})() === full", arg=expected)
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # one column, no sideways scrolling
            phone.screenshot(path=str(shots / "serve_app_phone.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "serve_app.png").stat().st_size > 10_000 and (shots / "serve_app_phone.png").stat().st_size > 10_000
