"""The screenshot of `fewstep serve`'s web page in docs/serving.md (docs/serve-ui.png): the built-in model
served on 127.0.0.1, the page opened in headless Chromium (Debian's package, driven by Playwright), a few
prompts typed and generated with fixed seeds, the window captured. The same seeds give the same images, so
the screenshot is reproducible. tests/serve/test_serve_browser.py drives the page with these functions.

Needs `pip install playwright` (Playwright's own browser download is not used: it runs the installed
Chromium, e.g. `apt-get install chromium`).

    python scripts/measure/serve_screenshot.py [--out docs/serve-ui.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

from serve_load import live_server

SHOTS = (("a large red circle on the left", 7), ("a small blue square at the top right", 3),
         ("a large yellow circle at the bottom and a small green square", 11))
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
READY = "document.getElementById('model').options.length > 0"  # the page's start-up listings arrived


def find_chromium(path: str | None = None) -> str | None:
    """`path`, or the first Chromium on PATH; None when there is none."""
    if path:
        return path if Path(path).is_file() else None
    return next((found for found in map(shutil.which, CHROMIUM) if found), None)


@contextlib.contextmanager
def browser(chromium: str):
    """Headless Chromium at `chromium` under Playwright (no sandbox: it may run as root in a container)."""
    from playwright.sync_api import sync_playwright  # optional: only the screenshot and its test need it
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def open_page(context, url: str):
    """A new page on `url`, once its model / sampler / schedule lists are filled in."""
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_function(READY)
    return page


def generate(page, prompt: str, seed: int, **fields):
    """Type `prompt` and `seed` (and `fields` by element id: inputs filled, selects chosen), press Generate,
    and wait until the new images are in the gallery, decoded; returns the newest card."""
    cards = page.locator("#gallery .card")
    before = cards.count()
    page.fill("#prompt", prompt)
    page.fill("#seed", str(seed))
    for key, value in fields.items():
        if page.locator(f"#{key}").evaluate("e => e.tagName") == "SELECT":
            page.select_option(f"#{key}", str(value))
        else:
            page.fill(f"#{key}", str(value))
    page.click("#go")
    page.wait_for_function("n => document.querySelectorAll('#gallery .card').length > n && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth)",
                           arg=before)
    return cards.first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[2] / "docs" / "serve-ui.png")
    ap.add_argument("--chromium", help="the browser's executable (default: chromium on PATH)")
    ap.add_argument("--size", default="1000x700", help="the window, WIDTHxHEIGHT")
    a = ap.parse_args()
    chromium = find_chromium(a.chromium)
    if chromium is None:
        sys.exit("no Chromium found: install it (apt-get install chromium) or name it with --chromium")
    width, height = map(int, a.size.split("x"))
    import fewstep
    from fewstep.serve.app import create_app
    with live_server(create_app(fewstep.load())) as url, browser(chromium) as b:
        page = open_page(b.new_context(viewport={"width": width, "height": height}), url)
        for prompt, seed in SHOTS:
            generate(page, prompt, seed)
        page.screenshot(path=str(a.out))
    print(f"{a.out}: {width}x{height}, {a.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
