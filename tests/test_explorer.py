"""`visattn explore` in a real headless browser: Debian's Chromium driven by playwright (installed by .ci/run)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

import visattn

pytest.importorskip("skimage")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server():
    from visattn.viz.server import make_server

    # Port 0: a free port; a tiny feature map so every click answers in milliseconds.
    srv = make_server("127.0.0.1", 0, grid=16, channels=8)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_map_follows_the_query_and_refuses_clearly(server):
    status, a = _get(f"{server}/api/map?block=diet&image=astronaut&x=40&y=40")
    assert status == 200 and a["grid"] == [16, 16] and a["cell"] == [1, 1] and a["finite"]
    nonzero = {(r, c) for r, row in enumerate(a["map"]) for c, v in enumerate(row) if v > 0}
    assert nonzero == {(r, c) for r in range(3) for c in range(3)}
    assert a["probs"]["keys"] == 9 and a["probs"]["source"] == "pattern"
    status, err = _get(f"{server}/api/map?block=ccnet&image=astronaut&x=1&y=1&causal=1")
    assert status == 400 and "no causal mode" in err["error"]
    status, err = _get(f"{server}/api/map?block=ccnet&image=astronaut&x=900&y=1")
    assert status == 400 and "outside the 512x512 image" in err["error"]
    status, err = _get(f"{server}/api/map?block=nope&image=astronaut&x=1&y=1")
    assert status == 400 and "unknown attention block" in err["error"]


def test_browser_two_clicks_every_block_no_console_errors(server, tmp_path):
    console: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(server + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            options = page.locator("#blocks option").evaluate_all("els => els.map(e => e.value)")
            assert options == visattn.list_attns()

            page.select_option("#blocks", "diet")
            assert "Transformer on a Diet" in page.text_content("#facts")
            results = []
            # The photo is drawn at 512x512 CSS pixels: a click at (x, y) is image pixel (x, y), cell (x//32, y//32).
            for x, y in [(100, 100), (400, 300)]:
                before = page.evaluate("window.explorer.answered")
                page.click("#photo", position={"x": x, "y": y})
                page.wait_for_function(f"window.explorer.answered > {before}", timeout=30_000)
                results.append(page.evaluate("[window.explorer.lastCell, window.explorer.lastMap]"))
            (cell_a, map_a), (cell_b, map_b) = results
            assert cell_a == [3, 3] and cell_b == [12, 9]
            assert map_a != map_b
            # The map follows the click: 1 at the clicked cell, its support the window around it.
            assert map_a[3][3] == 1.0 and map_b[9][12] == 1.0
            support_b = {(r, c) for r, row in enumerate(map_b) for c, v in enumerate(row) if v > 0}
            assert support_b == {(r, c) for r in range(8, 11) for c in range(11, 14)}

            page.check("#causal")  # diet has a causal mode: the map becomes the window's past
            page.wait_for_function("window.explorer.lastResult.causal === true", timeout=30_000)
            causal = page.evaluate("window.explorer.lastMap")
            support_c = {(r, c) for r, row in enumerate(causal) for c, v in enumerate(row) if v > 0}
            assert support_c == {(8, 11), (8, 12), (8, 13), (9, 11), (9, 12)}
            assert page.text_content("#error") == ""
        finally:
            browser.close()
    assert console == []
