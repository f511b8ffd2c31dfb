"""The one worker of a server: a lock that lets one generation (or model switch) run at a time, a bounded
queue in front of it, and the progress state A1111's /progress and /interrupt read and write.

A1111 keeps this in `modules/shared_state.State`; here it is a small object the app owns. Interrupting
sets a flag the sampler's per-step callback reads: the callback raises, the generation stops between two
steps, and the images of the iterations already finished are returned (A1111 returns them too).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..api import load
from ..imaging import to_pil
from ..pipeline import Pipeline


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


class Worker:
    """One pipeline, one generation at a time, at most `queue` requests waiting behind it."""

    def __init__(self, pipe: Pipeline, title: str, queue: int):
        self.pipe, self.title = pipe, title
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(queue + 1)  # the running request and the waiting ones
        self.state = State()
        self.gone: threading.Event | None = None  # the running request's client disconnected
        self.last_seconds = 1.0  # the last job's time: the Retry-After of a full queue

    @contextmanager
    def turn(self):
        """Wait for the worker (refusing at once with Busy when the queue is full), then hold it."""
        if not self.slots.acquire(blocking=False):
            raise Busy(max(1, round(self.last_seconds)))
        try:
            with self.lock:
                yield
        finally:
            self.slots.release()

    def generate(self, calls: list[dict], steps: int, job: str, gone: threading.Event | None = None
                 ) -> tuple[list, bool]:
        """Run the pipeline once per call (A1111's n_iter); returns the images and whether it was stopped:
        by /interrupt, or by `gone` (set when the client disconnects; checked in the queue too). `steps`:
        the sampler steps each call runs (for /progress)."""
        with self.turn():
            if gone is not None and gone.is_set():
                return [], True
            start, self.gone = time.time(), gone
            self.state = State(job, len(calls), sampling_steps=steps, job_timestamp=time.strftime("%Y%m%d%H%M%S"))
            images, stopped = [], False
            try:
                for i, kwargs in enumerate(calls):
                    self.state.job_no, self.state.sampling_step = i, 0
                    images += self.pipe(**kwargs, callback=self._step, progress=False)
            except Interrupted:
                stopped = True
            finally:
                self.state.job_count, self.state.preview, self.gone = 0, None, None
                self.last_seconds = time.time() - start
            return images, stopped

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
            pipe = load(path)
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
