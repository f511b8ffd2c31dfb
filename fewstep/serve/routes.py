"""The /sdapi/v1 routes, with A1111's paths, field names and response shapes (its `modules/api/api.py`).

The other routes are plain `def` handlers, which FastAPI runs in its thread pool; the generation routes run
their request there too (waiting for the worker, `worker.Worker.turn`) while they watch for the client
disconnecting; /progress and /interrupt are answered meanwhile. Every handler reads the server's settings
from `request.app.state.serve` (`app.Settings`).
"""

from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..samplers import SAMPLERS
from . import catalog, jobs
from .a1111 import SCHEDULER_LABELS, Img2Img, Txt2Img, decode_image, parse_infotext

router = APIRouter(prefix="/sdapi/v1")
DISCONNECT_POLL = 0.25  # seconds between two looks at the client of a running request


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str


async def _generate(req: Txt2Img, request: Request) -> dict:
    """Run the request in the thread pool, watching the client: a disconnect stops it (`worker.Worker`)."""
    s = request.app.state.serve
    body = req.model_dump(exclude_unset=True)
    clip, override = s.options.get("CLIP_stop_at_last_layers", 1), req.override_settings or {}
    if clip != 1 and "CLIP_stop_at_last_layers" not in override:  # the server's option, unless overridden
        req.override_settings = {**override, "CLIP_stop_at_last_layers": clip}
    gone = threading.Event()
    job = asyncio.ensure_future(run_in_threadpool(jobs.run, req, body, s.worker, s.max_work, s.outdir, gone))
    while not job.done():
        await asyncio.wait([job], timeout=DISCONNECT_POLL)
        if not job.done() and await request.is_disconnected():
            gone.set()
    out, request.state.summary = job.result()
    return out


@router.post("/txt2img")
async def txt2img(req: Txt2Img, request: Request) -> dict:
    """Text to image; `info` lists the fields fewstep accepted but ignored."""
    return await _generate(req, request)


@router.post("/img2img")
async def img2img(req: Img2Img, request: Request) -> dict:
    """Image to image (init_images[0] at denoising_strength), or inpainting with a `mask` (white: repaint)."""
    return await _generate(req, request)


@router.get("/options")
def get_options(request: Request) -> dict:
    s = request.app.state.serve
    return {**s.options, "sd_model_checkpoint": s.worker.title, "sd_checkpoint_hash": None,
            "samples_format": "png", "outdir_samples": str(s.outdir or "")}


@router.post("/options")
def set_options(options: dict, request: Request) -> None:
    """`sd_model_checkpoint` switches the model (waiting for the running request); CLIP_stop_at_last_layers
    sets the default clip skip; other options are accepted and have no effect."""
    s = request.app.state.serve
    if "sd_model_checkpoint" in options:
        found = catalog.find(options["sd_model_checkpoint"], s.models_dir)
        if found.title != s.worker.title:
            s.worker.switch(found.title, found.path)
    if "CLIP_stop_at_last_layers" in options:
        jobs.clip_skip(options["CLIP_stop_at_last_layers"])  # checked now, not at the next request
        s.options["CLIP_stop_at_last_layers"] = options["CLIP_stop_at_last_layers"]


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict]:
    return [c.a1111() for c in catalog.checkpoints(request.app.state.serve.models_dir)]


@router.post("/refresh-checkpoints")
def refresh_checkpoints() -> None:
    """The listing is read afresh at each request: nothing to refresh."""


@router.get("/samplers")
def samplers() -> list[dict]:
    return [{"name": s.a1111 or name, "aliases": [name], "options": {}} for name, s in SAMPLERS.items()]


@router.get("/schedulers")
def schedulers() -> list[dict]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in SCHEDULER_LABELS.items()]


@router.get("/loras")
def loras(request: Request) -> list[dict]:
    return catalog.loras(request.app.state.serve.lora_dir)


@router.get("/scripts")
def scripts() -> dict:
    """No scripts or extensions: clients (webuiapi) ask at start-up."""
    return {"txt2img": [], "img2img": []}


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> dict:
    return request.app.state.serve.worker.progress(skip_current_image)


@router.post("/interrupt")
def interrupt(request: Request) -> None:
    """Stop the running request between two steps; it answers with the iterations already finished."""
    request.app.state.serve.worker.interrupt()


@router.post("/png-info")
def png_info(req: PngInfoRequest) -> dict:
    """The generation settings an image carries: A1111's `parameters` text, parsed, and its other text chunks."""
    image = decode_image(req.image, "image")
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}
