"""The web page at `/`: served as one self-contained HTML file whose script only calls routes that exist,
with the request fields the API reads (no browser here: the page's behaviour is not driven)."""

import re
import shutil
import subprocess

import pytest

from fewstep.serve.a1111 import Img2Img
from fewstep.serve.ui import PAGE

FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height", "seed",
          "batch_size", "denoising_strength")


def test_the_page_is_served_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and r.text == PAGE
    assert not re.search(r"(src|href)=\"(https?:)?//", PAGE) and "import " not in PAGE  # nothing from the internet
    for field in FIELDS + ("model", "file", "mask", "source", "go", "stop", "gallery", "preview"):
        assert f'id="{field}"' in PAGE, field


def test_the_script_calls_only_existing_routes_with_the_apis_fields(client):
    script = PAGE.split("<script>")[1].split("</script>")[0]
    listed = script.split("Promise.all(")[1].split("map(")[0]  # the listings read at start-up
    ternary = re.findall(r'api\(hasSource \? "(\w+)" : "(\w+)"', script)[0]  # the generation route
    called = set(re.findall(r'api\("([\w-]+)"', script)) | set(re.findall(r'"([\w-]+)"', listed)) | set(ternary)
    assert called == {"sd-models", "options", "samplers", "schedulers", "progress", "txt2img", "img2img", "interrupt"}
    paths = client.app.openapi()["paths"]
    assert all(f"/sdapi/v1/{p}" in paths for p in called)
    assert set(FIELDS) <= Img2Img.model_fields.keys()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the script's syntax is not checked")
def test_the_script_parses(tmp_path):
    (tmp_path / "page.js").write_text(PAGE.split("<script>")[1].split("</script>")[0])
    run = subprocess.run(["node", "--check", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
