"""One txt2img / img2img request, from A1111's body to A1111's response: the pipeline's arguments per
iteration (A1111's n_iter; image i of the request uses seed + i, as in A1111 and `fewstep generate`), the
work limit, and the response's `images`, `parameters` and `info` (a JSON string, as A1111 sends it).
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from ..errors import FewstepError
from ..outputs import plan, save_image
from ..prompts import networks
from ..request import resolve
from ..samplers import spec
from ..start import first_step
from .a1111 import INPAINTING_FILL, Img2Img, Txt2Img, decode_image, ignored, sampler_of
from .worker import Worker


def arguments(req: Txt2Img) -> dict:
    """The pipeline's keyword arguments for the whole request (num_images = batch_size x n_iter)."""
    sampler, schedule = sampler_of(req)
    clip = (req.override_settings or {}).get("CLIP_stop_at_last_layers")
    kwargs = dict(prompt=req.prompt, negative_prompt=req.negative_prompt or None, steps=req.steps,
                  guidance=req.cfg_scale, sampler=sampler, sigma_schedule=schedule, width=req.width, height=req.height,
                  seed=random.randrange(2**32) if req.seed == -1 else req.seed, num_images=req.batch_size * req.n_iter,
                  batch_size=req.batch_size, clip_skip=clip_skip(clip), eta=req.eta if sampler == "ddim" else 0.0)
    if isinstance(req, Img2Img):
        kwargs.update(image=decode_image(req.init_images[0], "init_images[0]"), strength=req.denoising_strength)
        if req.mask is not None:
            kwargs.update(mask_image=decode_image(req.mask, "mask"), mask_blur=req.mask_blur,
                          invert_mask=bool(req.inpainting_mask_invert), overlay=True,
                          masked_content=INPAINTING_FILL[req.inpainting_fill],
                          padding_mask_crop=req.inpaint_full_res_padding if req.inpaint_full_res else None)
    return kwargs


def clip_skip(value) -> int | None:
    """A1111's CLIP_stop_at_last_layers (1: the last layer) as fewstep's clip_skip (layers left out)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
        raise FewstepError(f"override_settings.CLIP_stop_at_last_layers={value!r} must be a whole number from 1 to 12")
    return value - 1


def plan_calls(kwargs: dict, worker: Worker, max_work: int) -> tuple[list[dict], object]:
    """One call per iteration, after checking the request (`resolve`: a mistake is answered before the
    request waits in the queue) and its size against `max_work` (width x height x images x steps). The
    model's defaults are filled in now, so the images are what `info` reports even if the model changes."""
    request = resolve(worker.pipe.defaults, **kwargs)
    work = request.width * request.height * len(request.prompts) * request.steps
    if work > max_work:
        raise FewstepError(f"{request.width}x{request.height} x {len(request.prompts)} images x {request.steps} "
                           f"steps is {work} pixel-steps, more than this server's limit of {max_work}: ask for less")
    kwargs = {**kwargs, "steps": request.steps, "guidance": request.guidance, "sampler": request.sampler,
              "width": request.width, "height": request.height, "num_images": request.batch_size}
    if request.edit is not None:
        kwargs["strength"] = request.edit.strength
    return [{**kwargs, "seed": request.seeds[i]} for i in range(0, len(request.prompts), request.batch_size)], request


def batch_key(req: Txt2Img, calls: list[dict]) -> str | None:
    """What txt2img requests must share to run in one batch: every setting but the prompt and seed, and the
    prompt's LoRA tags (LoRAs apply to a whole call). None: this request runs alone (img2img, n_iter > 1)."""
    if isinstance(req, Img2Img) or len(calls) != 1:
        return None
    settings = {k: v for k, v in calls[0].items() if k not in ("prompt", "seed", "num_images", "batch_size")}
    return json.dumps([settings, networks(calls[0]["prompt"])], sort_keys=True, default=str)


def run(req: Txt2Img, body: dict, worker: Worker, max_work: int, outdir: Path | None,
        gone: threading.Event | None = None) -> tuple[dict, str]:
    """The response of a generation request, and a one-line summary for the log. `gone`: set when the
    client disconnects, which stops the request as /interrupt would."""
    calls, request = plan_calls(arguments(req), worker, max_work)
    steps = request.steps - (first_step(request.steps, request.edit.strength) if request.edit else 0)
    images, stopped = worker.generate(calls, steps, "img2img" if isinstance(req, Img2Img) else "txt2img", gone,
                                      batch_key(req, calls))
    saved = [] if not req.save_images or outdir is None else \
        [str(save_image(im, p)) for im, p in zip(images, plan(outdir, list(request.seeds[:len(images)])))]
    skipped = sorted(ignored(body, req) + (["save_images"] if req.save_images and outdir is None else []))
    info = _info(request, images, worker, skipped, stopped, saved)
    keep = isinstance(req, Img2Img) and req.include_init_images  # A1111 leaves the sources out by default
    params = {k: v for k, v in body.items() if k not in ("init_images", "mask") or keep}
    out = {"images": [_png(im) for im in images] if req.send_images else [], "parameters": params,
           "info": json.dumps(info)}
    end = ", client gone" if gone is not None and gone.is_set() else ", interrupted" if stopped else ""
    summary = f"{request.width}x{request.height} x{len(images)}, {request.steps} steps{end}"
    return out, summary


def _info(request, images: list, worker: Worker, skipped: list[str], stopped: bool, saved: list[str]) -> dict:
    """A1111's `info` (its processing's js()), with the fields clients read, and what fewstep ignored."""
    n = len(images)
    negative = list(request.negative[:n]) if request.negative else [""] * n
    return {"prompt": request.prompts[0], "all_prompts": list(request.prompts[:n]),
            "negative_prompt": negative[0] if negative else "", "all_negative_prompts": negative,
            "seed": request.seeds[0], "all_seeds": list(request.seeds[:n]), "subseed": -1, "all_subseeds": [-1] * n,
            "subseed_strength": 0, "width": request.width, "height": request.height,
            "sampler_name": spec(request.sampler).a1111 or request.sampler,
            "cfg_scale": request.guidance, "steps": request.steps, "batch_size": request.batch_size,
            "sd_model_name": worker.title, "sd_model_hash": None, "clip_skip": request.clip_skip + 1,
            "denoising_strength": request.edit.strength if request.edit else None, "index_of_first_image": 0,
            "infotexts": [im.info["parameters"] for im in images], "styles": [], "extra_generation_params": {},
            "job_timestamp": worker.state.job_timestamp, "version": "fewstep", "ignored": skipped,
            "interrupted": stopped, "saved": saved}


def _png(image) -> str:
    """A base64 PNG carrying A1111's `parameters` text chunk, as A1111's API encodes its images."""
    meta = PngInfo()
    meta.add_text("parameters", image.info.get("parameters", ""))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode()
