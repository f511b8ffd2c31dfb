"""The real `webuiapi` client (PyPI), unchanged, against a live uvicorn server on 127.0.0.1: txt2img,
img2img and inpainting, options (switching the model), png-info, progress / interrupt while a job runs, and
a job stopped when its client disconnects."""

import socket
import threading
import time

import numpy as np
import pytest
import requests
import uvicorn
from PIL import Image
from serve_util import pixels

from fewstep.serve.app import create_app

webuiapi = pytest.importorskip("webuiapi")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(pipe):
    """A live server on a free loopback port, in a thread, shut down after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    live = uvicorn.Server(uvicorn.Config(create_app(pipe, api_auth="ann:pw"), host="127.0.0.1", port=port,
                                         log_level="warning"))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not live.started and time.monotonic() < end:
        time.sleep(0.02)
    assert live.started
    yield port
    live.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server, sampler="LCM", steps=2, username="ann", password="pw")


def test_txt2img_through_webuiapi_is_the_python_api_image(api, pipe):
    result = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, cfg_scale=0, batch_size=2)
    want = pipe("a red circle", seed=5, steps=2, width=64, height=64, guidance=0, num_images=2, sampler="lcm",
                progress=False)
    assert [pixels(im).tolist() for im in result.images] == [pixels(im).tolist() for im in want]
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "LCM"
    assert result.info["ignored"] == []  # webuiapi sends A1111's defaults of what fewstep ignores
    assert result.images[0].info["parameters"] == want[0].info["parameters"]
    assert api.png_info(result.images[0]).info == want[0].info["parameters"]


def test_img2img_and_inpainting_through_webuiapi(api, pipe):
    source = pipe("a blue square", seed=2, progress=False)[0]
    result = api.img2img(images=[source], prompt="a red circle", denoising_strength=0.5, steps=4, seed=3, width=128,
                         height=128, cfg_scale=0)
    want = pipe("a red circle", image=source, strength=0.5, seed=3, steps=4, guidance=0, sampler="lcm",
                progress=False)[0]
    assert np.array_equal(pixels(result.image), pixels(want))
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (32, 32, 96, 96))
    result = api.img2img(images=[source], mask_image=mask, prompt="a red circle", inpainting_fill=1, steps=4, seed=3,
                         width=128, height=128, cfg_scale=0)
    assert result.image.size == (128, 128) and result.info["ignored"] == []
    assert np.array_equal(pixels(result.image)[:16], pixels(source)[:16])  # outside the mask: the source


def test_options_and_models_through_webuiapi(api):
    assert api.util_get_current_model() == "shapes-turbo"
    assert api.util_get_model_names() == ["shapes-teacher", "shapes-turbo"]
    api.util_set_model("shapes-teacher")
    assert api.get_options()["sd_model_checkpoint"] == "shapes-teacher"
    api.util_set_model("shapes-turbo")
    assert api.util_get_current_model() == "shapes-turbo"
    assert "Euler a" in api.util_get_sampler_names() and "Karras" in [s["label"] for s in api.get_schedulers()]


def test_progress_and_interrupt_through_webuiapi(api):
    out = {}
    job = threading.Thread(target=lambda: out.update(r=api.txt2img(prompt="a", steps=300, width=64, height=64,
                                                                   sampler_name="Euler")))
    job.start()
    end = time.monotonic() + 30
    while not ((p := api.get_progress())["state"]["job_count"] and p["state"]["sampling_step"] >= 2) \
            and time.monotonic() < end:
        time.sleep(0.02)
    assert p["state"]["job_count"] == 1 and p["current_image"] and 0 < p["progress"] < 1
    api.interrupt()
    job.join(30)
    assert out["r"].info["interrupted"] is True and out["r"].images == []
    assert api.get_progress()["state"]["interrupted"] is True


def test_a_client_that_disconnects_stops_its_job(server, api):
    url = f"http://127.0.0.1:{server}/sdapi/v1/txt2img"
    body = {"prompt": "a", "steps": 1000, "width": 64, "height": 64, "sampler_name": "Euler"}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url, json=body, auth=("ann", "pw"), timeout=1.0)  # gives up and closes the connection
    end = time.monotonic() + 10  # 1000 steps would take 10 s and more
    while api.get_progress()["state"]["job_count"] and time.monotonic() < end:
        time.sleep(0.05)
    p = api.get_progress()["state"]
    assert p["job_count"] == 0 and 0 < p["sampling_step"] < 1000
    assert api.txt2img(prompt="a", width=64, height=64).image.size == (64, 64)


def test_the_client_without_credentials_is_refused(server):
    anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=server)
    with pytest.raises(RuntimeError, match="401"):
        anonymous.txt2img(prompt="a")
