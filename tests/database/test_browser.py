"""End to end in headless Chromium: ingest, save, reload the page, load, ask twice.

Runs Debian's ``chromium`` through playwright (``.ci/run`` installs both); skipped
only where chromium or playwright is missing. Screenshots of the three steps go
to ``$CODA_DB_SCREENSHOTS`` when set (``docs/`` holds the committed ones).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from coda_db.web import make_server

from database_fixtures import TEXT

QUESTIONS = ["How many gulls were on the rocks?", "Who kept the light?"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium installed")


def test_ingest_save_reload_load_and_ask_in_a_browser(db, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = os.environ.get("CODA_DB_SCREENSHOTS")
    server = make_server(db, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            page.fill("#doc-text", TEXT[:600])
            page.click("#ingest-btn")
            page.wait_for_selector("#ingest-status:has-text('tokens')", timeout=60_000)
            assert re.search(r"state \d+\.\d MB", page.inner_text("#ingest-status"))
            if shots:
                page.locator("#step-ingest").screenshot(path=f"{shots}/coda-db-1-ingest.png")
            page.fill("#save-label", "lighthouse log")
            page.click("#save-btn")
            page.wait_for_selector("#save-status:has-text('saved lighthouse log')")
            assert [e.label for e in db.list()] == ["lighthouse log"]
            db.document = None  # the server forgets the document: only the library has it
            page.reload()
            page.wait_for_selector("#entries option[value='lighthouse log']", state="attached")
            assert page.inner_text("#model-name") == db.opened.name
            option = page.inner_text("#entries option[value='lighthouse log']")
            assert " MB, " in option and "state " in option  # the state's size
            page.select_option("#entries", "lighthouse log")
            page.click("#load-btn")
            page.wait_for_selector("#load-status:has-text('loaded lighthouse log')")
            assert " MB)" in page.inner_text("#load-status")
            if shots:
                page.locator("#step-library").screenshot(path=f"{shots}/coda-db-2-library.png")
            href = page.get_attribute("#download-link", "href")
            assert href.endswith("label=lighthouse%20log")
            page.fill("#temperature", "0")
            page.fill("#max-new-tokens", "6")
            for question in QUESTIONS:  # each stays on the page with its answer
                page.fill("#question", question)
                page.click("#ask-btn")
                page.wait_for_selector(f"#qa-log .qa:nth-child(1) .q:has-text('{question}')")
                page.wait_for_selector("#ask-status:has-text('done')", timeout=60_000)
            if shots:
                page.locator("#step-ask").screenshot(path=f"{shots}/coda-db-3-ask.png")
            shown = [(page.inner_text(f"#qa-log .qa:nth-child({i}) .q"),
                      page.inner_text(f"#qa-log .qa:nth-child({i}) .a")) for i in (2, 1)]
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    for question, (asked, answer) in zip(QUESTIONS, shown):
        want = db.query(question, temperature=0.0, max_new_tokens=6)
        assert asked == f"{question} (lighthouse log)"
        assert want.text.strip() and answer.strip() == want.text.strip()
