"""Serving under load: concurrent clients against `fewstep serve` on 127.0.0.1, against the same images
made by the Python API in-process (the reference, same run and process).

The server runs in this process (uvicorn in a thread, the built-in model, the server's default settings
unless --queue says otherwise). After a warm-up (in-process images, and two requests per client at once, so
the server's threads exist before the memory is read), --clients asyncio clients (httpx.AsyncClient) send
--requests small txt2img requests in all (the model's defaults: 128x128, 4 steps; request i has seed
SEED + i), bounded by --time-limit. A client that gets 503 waits its Retry-After before its next request,
as a polite client does. Every request must be answered: an image (one valid PNG, the Python API's pixels
for its seed, within 1/255 where the server batched it with others) or 503 with Retry-After; a lost request (an exception, a timeout) or any other status is a
failure (exit status 1).

Recorded: answers by status, p50 / p99 latency of the images (send to full response), throughput (images
over the wall time of the whole run), the reference (the same prompts and seeds through `pipe(...)`, one
after another, after the server stopped) and the server's time per image as a ratio of it, and the
process's RSS after the warm-up and after the run (must be within 10%). Prints Markdown. Also printed:
the reference's rate before the load (other seeds: the spread between runs) and the same calls made from
another thread, as the server's worker makes them (what threads alone cost, apart from HTTP).

    python scripts/measure/serve_load.py [--clients 16] [--requests 256] [--queue 4] [--batch 8] [--time-limit 600]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import io
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

PROMPTS = ("a large red circle on the left", "a small blue square at the top right",
           "a green triangle in the middle", "a large yellow circle at the bottom and a small red square")
SEED = 1000
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Answer:
    """One request's fate: its status (None: lost, see `error`), latency, Retry-After and image."""

    index: int
    status: int | None
    seconds: float
    retry_after: str | None = None
    png: bytes | None = None
    error: str | None = None


def body(i: int) -> dict:
    """Request i: a small txt2img at the model's defaults, with a seed of its own."""
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": SEED + i}


@contextlib.contextmanager
def live_server(app, timeout: float = 30.0):
    """`app` served by uvicorn on a free loopback port in a daemon thread; yields its base URL."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < end:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"the server did not start on 127.0.0.1:{port} within {timeout} s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


async def drive(url: str, clients: int, requests: int, time_limit: float, auth=None) -> list[Answer]:
    """`clients` concurrent clients sending `body(i)` for i < requests (fewer if `time_limit` seconds pass:
    no request starts after it, those running are awaited); a 503 makes its client wait Retry-After."""
    import httpx
    todo, end = iter(range(requests)), time.monotonic() + time_limit
    answers: list[Answer] = []

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:  # shared by the clients: each request is sent once
            if time.monotonic() > end:
                return
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/sdapi/v1/txt2img", json=body(i))
                answer = Answer(i, r.status_code, time.perf_counter() - start, r.headers.get("retry-after"))
                if r.status_code == 200:
                    images = r.json()["images"]
                    answer.png = base64.b64decode(images[0]) if len(images) == 1 else b""
            except Exception as e:  # a lost request: recorded, not raised, so every other one is counted too
                answer = Answer(i, None, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
            answers.append(answer)
            if answer.status == 503 and (answer.retry_after or "").isdigit():
                await asyncio.sleep(max(0.0, min(int(answer.retry_after), end - time.monotonic())))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 60), limits=limits, auth=auth,
                                 trust_env=False) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return sorted(answers, key=lambda a: a.index)


def failures(answers: list[Answer], size: tuple[int, int] = (128, 128)) -> list[str]:
    """What breaks the rules: a lost request, a status other than 200 / 503, a 503 without Retry-After,
    an answer without one valid PNG of `size`. Empty: all good."""
    bad = []
    for a in answers:
        if a.status is None:
            bad.append(f"request {a.index} lost: {a.error}")
        elif a.status == 503 and not (a.retry_after or "").isdigit():
            bad.append(f"request {a.index}: 503 without Retry-After")
        elif a.status == 200 and (not a.png or not a.png.startswith(PNG) or decode(a.png).size != size):
            bad.append(f"request {a.index}: 200 without one valid {size[0]}x{size[1]} PNG")
        elif a.status not in (200, 503):
            bad.append(f"request {a.index}: status {a.status}")
    return bad


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def rss_mb() -> float:
    """This process's resident memory, MiB (psutil if installed, else /proc)."""
    gc.collect()
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def reference(pipe, indices: list[int]) -> tuple[float, dict]:
    """The same images through the Python API, one after another: seconds, and {index: pixels}."""
    start, pixels = time.perf_counter(), {}
    for i in indices:
        b = body(i)
        pixels[i] = np.asarray(pipe(b["prompt"], seed=b["seed"], progress=False)[0].convert("RGB"))
    return time.perf_counter() - start, pixels


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def warm_up(pipe, url: str, clients: int) -> list[Answer]:
    """In-process images, then a burst of requests from every client: the server's threads and their
    memory exist before the RSS after warm-up is read, so only growth during the run is measured."""
    for i in range(2):
        pipe(PROMPTS[0], seed=i, progress=False)
    return asyncio.run(drive(url, clients, 2 * clients, 120.0))


def measure(a: argparse.Namespace) -> dict:
    """The run: server, warm-up, load, a check that the server still answers, then the reference."""
    import httpx
    import torch

    import fewstep
    from fewstep.serve.app import create_app
    torch.set_grad_enabled(False)
    pipe = fewstep.load()
    with live_server(create_app(pipe, queue=a.queue, batch=a.batch)) as url:
        warm = failures(warm_up(pipe, url, a.clients))
        before = list(range(4 * a.clients))  # a reference before the load too: timing only, the noise shows
        before = len(before) / reference(pipe, before)[0]
        rss_warm, start = rss_mb(), time.perf_counter()
        answers = asyncio.run(drive(url, a.clients, a.requests, a.time_limit))
        wall = time.perf_counter() - start
        rss_after = rss_mb()
        with httpx.Client(timeout=60, trust_env=False) as http:
            after = http.post(f"{url}/sdapi/v1/txt2img", json=body(0)).status_code
    made = [x.index for x in answers if x.status == 200 and x.png]
    ref_seconds, ref_pixels = reference(pipe, made)
    png = {x.index: x.png for x in answers}
    differ = [i for i, want in ref_pixels.items()  # requests batched together: within 1/255 of one at a time
              if np.abs(np.asarray(decode(png[i]).convert("RGB"), np.int16) - want.astype(np.int16)).max() > 1]
    in_thread = []  # the same calls from another thread, as the server's worker makes them
    worker = threading.Thread(target=lambda: in_thread.append(reference(pipe, made)[0]))
    worker.start()
    worker.join()
    return dict(answers=answers, warm=warm, wall=wall, rss_warm=rss_warm, rss_after=rss_after, after=after,
                ref_seconds=ref_seconds, differ=differ, threads=torch.get_num_threads(), before=before,
                in_thread=len(made) / in_thread[0] if made else float("nan"))


def report(a: argparse.Namespace, m: dict) -> list[str]:
    """Prints the figures as Markdown; returns the failures."""
    answers, wall = m["answers"], m["wall"]
    images = [x.seconds for x in answers if x.status == 200]
    busy = [x.seconds for x in answers if x.status == 503]
    rate, ref_rate = len(images) / wall, len(images) / m["ref_seconds"] if images else float("nan")
    ratio = ref_rate / rate if images else float("nan")
    growth = m["rss_after"] / m["rss_warm"] - 1
    bad = [f"warm-up: {line}" for line in m["warm"]] + failures(answers)
    bad += [f"{len(answers)} answers for {a.requests} requests"] * (len(answers) != a.requests)
    bad += [f"request {i}: not the Python API's image" for i in m["differ"]]
    bad += [f"RSS grew {100 * growth:.1f}% (over 10%)"] * (abs(growth) > 0.10)
    bad += [f"the server answered {m['after']} after the run"] * (m["after"] != 200)
    print(f"{a.clients} clients, {a.requests} requests, queue {a.queue}, batch {a.batch}, torch threads {m['threads']}: "
          f"{len(answers)} answered in {wall:.1f} s: {len(images)} images, {len(busy)} 503, "
          f"{len(answers) - len(images) - len(busy)} other")
    print("\n| clients | requests | queue | images / 503 / lost or other | image p50 / p99 s | 503 p50 s "
          "| images/s | in-process images/s (same images) | server time per image, ratio | RSS after warm-up / "
          "after run MiB |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {a.clients} | {a.requests} | {a.queue} | {len(images)} / {len(busy)} / "
          f"{len(answers) - len(images) - len(busy)} | {percentile(images, 50):.2f} / {percentile(images, 99):.2f} "
          f"| {percentile(busy, 50):.3f} | {rate:.2f} | {ref_rate:.2f} | **{ratio:.2f}x** "
          f"| {m['rss_warm']:.0f} / {m['rss_after']:.0f} ({100 * growth:+.1f}%) |")
    if images:
        print(f"\nimage latency s: min {min(images):.2f}, mean {statistics.mean(images):.2f}, max {max(images):.2f}; "
              f"reference {m['ref_seconds']:.1f} s for {len(images)} images")
    print(f"in-process images/s: {m['before']:.2f} before the load (main thread, {4 * a.clients} images), "
          f"{ref_rate:.2f} after it (main thread), {m['in_thread']:.2f} after it from a new thread")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256, help="requests in all, over all the clients")
    ap.add_argument("--queue", type=int, default=4, help="the server's --queue (default: the server's, 4)")
    ap.add_argument("--batch", type=int, default=8, help="the server's --batch (default: the server's, 8)")
    ap.add_argument("--time-limit", type=float, default=600.0, help="no request starts after this many seconds")
    a = ap.parse_args()
    bad = report(a, measure(a))
    for line in bad:
        print("FAIL:", line, file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
