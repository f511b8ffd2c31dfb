"""One generation at a time: /progress while a job runs (with a decoded preview), /interrupt stopping it
between steps, and a full queue answered 503 with Retry-After, the server answering afterwards."""

import json
import threading
import time

import pytest
from serve_util import decode

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = {"prompt": "a red circle", "steps": 300, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1}


def in_thread(client, path: str, body: dict) -> tuple[threading.Thread, dict]:
    """POST in a background thread; the response lands in the returned dict under "r"."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=client.post(path, json=body)))
    thread.start()
    return thread, out


def wait_for(client, ready, timeout: float = 30.0) -> dict:
    """Poll /progress until `ready(progress)`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = client.get("/sdapi/v1/progress").json()
        if ready(p):
            return p
        time.sleep(0.02)
    raise AssertionError(f"progress never got there: {p}")


def test_progress_preview_and_interrupt(client):
    idle = client.get("/sdapi/v1/progress").json()
    assert (idle["progress"], idle["state"]["job_count"], idle["current_image"]) == (0.0, 0, None)
    thread, out = in_thread(client, "/sdapi/v1/txt2img", {**LONG, "steps": 20, "n_iter": 3})
    p = wait_for(client, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 2)
    assert p["state"]["job_count"] == 3 and p["state"]["sampling_steps"] == 20 and p["state"]["job"] == "txt2img"
    assert 1 / 3 < p["progress"] < 2 / 3 and p["eta_relative"] > 0
    assert decode(p["current_image"]).size == (64, 64) and p["textinfo"].startswith("step ")
    assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    info = json.loads(out["r"].json()["info"])
    assert out["r"].status_code == 200 and info["interrupted"] is True
    assert len(out["r"].json()["images"]) == 1 and info["all_seeds"] == [1]  # the finished iteration
    after = client.get("/sdapi/v1/progress").json()
    assert after["state"]["interrupted"] is True and after["state"]["job_count"] == 0
    r = client.post("/sdapi/v1/txt2img", json={**LONG, "steps": 1})  # a new job starts uninterrupted
    assert json.loads(r.json()["info"])["interrupted"] is False and len(r.json()["images"]) == 1


def test_interrupt_when_idle_changes_nothing(client):
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    assert client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is False


def test_a_full_queue_is_503_with_retry_after(make_client):
    client = make_client(queue=1)
    running, first = in_thread(client, "/sdapi/v1/txt2img", LONG)
    wait_for(client, lambda p: p["state"]["job_count"] and p["state"]["sampling_step"] >= 1)
    waiting, second = in_thread(client, "/sdapi/v1/txt2img", {**LONG, "steps": 1})
    time.sleep(0.3)  # the second request is now waiting in the queue
    r = client.post("/sdapi/v1/txt2img", json={**LONG, "steps": 1})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["detail"] == f"the server is busy (queue full): retry in {r.headers['retry-after']} s"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-teacher"}).status_code == 503
    client.post("/sdapi/v1/interrupt")
    running.join(30)
    waiting.join(30)
    assert json.loads(first["r"].json()["info"])["interrupted"] is True
    assert second["r"].status_code == 200 and len(second["r"].json()["images"]) == 1
    assert client.post("/sdapi/v1/txt2img", json={**LONG, "steps": 1}).status_code == 200
