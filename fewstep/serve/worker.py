"""The one worker of a server: a lock that lets one generation (or model switch) run at a time, a bounded
queue in front of it, and the progress state A1111's /progress and /interrupt read and write.

A1111 keeps this in `modules/shared_state.State`; here it is a small object the app owns. Interrupting
sets a flag the sampler's per-step callback reads: the callback raises, the generation stops between two
steps, and the images of the iterations already finished are returned (A1111 returns them too).

Requests of the same settings that wait in the queue together run as one batch (up to `batch` images per
model call): when a txt2img request gets its turn, it takes the waiting requests with its key along, and
each gets its own images (its own prompt and seeds) back. Batched images equal one-at-a-time ones to within
1/255 (float sums in another order); a lone request runs exactly as before.

Every model call runs on the worker's one thread. The web server hands each request to a thread of its
pool; a model run from many threads gets a new OpenMP thread team in each, and the idle teams' spinning
threads take the cores the running team needs.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..api import load
from ..imaging import to_pil
from ..pipeline import Pipeline
from ..request import resolve


class Busy(Exception):
    """The queue is full: the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full): retry in {retry_after} s")
        self.retry_after = retry_after


class Interrupted(Exception):
    """Raised from the sampler's callback after /interrupt, caught by `Worker.generate`."""


@dataclass
class State:
    """A1111's shared.state, as /progress reports it."""

    job: str = ""
    job_count: int = 0  # iterations of the running request (n_iter); 0: idle
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.time)
    job_timestamp: str = "0"
    preview: tuple | None = None  # (pipeline, denoised latents [1, C, h, w]) of the last step


@dataclass(eq=False)
class Ticket:
    """A single-call request that may run in another request's batch: its call, its batching key, and
    what the batch gave it."""

    call: dict
    key: str
    gone: threading.Event | None
    images: list = field(default_factory=list)
    stopped: bool = False
    done: bool = False


class AllGone:
    """A batch stops early only when every one of its clients has gone."""

    def __init__(self, tickets: list[Ticket]):
        self.tickets = tickets

    def is_set(self) -> bool:
        return all(t.gone is not None and t.gone.is_set() for t in self.tickets)


class Worker:
    """One pipeline, one generation at a time, at most `queue` requests waiting behind it; waiting
    requests of one key run together, up to `batch` images per model call."""

    def __init__(self, pipe: Pipeline, title: str, queue: int, batch: int = 8):
        self.pipe, self.title, self.batch = pipe, title, batch
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(queue + 1)  # the running request and the waiting ones
        self.guard = threading.Lock()  # over `waiting`
        self.waiting: list[Ticket] = []  # batchable requests in the queue
        self.state = State()
        self.gone = None  # the running request's client disconnected (an Event, or AllGone for a batch)
        self.last_seconds = 1.0  # the last job's time: the Retry-After of a full queue
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="fewstep-model")  # every model call runs here

    def on_model_thread(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the worker's model thread; its result or its exception here."""
        return self.thread.submit(fn, *args, **kwargs).result()

    @contextmanager
    def turn(self, ticket: Ticket | None = None):
        """Wait for the worker (refusing at once with Busy when the queue is full), then hold it; a ticket
        waits where a batch can take it."""
        if not self.slots.acquire(blocking=False):
            raise Busy(max(1, round(self.last_seconds)))
        if ticket is not None:
            with self.guard:
                self.waiting.append(ticket)
        try:
            with self.lock:
                yield
        finally:
            if ticket is not None:
                with self.guard:
                    if ticket in self.waiting:
                        self.waiting.remove(ticket)
            self.slots.release()

    def generate(self, calls: list[dict], steps: int, job: str, gone: threading.Event | None = None,
                 key: str | None = None) -> tuple[list, bool]:
        """Run the pipeline once per call (A1111's n_iter); returns the images and whether it was stopped:
        by /interrupt, or by `gone` (set when the client disconnects; checked in the queue too). `steps`:
        the sampler steps each call runs (for /progress). With a `key` (one call), waiting requests of the
        same key run in one batch with it."""
        ticket = Ticket(calls[0], key, gone) if key is not None and len(calls) == 1 else None
        with self.turn(ticket):
            if ticket is not None and ticket.done:  # an earlier request's batch made this one's images
                return ticket.images, ticket.stopped
            if gone is not None and gone.is_set():
                return [], True
            group = self._take(ticket) if ticket is not None else []
            start = time.time()
            self.state = State(job, 1 if group else len(calls), sampling_steps=steps,
                               job_timestamp=time.strftime("%Y%m%d%H%M%S"))
            try:
                return self._batched(group) if len(group) > 1 else self._calls(calls, gone)
            finally:
                self.state.job_count, self.state.preview, self.gone = 0, None, None
                self.last_seconds = time.time() - start

    def _calls(self, calls: list[dict], gone) -> tuple[list, bool]:
        self.gone, images = gone, []
        try:
            for i, kwargs in enumerate(calls):
                self.state.job_no, self.state.sampling_step = i, 0
                images += self.on_model_thread(self.pipe, **kwargs, callback=self._step, progress=False)
        except Interrupted:
            return images, True
        return images, False

    def _take(self, ticket: Ticket) -> list[Ticket]:
        """`ticket` and the waiting tickets of its key whose clients are still there, up to `batch` images."""
        with self.guard:
            group, images = [ticket], ticket.call["num_images"]
            for other in self.waiting:
                n = other.call["num_images"]
                if other is not ticket and other.key == ticket.key and images + n <= self.batch and \
                        not (other.gone is not None and other.gone.is_set()):
                    group.append(other)
                    images += n
            for t in group:
                self.waiting.remove(t)
        return group

    def _batched(self, group: list[Ticket]) -> tuple[list, bool]:
        """One model call for the tickets' images (each its own prompt and seeds); each ticket gets its own."""
        counts = [t.call["num_images"] for t in group]
        prompts = [t.call["prompt"] for t, n in zip(group, counts) for _ in range(n)]
        seeds = [t.call["seed"] + i for t, n in zip(group, counts) for i in range(n)]
        settings = {k: v for k, v in group[0].call.items() if k not in ("prompt", "seed", "num_images", "batch_size")}
        request = resolve(self.pipe.defaults, prompts, num_images=1, **settings)  # one image per prompt
        self.gone = AllGone(group)
        try:
            images, stopped = self.on_model_thread(self.pipe.generate, replace(request, seeds=tuple(seeds)),
                                                   callback=self._step, progress=False), False
        except Interrupted:
            images, stopped = [], True
        at = 0
        for t, n in zip(group, counts):
            t.images, t.stopped, t.done = images[at:at + n], stopped, True
            at += n
        return group[0].images, stopped

    def _step(self, i: int, x: torch.Tensor, denoised: torch.Tensor, sigma) -> None:
        if self.state.interrupted or self.gone is not None and self.gone.is_set():
            raise Interrupted
        self.state.sampling_step = i + 1
        self.state.preview = (self.pipe, denoised[:1].detach().clone())

    def interrupt(self) -> None:
        """Stop the running request between two steps (nothing happens when idle)."""
        if self.state.job_count:
            self.state.interrupted = True

    def switch(self, title: str, path) -> None:
        """Load another model (waiting for the running request); on an error the old one stays."""
        with self.turn():
            pipe = self.on_model_thread(load, path)
            pipe.lora_dir = self.pipe.lora_dir
            self.pipe, self.title = pipe, title

    def progress(self, skip_current_image: bool = False) -> dict:
        """A1111's ProgressResponse: overall progress, the time left relative to the time spent, the state,
        and the last step's denoised latents decoded as a preview."""
        s = self.state
        busy = s.job_count > 0
        done = (s.job_no + s.sampling_step / max(s.sampling_steps, 1)) / s.job_count if busy else 0.0
        elapsed = time.time() - s.started
        preview = None if skip_current_image or not busy else s.preview
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
                "state": {"skipped": False, "interrupted": s.interrupted, "stopping_generation": False, "job": s.job,
                          "job_count": s.job_count, "job_timestamp": s.job_timestamp, "job_no": s.job_no,
                          "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps},
                "current_image": None if preview is None else _preview(*preview),
                "textinfo": f"step {s.sampling_step} of {s.sampling_steps}" if busy else None}


@torch.no_grad()
def _preview(pipe: Pipeline, latents: torch.Tensor) -> str:
    """A base64 PNG of one step's denoised latents, with the pipeline's decoder (the tiny one if set)."""
    buffer = io.BytesIO()
    to_pil(pipe.decode(latents.to(pipe.device)))[0].save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
