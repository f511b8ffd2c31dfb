"""Text-to-image: prompt -> CLIP context -> k-diffusion sampling of the UNet -> VAE decode -> PIL.

Follows the diffusers StableDiffusionPipeline / StableDiffusionXLPipeline numerics (classifier-free
guidance on the raw model output, SDXL micro-conditioning, `force_zeros_for_empty_prompt`, the
initial noise scaled by the sampler's initial sigma) so both stacks give the same image from the
same initial latents; everything else is a plain function call. A call is resolved once into a
`request.Request`; `generate` runs it batch by batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import control, samplers, text
from .adapters import Adapters
from .configs import SchedulerConfig, TextConditioning
from .denoiser import Denoiser
from .errors import FewstepError
from .edits import paste
from .imaging import autoencoder_input, from_uint8, memory_format, safe_decode, to_pil
from .loading import load_components
from .loading.controlnet import load_control
from .loading.embeddings import attach, read_embedding
from .loading.lora import lora_file, read_lora
from .memory import Work, check
from .request import Defaults, Request, infotext, resolve
from .start import Start, first_step, start


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale w (VDM's Fourier features of w * 1000), [B, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.nn.functional.pad(torch.cat([emb.sin(), emb.cos()], dim=1), (0, dim % 2))


@dataclass
class Pipeline:
    """A loaded text-to-image model. Call it with a prompt; see `__call__`.

    `decoder` (e.g. TAESD, set by `fewstep.speed.accel.optimize`) decodes instead of `vae` when set;
    `vae` stays for encoding and for switching back. The UNet and the autoencoders get their inputs in
    the memory layout of their own conv weights (`imaging.memory_format`). `token_downsample` is ToDo's
    pooling factor for the UNet's highest-resolution self-attention (1: off; `speed.accel`)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: SchedulerConfig
    conditioning: TextConditioning | None = None  # None: the UNet's family's (TextConditioning.for_unet)
    defaults: Defaults = field(default_factory=Defaults)
    name: str = ""
    decoder: torch.nn.Module | None = None
    token_downsample: int = 1
    adapters: Adapters = field(default_factory=Adapters)  # LoRAs (`load_lora`)
    lora_dir: Path | None = None  # where <lora:name:scale> tags in prompts find name.safetensors
    controls: list = field(default_factory=list)  # ControlNets / T2I-Adapters (`load_controlnet`), in order

    def __post_init__(self):
        if self.conditioning is None:
            self.conditioning = TextConditioning.for_unet(self.unet.cfg)
        d = self.defaults
        self.defaults = replace(d, sampler=d.sampler or samplers.for_scheduler(self.scheduler.class_name),
                                size=d.size or self.unet.cfg.sample_size * self.vae_scale)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The modules a LoRA file names, by diffusers' component names (the SDXL refiner's one text
        encoder is SDXL's second)."""
        names = ["text_encoder_2"] if self.conditioning.aesthetic_score else ["text_encoder", "text_encoder_2"]
        return {"unet": self.unet, **dict(zip(names, self.text_encoders))}

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None,
                  allow_pickle: bool = False) -> str:
        """Load a LoRA file (diffusers / PEFT or kohya / A1111 layout, LoCon included; `fewstep.loading.lora`)
        on top of those loaded before, at `scale` (alpha / rank * scale, as diffusers and A1111). Returns its
        name (the file's stem by default). On any error the pipeline is left as it was."""
        lora = read_lora(path, self.lora_modules(), self.unet.cfg, name, allow_pickle)
        self.adapters.add(lora, scale, self.lora_modules())
        return lora.name

    @contextmanager
    def _prompt_loras(self, tags: tuple[tuple[str, float], ...]):
        """The prompts' <lora:name:scale> LoRAs for one call: loaded from `lora_dir` (or, already loaded,
        set to that scale), and afterwards unloaded (or set back), as A1111 does."""
        before, added = self.adapters.scales(), []
        try:
            for name, scale in tags:
                if name in before:
                    self.adapters.set_scale(name, scale)
                else:
                    added.append(self.load_lora(lora_file(self.lora_dir, name), scale, name))
            yield
        finally:
            for name in added:
                self.adapters.remove(name)
            now = self.adapters.scales()
            for name, scale in before.items():
                if name in now and now[name] != scale:
                    self.adapters.set_scale(name, scale)

    def load_embedding(self, path: str | Path, token: str | None = None, allow_pickle: bool = False) -> str:
        """Load a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds, SDXL's
        clip_l + clip_g; `fewstep.loading.embeddings`) under `token` (default: the file's name, or the token
        it names); in prompts the token stands for all its vectors. Returns the token. On an error the
        pipeline is left as it was."""
        emb = read_embedding(path, token, allow_pickle)
        attach(emb, self.tokenizers, self.text_encoders)
        return emb.token

    def load_controlnet(self, path: str | Path | list, *, variant: str | None = None, allow_pickle: bool = False
                        ) -> int:
        """Load ControlNets / T2I-Adapters (a path or hub id, or a list; diffusers folders or original ControlNet
        files, `fewstep.loading.controlnet`) after those loaded before; each call then takes one control_image
        per model, in this order. Returns how many are loaded. On an error none of `path` is kept."""
        paths = list(path) if isinstance(path, (list, tuple)) else [path]
        models = [load_control(p, self.unet.cfg, device=self.device, dtype=self.dtype, variant=variant,
                               allow_pickle=allow_pickle, vae_scale=self.vae_scale) for p in paths]
        for model, p in zip(models, paths):
            model.title = Path(str(p)).stem if Path(str(p)).is_file() else Path(str(p)).name  # for the infotext
        self.controls.extend(models)
        return len(self.controls)

    def unload_controlnet(self) -> None:
        self.controls.clear()

    def set_lora_scale(self, name: str, scale: float) -> None:
        self.adapters.set_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all: the weights are the loaded model's, bit for bit."""
        self.adapters.remove(name)

    def fuse_lora(self) -> None:
        """Add the LoRAs into the weights at their scales: no extra cost per step until `unfuse_lora`."""
        self.adapters.fuse()

    def unfuse_lora(self) -> None:
        """Put the weights back as they were before `fuse_lora`, exactly."""
        self.adapters.unfuse()

    @property
    def vae_scale(self) -> int:
        """Pixels per latent: 2 ** (levels - 1) for an AutoencoderKL, as diffusers computes it; TAESD is 8x."""
        levels = getattr(self.vae.cfg, "block_out_channels", None)
        return 2 ** (len(levels) - 1) if levels else 8

    @torch.no_grad()
    def encode_prompt(self, groups: list[list[str]], clip_skip: int = 0
                      ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Groups of prompts in A1111's prompt language -> for each, (context [B, n * 77, D], pooled [B, P] or
        None), per `self.conditioning`; all with the chunk count of the longest prompt (`fewstep.text`)."""
        return text.encode(self.tokenizers, self.text_encoders, self.conditioning, groups, self.device, self.dtype,
                           clip_skip)

    def _conditioning(self, request: Request, part: slice, cfg: bool) -> dict:
        """The UNet's keyword inputs for one batch (doubled, unconditional first, under guidance)."""
        prompts = list(request.prompts[part])
        zeros = cfg and request.negative is None and self.conditioning.zeros_for_empty_negative
        negative = list(request.negative[part]) if request.negative is not None else [""] * len(prompts)
        groups = [prompts] + ([negative] if cfg and not zeros else [])
        (context, pooled), *rest = self.encode_prompt(groups, request.clip_skip)
        if cfg:
            if zeros:
                neg_ctx, neg_pooled = torch.zeros_like(context), (None if pooled is None else torch.zeros_like(pooled))
            else:
                neg_ctx, neg_pooled = rest[0]
            context = torch.cat([neg_ctx, context])
            pooled = None if pooled is None else torch.cat([neg_pooled, pooled])
        cond = {"context": context}
        if self.conditioning.pooled:
            cond["text_embeds"] = pooled
        if self.conditioning.time_ids:
            cond["time_ids"] = self._time_ids(request, context.shape[0], cfg)
        return cond

    def _time_ids(self, request: Request, rows: int, cfg: bool) -> torch.Tensor:
        """SDXL's size / crop ids, [rows, 6]: the original size, the crop's top-left, then the target size;
        the refiner's, [rows, 5], end in the aesthetic score instead (the negative score for the rows of
        the unconditional half)."""
        head = request.original_size + request.crop_top_left
        if not self.conditioning.aesthetic_score:
            return torch.tensor([head + request.target_size] * rows).to(self.device, self.dtype)
        pos, neg = head + (request.aesthetic_score,), head + (request.negative_aesthetic_score,)
        half = rows // 2 if cfg else 0
        return torch.tensor([neg] * half + [pos] * (rows - half)).to(self.device, self.dtype)

    def _model_fn(self, cond: dict, guidance: float, cfg: bool, cache=None, extra: torch.Tensor | None = None,
                  steer: control.Steering | None = None) -> Callable:
        """The guided model output as a function of (x, t), in fp32. `cache` (e.g. speed.deepcache)
        wraps the UNet for this one generation, so any state it keeps starts fresh each call; `extra`
        channels (an inpainting UNet's mask and masked-source latents) are stacked onto its input; `steer`
        adds the ControlNets' / T2I-Adapters' residuals."""
        proj_dim = self.unet.cfg.time_cond_proj_dim
        unet = self.unet if cache is None else cache.wrap(self.unet)
        n = cond["context"].shape[0] // (2 if cfg else 1)
        if proj_dim is not None:
            w = torch.full((n,), guidance - 1.0)
            cond = {**cond, "timestep_cond": guidance_embedding(w, proj_dim).to(self.device, self.dtype)}
        if self.token_downsample > 1:
            cond = {**cond, "token_downsample": self.token_downsample}
        fmt = memory_format(self.unet)
        if extra is not None:
            extra = torch.cat([extra, extra]) if cfg else extra

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(self.dtype, memory_format=fmt)
            if cfg:
                x = torch.cat([x, x])
            residuals = {} if steer is None else steer(x, t, cond)
            if extra is not None:
                x = torch.cat([x, extra.to(x.dtype)], dim=1).contiguous(memory_format=fmt)
            out = unet(x, t, **cond, **residuals).to(torch.float32, memory_format=torch.contiguous_format)
            if not cfg:
                return out
            uncond, text = out.chunk(2)
            return uncond + guidance * (text - uncond)
        return model_fn

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (diffusion space) -> images [N, 3, H, W] in [-1, 1], with `decoder` if set, else `vae`."""
        ae = self.vae if self.decoder is None else self.decoder
        return safe_decode(ae, z).contiguous()

    def _start(self, request: Request, part: slice, generators: list) -> Start:
        """Where this batch's sampling starts (`start.start`), or the request's own initial latents."""
        shape = (self.unet.cfg.out_channels, request.height // self.vae_scale, request.width // self.vae_scale)
        if request.handoff is not None:  # a refiner takes up a base's latents: nothing drawn before the steps
            handoff = request.handoff.to(self.device).expand(len(request.prompts), -1, -1, -1)[part]
            if tuple(handoff.shape[1:]) != shape:
                raise FewstepError(f"the latents to continue from are {tuple(handoff.shape[1:])}, this model's "
                                   f"are {shape}")
            return Start(0, None, handoff, noisy=handoff)
        if request.latents is None:
            return start(request.edit, request.steps, shape, generators, self.vae, self.unet.cfg.in_channels,
                         self.device)
        want = (len(request.prompts), *shape)
        if tuple(request.latents.shape) != want:
            raise FewstepError(f"latents have shape {tuple(request.latents.shape)}, expected {want} for "
                               f"{request.width}x{request.height}")
        return Start(0, None, request.latents[part].to(self.device, torch.float32))

    def _batch(self, request: Request, part: slice, callback, progress: bool, cache):
        """One model-call batch of the request: latents, [N, 3, H, W] images or PIL images."""
        cfg = request.guidance > 1.0 and self.unet.cfg.time_cond_proj_dim is None
        cond = self._conditioning(request, part, cfg)
        # One generator per image (seed + i): it draws the image's start (its source's latent sample, its
        # initial noise) and then each step's fresh noise, as diffusers draws from a list of generators:
        # any image of a batch is the image made alone.
        generators = [torch.Generator().manual_seed(s) for s in request.seeds[part]]
        first = self._start(request, part, generators)
        ays = "sd15" if self.unet.cfg.addition_time_embed_dim is None else "sdxl"  # Align Your Steps' list
        begin, end = samplers.cut(request.sampler, self.scheduler, request.steps, request.karras,
                                  request.denoising_start, request.denoising_end, request.sigma_schedule, ays)
        steer = None
        if request.control is not None:  # the guidance windows count the steps that run
            run = samplers.schedule_of(request.sampler, self.scheduler, request.steps, request.karras,
                                       request.sigma_schedule, ays).timesteps[max(first.step, begin):end]
            steer = control.Steering(self.controls, request.control, run.tolist(), len(generators), cfg, self.device,
                                     self.dtype)
        denoise = Denoiser(self._model_fn(cond, request.guidance, cfg, cache, first.extra, steer), self.scheduler)
        z = samplers.run(request.sampler, denoise, first.noise, self.scheduler, request.steps, karras=request.karras,
                         sigma_schedule=request.sigma_schedule, ays_model=ays, eta=request.eta, generator=generators,
                         callback=callback, progress=progress,
                         start=max(first.step, begin), end=end, x0=first.x0, noisy=first.noisy, blend=first.blend)
        return z if request.output_type == "latent" else self._output(request, part, self.decode(z))

    def _output(self, request: Request, part: slice, images: torch.Tensor):
        """Decoded images as the request wants them: a tensor, or PIL images with A1111's parameters text,
        pasted into their source where an inpainting asks (`edits.paste`)."""
        if request.output_type == "pt" and not _pastes(request.edit):
            return images
        out = [paste(im, request.edit) if _pastes(request.edit) else im for im in to_pil(images)]
        if request.output_type == "pt":
            return from_uint8(np.stack([np.asarray(im) for im in out])).to(images.device)
        name = samplers.spec(request.sampler).a1111 or request.sampler
        loras = {lora.name: lora.hash for lora, _ in self.adapters.loras.values()}
        for i, image in zip(range(part.start, part.stop), out):
            image.info["parameters"] = infotext(request, i, self.name, name, loras,  # A1111's text, for saving
                                                tuple(getattr(c, "title", "") for c in self.controls))
        return out

    def work(self, request: Request) -> Work:
        """What `memory.check` needs to know of this request on this model."""
        ae = self.vae if self.decoder is None else self.decoder
        widths = getattr(ae.cfg, "block_out_channels", None)
        return Work(request.width, request.height, len(request.prompts), request.batch_size,
                    request.guidance > 1.0 and self.unet.cfg.time_cond_proj_dim is None,
                    self.unet.cfg.block_out_channels[0], widths[0] if widths else ae.cfg.channels,
                    self.unet.cfg.out_channels, self.vae_scale, self.dtype.itemsize,
                    3 if request.output_type == "pil" else 12)

    def _unchanged(self, request: Request):
        """The source, as outputs of a call whose strength runs no step (A1111 returns it too)."""
        n = len(request.prompts)
        if request.output_type == "latent":  # the source's posterior mean
            return self.vae.encode(autoencoder_input(self.vae, request.edit.image)).float().expand(n, -1, -1, -1)
        return self._output(request, slice(0, n), request.edit.image.expand(n, -1, -1, -1).to(self.device))

    @torch.no_grad()
    def generate(self, request: Request, *, callback: Callable | None = None, progress: bool = True, cache=None):
        """Run a resolved request, `request.batch_size` images per model call (memory stays that of one
        batch); returns what `__call__` returns."""
        inpainting = request.edit is not None and request.edit.mask is not None
        if self.unet.cfg.in_channels != self.unet.cfg.out_channels and not inpainting:
            raise FewstepError(f"this UNet takes {self.unet.cfg.in_channels} input channels (an inpainting model): "
                               "give it image= and mask_image= to repaint, or use a 4-channel model")
        check(self.work(request), self.device)
        control.check(self.controls, request.control)
        if cache is not None and request.control is not None:
            raise FewstepError("DeepCache does not combine with ControlNets / T2I-Adapters: leave out one of them")
        if request.edit is not None and first_step(request.steps, request.edit.strength) == request.steps:
            warnings.warn(f"strength {request.edit.strength:g} of {request.steps} steps runs no step: the image is "
                          "returned as it is", stacklevel=3)
            return self._unchanged(request)
        with self._prompt_loras(request.loras):
            outs = [self._batch(request, part, callback, progress, cache) for part in request.batches()]
        return [im for out in outs for im in out] if request.output_type == "pil" else torch.cat(outs)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                 seed: int | None = 0, width: int | None = None, height: int | None = None, num_images: int = 1,
                 batch_size: int | None = None, latents: torch.Tensor | None = None, karras: bool | None = None,
                 eta: float = 0.0, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 output_type: str = "pil", image=None, mask_image=None, strength: float | None = None,
                 mask_blur: int = 0, invert_mask: bool = False, padding_mask_crop: int | None = None,
                 overlay: bool = False, masked_content: str = "original", outpaint: tuple | None = None,
                 denoising_start: float | None = None, denoising_end: float | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, clip_skip: int | None = None, sigma_schedule: str | None = None,
                 control_image=None, controlnet_conditioning_scale: float | list = 1.0,
                 control_guidance_start: float | list = 0.0, control_guidance_end: float | list = 1.0,
                 guess_mode: bool = False, callback: Callable | None = None, progress: bool = True, cache=None):
        """Generate `num_images` images per prompt: PIL images (with A1111's `parameters` text in `.info`), or a
        [N, 3, H, W] tensor in [-1, 1] (output_type="pt"), or latents ("latent"). None: the model's default.

        Image i uses seed + i (-1 / None: random). `batch_size`: images per model call (throughput mode).
        `latents`: the initial noise. SDXL: `original_size`, `crop_top_left`, `target_size` (height,
        width); a refiner's `aesthetic_score`s; a base's `denoising_end` and a refiner's `denoising_start`
        (with the base's latents as `image`). `clip_skip`: text-encoder layers left out (diffusers'
        meaning; A1111's "Clip skip: 2" is clip_skip=1). `sigma_schedule`: "karras", "exponential",
        "sgm_uniform" or "ays" spacing (docs/samplers.md). Editing (docs/editing.md): `image` at `strength`, with a
        `mask_image` to inpaint, A1111's `mask_blur`, `invert_mask`, `padding_mask_crop`, `overlay`,
        `masked_content`, `outpaint=(left, right, top, bottom)`. ControlNet / T2I-Adapter (docs/controlnet.md): one
        `control_image` per loaded model, `controlnet_conditioning_scale`, `control_guidance_start` / `_end`,
        `guess_mode`. `callback(i, x, denoised, sigma)` sees every step; `cache.wrap(unet)` stands in for the UNet."""
        request = resolve(self.defaults, prompt, negative_prompt, steps=steps, guidance=guidance, sampler=sampler,
                          seed=seed, width=width, height=height, num_images=num_images, batch_size=batch_size,
                          latents=latents, karras=karras, eta=eta, original_size=original_size,
                          crop_top_left=crop_top_left, target_size=target_size, output_type=output_type, image=image,
                          mask_image=mask_image, strength=strength, mask_blur=mask_blur, invert_mask=invert_mask,
                          padding_mask_crop=padding_mask_crop, overlay=overlay, masked_content=masked_content,
                          outpaint=outpaint, denoising_start=denoising_start, denoising_end=denoising_end,
                          aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                          clip_skip=clip_skip, sigma_schedule=sigma_schedule, control_image=control_image,
                          controlnet_conditioning_scale=controlnet_conditioning_scale,
                          control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                          guess_mode=guess_mode)
        return self.generate(request, callback=callback, progress=progress, cache=cache)


def _pastes(edit) -> bool:
    return edit is not None and (edit.crop is not None or edit.overlay)


def load_pipeline(path: str | Path | None = None, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, variant: str | None = None, allow_pickle: bool = False,
                  config: str | Path | None = None, prediction_type: str | None = None) -> Pipeline:
    """A Pipeline as the checkpoint describes it, with no speed options (`fewstep.load` adds them)."""
    return Pipeline(**vars(load_components(path, device=device, dtype=dtype, variant=variant,
                                           allow_pickle=allow_pickle, config=config, prediction_type=prediction_type)))
