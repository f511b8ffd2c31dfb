"""The web page in a real headless browser: Debian's Chromium, driven by Playwright, against a live server on
127.0.0.1. Type a prompt, press Generate, watch the progress bar and live preview move, see the image land
in the gallery (the Python API's pixels for that seed, not blank as drawn), reuse a seed; the page behind
--api-auth. Skips, saying why, only where Playwright or Chromium is not installed.

The page is driven with the functions of scripts/measure/serve_screenshot.py (the docs' screenshot)."""

import base64
import importlib.util
import io
import sys

import numpy as np
import pytest
from helpers.env import ROOT
from PIL import Image
from serve_util import pixels

from fewstep.serve.app import create_app

PlaywrightError = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright): "
                                                  "the web page is not tested in a browser").Error
pytestmark = pytest.mark.usefixtures("one_thread")


def script(name: str):
    """A module of scripts/measure, registered under its name (serve_screenshot imports serve_load)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "measure" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve_load, shot = script("serve_load"), script("serve_screenshot")
CHROMIUM = shot.find_chromium()
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install chromium): the web page is not tested in a browser",
                allow_module_level=True)


@pytest.fixture(scope="module")
def url(pipe):
    with serve_load.live_server(create_app(pipe)) as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    with shot.browser(CHROMIUM) as b:
        yield b


@pytest.fixture
def page(chromium, url):
    """The page, failing the test on any script error or console error it logs."""
    context = chromium.new_context(viewport={"width": 1000, "height": 700})
    errors = []
    context.on("weberror", lambda e: errors.append(str(e.error)))
    context.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page = shot.open_page(context, url)
    yield page
    context.close()
    assert errors == []


def src_image(card) -> Image.Image:
    src = card.locator("img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_generate_shows_progress_then_the_python_apis_image(page, pipe):
    prompt = "a large red circle on the left"
    page.fill("#prompt", prompt)
    page.fill("#seed", "7")
    page.fill("#steps", "150")  # long enough (a few s) for the page's 0.4 s progress polls
    page.select_option("#sampler_name", "Euler")
    page.click("#go")
    page.wait_for_function("() => parseFloat(document.querySelector('#bar div').style.width) > 0 && "
                           "document.getElementById('status').textContent.startsWith('step ') && "
                           "!document.getElementById('preview').hidden && "
                           "document.getElementById('go').disabled", timeout=30_000)  # no second request meanwhile
    page.wait_for_selector("#gallery .card img", timeout=60_000)
    card = page.locator("#gallery .card").first
    want = pipe(prompt, seed=7, steps=150, sampler="euler", progress=False)[0]
    got = src_image(card)
    assert got.size == (128, 128) and np.array_equal(pixels(got), pixels(want))
    assert "Seed: 7" in card.locator("pre").inner_text() and "Steps: 150" in card.locator("pre").inner_text()
    drawn = np.asarray(Image.open(io.BytesIO(card.locator("img").screenshot())).convert("RGB"), dtype=float)
    assert min(drawn.shape[:2]) >= 128 and drawn.std() > 20  # the browser drew an image, not a blank box
    assert page.locator("#bar div").evaluate("e => e.style.width") in ("0", "0px", "0%")
    assert page.is_hidden("#preview") and page.is_enabled("#go") and page.inner_text("#error") == ""


def test_reuse_seed_makes_the_same_image_again(page):
    first = shot.generate(page, "a small blue square at the top right", -1)
    button = first.get_by_role("button", name="Reuse seed")
    seed = int(button.inner_text().removeprefix("Reuse seed "))
    button.click()
    assert page.input_value("#seed") == str(seed)
    page.click("#go")
    page.wait_for_function("document.querySelectorAll('#gallery .card').length == 2")
    again = page.locator("#gallery .card").first
    assert again.get_by_role("button", name="Reuse seed").inner_text() == f"Reuse seed {seed}"
    assert np.array_equal(pixels(src_image(again)), pixels(src_image(page.locator("#gallery .card").nth(1))))
    assert pixels(src_image(again)).std() > 20


def test_the_page_behind_api_auth(chromium, pipe):
    with serve_load.live_server(create_app(pipe, api_auth="ann:pw")) as url:
        anonymous = chromium.new_context()  # no password to answer the challenge with: Chromium gives up
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            anonymous.new_page().goto(url + "/")
        anonymous.close()
        wrong = chromium.new_context(http_credentials={"username": "ann", "password": "no"})
        r = wrong.new_page().goto(url + "/")
        assert r.status == 401 and r.json()["detail"] == "Incorrect username or password"
        wrong.close()
        context = chromium.new_context(http_credentials={"username": "ann", "password": "pw"})
        page = shot.open_page(context, url)
        assert sorted(page.locator("#model option").all_inner_texts()) == ["shapes-teacher", "shapes-turbo"]
        assert page.input_value("#model") == "shapes-turbo"
        context.close()
