"""Fuzzing the generation routes (hypothesis; bounded: small sizes, a tight work limit, 60 + 40 examples):
whatever the body, the answer is an image or a 4xx in A1111's error shape, never a 5xx, and the server
answers normally afterwards."""

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serve_util import b64_png

from fewstep.samplers import SAMPLERS
from fewstep.serve.a1111 import SCHEDULER_LABELS
from fewstep.serve.app import create_app

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:strength .* runs no step")]
ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                st.text(max_size=12), st.lists(st.integers(), max_size=2),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
SOURCE = b64_png(Image.new("RGB", (32, 32), "red"))
MASK = b64_png(Image.new("L", (32, 32), 255))
SIZES = st.sampled_from([8, 16, 32, 64])
# Values A1111 clients send (mostly valid; some refused, e.g. LCM with Karras sigmas)
TXT2IMG = {"prompt": st.text(max_size=40), "negative_prompt": st.text(max_size=10), "steps": st.integers(1, 2),
           "cfg_scale": st.floats(-5, 20), "width": SIZES, "height": SIZES, "seed": st.integers(-1, 2**64),
           "sampler_name": st.sampled_from([s.a1111 for s in SAMPLERS.values() if s.a1111] + list(SAMPLERS)),
           "scheduler": st.sampled_from(list(SCHEDULER_LABELS.values())), "batch_size": st.integers(1, 2),
           "n_iter": st.integers(1, 2), "eta": st.floats(0, 1), "send_images": st.booleans(),
           "override_settings": st.fixed_dictionaries({}, optional={"CLIP_stop_at_last_layers": st.integers(0, 13)}),
           "enable_hr": st.booleans(), "styles": st.lists(st.text(max_size=3), max_size=2), "some_extension": ANY}
IMG2IMG = {**TXT2IMG, "init_images": st.lists(st.sampled_from([SOURCE, SOURCE, "x", ""]), min_size=1, max_size=2),
           "mask": st.just(MASK), "denoising_strength": st.floats(0, 1), "mask_blur": st.integers(0, 8),
           "inpainting_fill": st.integers(0, 3), "inpaint_full_res": st.booleans(),
           "inpaint_full_res_padding": st.integers(0, 16), "inpainting_mask_invert": st.integers(0, 1)}
CORE = {"prompt": st.text(max_size=40), "steps": st.integers(1, 2), "width": SIZES, "height": SIZES}


def bodies(fields: dict, core: dict):
    """A valid core with other fields' usual values, or with any values; any fields at all; not a dict."""
    rest = {k: v for k, v in fields.items() if k not in core}
    anything = {k: st.one_of(v, ANY) for k, v in fields.items()}
    return st.one_of(st.fixed_dictionaries(core, optional=rest),
                     st.fixed_dictionaries(core, optional={k: anything[k] for k in rest}),
                     st.fixed_dictionaries({}, optional=anything), ANY)


@pytest.fixture(scope="module")
def fuzz_client(pipe):
    return TestClient(create_app(pipe, max_work=64 * 64 * 4 * 2), raise_server_exceptions=False)


FUZZ = dict(deadline=None, derandomize=True,  # the same examples on every run
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ANSWERS = {"txt2img": [], "img2img": []}  # the status codes the fuzz got


def check(client, route: str, body) -> None:
    r = client.post(f"/sdapi/v1/{route}", json=body)
    ANSWERS[route].append(r.status_code)
    assert r.status_code in (200, 422), (r.status_code, r.text[:300], body)
    if r.status_code == 422:
        detail = r.json()["detail"]
        assert detail and "\n" not in detail and r.json()["errors"] == detail


@settings(max_examples=60, **FUZZ)
@given(body=bodies(TXT2IMG, CORE))
def test_txt2img_bodies_never_give_a_5xx(fuzz_client, body):
    check(fuzz_client, "txt2img", body)


@settings(max_examples=40, **FUZZ)
@given(body=bodies(IMG2IMG, {**CORE, "init_images": st.just([SOURCE])}))
def test_img2img_bodies_never_give_a_5xx(fuzz_client, body):
    check(fuzz_client, "img2img", body)


def test_the_server_still_answers_after_the_fuzz(fuzz_client):
    for route, codes in ANSWERS.items():  # the fuzz reached the pipeline, and was refused too
        assert codes.count(200) >= 3 and codes.count(422) >= 10, (route, codes)
    r = fuzz_client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert fuzz_client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
