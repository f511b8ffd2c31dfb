"""Requests of the same settings waiting together run as one batch: one model call for their images, each
request still getting its own prompt's and seeds' images (equal to one-at-a-time ones within 1/255), a
request of other settings alone, the batch limit kept, and a lone request exactly as before."""

import json
import threading
import time

import numpy as np
import pytest
from serve_util import decode

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = {"prompt": "a red circle", "steps": 300, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1}
QUICK = [{"prompt": "a red circle", "seed": 5}, {"prompt": "a blue square", "seed": 9, "batch_size": 2},
         {"prompt": "a green triangle", "seed": 2}, {"prompt": "a blue circle", "seed": 4, "steps": 2}]


def post_all(client, bodies: list[dict]) -> list[dict]:
    outs = [{} for _ in bodies]
    threads = [threading.Thread(target=lambda o=o, b=b: o.update(r=client.post("/sdapi/v1/txt2img", json=b)))
               for o, b in zip(outs, bodies)]
    for t in threads:
        t.start()
    return threads, outs


def behind_a_long_request(client, bodies: list[dict]) -> list[dict]:
    """`bodies` posted while a long request runs, so they wait together; then the long one is interrupted."""
    worker = client.app.state.serve.worker
    running, _ = post_all(client, [LONG])
    end = time.monotonic() + 30
    while not worker.state.sampling_step and time.monotonic() < end:
        time.sleep(0.01)
    threads, outs = post_all(client, bodies)
    while len(worker.waiting) < len(bodies) and time.monotonic() < end:
        time.sleep(0.01)
    assert len(worker.waiting) == len(bodies)
    client.post("/sdapi/v1/interrupt")
    for t in [*running, *threads]:
        t.join(60)
    return outs


@pytest.fixture
def calls(pipe, monkeypatch):
    """The requests the pipeline runs, in order."""
    seen, generate = [], pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda request, **kw: seen.append(request) or generate(request, **kw))
    return seen


def test_waiting_requests_of_one_settings_run_as_one_batch(make_client, pipe, calls):
    outs = behind_a_long_request(make_client(queue=8), QUICK)
    sizes = sorted(len(r.prompts) for r in calls[1:])
    assert sizes == [1, 4], sizes  # the three of one settings (1 + 2 + 1 images) together, the 2-step one alone
    batched = next(r for r in calls[1:] if len(r.prompts) == 4)
    assert sorted(zip(batched.prompts, batched.seeds)) == [("a blue square", 9), ("a blue square", 10),
                                                          ("a green triangle", 2), ("a red circle", 5)]
    for body, out in zip(QUICK, outs):
        r = out["r"].json()
        info = json.loads(r["info"])
        n = body.get("batch_size", 1)
        assert out["r"].status_code == 200 and len(r["images"]) == n
        assert info["all_seeds"] == [body["seed"] + i for i in range(n)] and info["interrupted"] is False
        for i, png in enumerate(r["images"]):
            alone = pipe(body["prompt"], seed=body["seed"] + i, steps=body.get("steps"), progress=False)[0]
            got = np.asarray(decode(png).convert("RGB"), np.int16)
            assert np.abs(got - np.asarray(alone.convert("RGB"), np.int16)).max() <= 1
            assert f"Seed: {body['seed'] + i}," in decode(png).info["parameters"]
            assert body["prompt"] in decode(png).info["parameters"]


def test_a_batch_keeps_its_limit(make_client, calls):
    outs = behind_a_long_request(make_client(queue=8, batch=2), [QUICK[0], QUICK[2], {**QUICK[0], "seed": 7}])
    assert sorted(len(r.prompts) for r in calls[1:]) == [1, 2]
    assert all(o["r"].status_code == 200 and len(o["r"].json()["images"]) == 1 for o in outs)


def test_a_lone_request_is_exactly_the_python_apis_image(client, pipe):
    r = client.post("/sdapi/v1/txt2img", json=QUICK[0]).json()
    alone = pipe(QUICK[0]["prompt"], seed=5, progress=False)[0]
    assert np.array_equal(np.asarray(decode(r["images"][0]).convert("RGB")), np.asarray(alone.convert("RGB")))


def test_batch_must_be_sensible(make_client):
    from fewstep.errors import FewstepError
    with pytest.raises(FewstepError, match="batch=0 must be from 1 to 64"):
        make_client(batch=0)
