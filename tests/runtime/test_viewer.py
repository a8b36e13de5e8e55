"""The explanation viewer end to end in headless Chromium (Debian's chromium, driven by Playwright): load the page,
upload a query, check the hits, bars, overlays and differences against the API's JSON, re-rank with a weight control,
and save a screenshot (the README's picture is made the same way from the demo's model by
benchmarks/viewer_screenshot.py)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from http_helpers import b64, call

from attrimeter.runtime.runtime import Runtime, RuntimeConfig
from attrimeter.runtime.server import RuntimeServer

CHROMIUM = next((path for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if path and Path(path).is_file()), None)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run"]
K = 8

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tiny_export, tiny_data, tmp_path_factory):
    images = sorted((tiny_data / "bounding_box_test").glob("*.jpg"))
    gallery = tmp_path_factory.mktemp("viewer") / "gallery"
    with Runtime(tiny_export, gallery, RuntimeConfig(create_gallery=True, threads=1)) as rt:
        rt.index_folder(tiny_data / "bounding_box_test", progress=False)
        assert len(rt.gallery) == len(images) > 2 * K
        with RuntimeServer(rt, port=0) as srv:
            yield srv


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        page = context.new_page()
        problems = []
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
        yield page
        context.close()
        assert not problems, problems


def _shown(page):
    """The hits as the page shows them: (id, d), and the selected hit's bars (name, contribution, width %)."""
    hits = page.eval_on_selector_all("#hits .hit", "els => els.map(e => [Number(e.dataset.id), Number(e.dataset.d)])")
    bars = page.eval_on_selector_all("#bars .bar", """els => els.map(e => [
        e.dataset.name, Number(e.dataset.contribution), parseFloat(e.style.width)])""")
    return hits, bars


def _wait_for_search(page, n):
    page.wait_for_function(f"Number(document.body.dataset.searches || 0) >= {n}", timeout=60_000)


def test_viewer_explains_and_reranks(server, tiny_data, page, tmp_path):
    page.goto(f"{server.url}/")  # redirects to /viewer/
    page.wait_for_selector("body[data-ready='true']")
    assert page.url.endswith("/viewer/")
    assert "gallery of" in page.inner_text("#status") and page.locator("#picker img").count() > 0

    query = sorted((tiny_data / "query").glob("*.jpg"))[0]
    page.set_input_files("#upload", str(query))
    _wait_for_search(page, 1)
    status, _, api = call(server, "POST", "/search", {"images": [b64(query.read_bytes())], "k": K, "overlays": 3})
    assert status == 200
    matches = api["results"][0]["matches"]
    hits, bars = _shown(page)
    assert [i for i, _ in hits] == [m["id"] for m in matches]
    np.testing.assert_allclose([d for _, d in hits], [m["d"] for m in matches], rtol=1e-5)
    # the first hit's bars: every attribute, in the API's order, contributions as sent, widths relative to the largest
    top = matches[0]["attributes"]
    assert [name for name, _, _ in bars] == [a["name"] for a in top]
    np.testing.assert_allclose([c for _, c, _ in bars], [a["contribution"] for a in top], rtol=1e-5)
    np.testing.assert_allclose([w for _, _, w in bars], [100 * a["contribution"] / top[0]["contribution"] for a in top],
                               atol=0.01)
    assert page.eval_on_selector_all("#differing li[data-name]", "els => els.map(e => e.dataset.name)") == [
        d["name"] for d in matches[0]["differing"]]
    pairs = page.locator("#overlays figure")
    assert pairs.count() == 3
    assert page.eval_on_selector_all("#overlays img", "els => els.every(e => e.complete && e.naturalWidth > 0)")
    assert page.eval_on_selector_all("#hits img", "els => els.every(e => e.complete && e.naturalWidth > 0)")

    page.locator("#hits .hit").nth(2).click()  # another hit: its own bars
    assert page.get_attribute("#detail", "data-id") == str(matches[2]["id"])
    assert [name for name, _, _ in _shown(page)[1]] == [a["name"] for a in matches[2]["attributes"]]

    # "ignore clothing colours" re-ranks live, as the API ranks with those weights at 0
    groups = {}
    for a in call(server, "GET", "/attributes")[2]["attributes"]:
        groups.setdefault(a["group"], []).append(a["name"])
    weights = {name: 0 for group in ("upper-body colour", "lower-body colour") for name in groups[group]}
    status, _, reranked = call(server, "POST", "/search", {"images": [b64(query.read_bytes())], "k": K,
                                                           "weights": weights})
    expected = [m["id"] for m in reranked["results"][0]["matches"]]
    assert expected != [m["id"] for m in matches]  # the weights matter for this query
    page.click("#ignore-colours")
    _wait_for_search(page, 2)
    hits, _ = _shown(page)
    assert [i for i, _ in hits] == expected
    assert "weighted" in page.inner_text("#ranking-note")
    assert page.locator(".weight.off").count() == 2

    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000


def test_picking_a_gallery_crop_leaves_it_out_of_its_hits(server, page):
    page.goto(f"{server.url}/viewer/")
    page.wait_for_selector("body[data-ready='true']")
    first = page.locator("#picker img").first
    picked = int(first.get_attribute("data-id"))
    first.click()
    _wait_for_search(page, 1)
    hits, _ = _shown(page)
    assert len(hits) == K and picked not in [i for i, _ in hits]
