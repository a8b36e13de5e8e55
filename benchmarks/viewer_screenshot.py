"""The README's picture of the explanation viewer (benchmarks/results/viewer.png).

Serves an export and a gallery on loopback, opens the viewer in headless Chromium (Debian's ``chromium`` driven by
Playwright; no browser is downloaded), uploads a query crop, shows the hit chosen with ``--hit`` and takes a screenshot
of the whole page::

    python benchmarks/viewer_screenshot.py --export runs/demo/export --gallery runs/demo/gallery \
        --query runs/demo/data/query/0004_c1s2_217901_01.jpg --hit 6 --out benchmarks/results/viewer.png

The README's picture was made so from a clean-clone ``make demo``'s export and gallery (8734681).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from attrimeter.runtime.runtime import Runtime
from attrimeter.runtime.server import RuntimeServer

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, type=Path)
    parser.add_argument("--gallery", required=True, type=Path)
    parser.add_argument("--query", required=True, type=Path, help="query crop to upload")
    parser.add_argument("--hit", type=int, default=1, help="which hit to show in detail (1 = the best)")
    parser.add_argument("--ignore-colours", action="store_true", help="click 'Ignore clothing colours' first")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/viewer.png"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with Runtime(args.export, args.gallery) as rt, RuntimeServer(rt, port=0) as server, \
            tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=FLAGS, viewport={"width": 1360, "height": 900})
        page = context.new_page()
        page.goto(f"{server.url}/viewer/")
        page.wait_for_selector("body[data-ready='true']")
        page.set_input_files("#upload", str(args.query))
        page.wait_for_function("Number(document.body.dataset.searches || 0) >= 1", timeout=120_000)
        if args.ignore_colours:
            page.click("#ignore-colours")
            page.wait_for_function("Number(document.body.dataset.searches || 0) >= 2", timeout=120_000)
        page.locator("#hits .hit").nth(args.hit - 1).click()
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        context.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
