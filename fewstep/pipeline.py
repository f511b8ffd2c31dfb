"""Text-to-image: prompt -> CLIP context -> k-diffusion sampling of the UNet -> VAE decode -> PIL.

Follows the diffusers StableDiffusionPipeline / StableDiffusionXLPipeline numerics (classifier-free
guidance on the raw model output, SDXL micro-conditioning, `force_zeros_for_empty_prompt`, the
initial noise scaled by the sampler's initial sigma) so both stacks give the same image from the
same initial latents; everything else is a plain function call. A call is resolved once into a
`request.Request`; `generate` runs it batch by batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from . import samplers
from .configs import SchedulerConfig, TextConditioning
from .denoiser import Denoiser
from .errors import FewstepError
from .imaging import memory_format, safe_decode, to_pil
from .memory import Work, check
from .request import Defaults, Request, infotext, resolve


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

    @property
    def vae_scale(self) -> int:
        """Pixels per latent: 2 ** (levels - 1) for an AutoencoderKL, as diffusers computes it; TAESD is 8x."""
        levels = getattr(self.vae.cfg, "block_out_channels", None)
        return 2 ** (len(levels) - 1) if levels else 8

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> (context [B, 77, D], pooled [B, P] or None), per `self.conditioning`."""
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(tok(prompts).to(self.device))
            states.append(out.penultimate if self.conditioning.hidden_state == "penultimate" else out.last_hidden_state)
            pooled = out.text_embeds
        context = torch.cat(states, dim=-1).to(self.dtype)  # [B, 77, 768 | 1024 | 2048]
        return context, (pooled.to(self.dtype) if self.conditioning.pooled else None)

    def _conditioning(self, request: Request, part: slice, cfg: bool) -> dict:
        """The UNet's keyword inputs for one batch (doubled, unconditional first, under guidance)."""
        context, pooled = self.encode_prompt(list(request.prompts[part]))
        if cfg:
            if request.negative is None and self.conditioning.zeros_for_empty_negative:
                neg_ctx, neg_pooled = torch.zeros_like(context), (None if pooled is None else torch.zeros_like(pooled))
            else:
                negative = request.negative[part] if request.negative is not None else [""] * context.shape[0]
                neg_ctx, neg_pooled = self.encode_prompt(list(negative))
            context = torch.cat([neg_ctx, context])
            pooled = None if pooled is None else torch.cat([neg_pooled, pooled])
        cond = {"context": context}
        if self.conditioning.pooled:
            cond["text_embeds"] = pooled
        if self.conditioning.time_ids:
            ids = torch.tensor([request.original_size + request.crop_top_left + request.target_size])
            cond["time_ids"] = ids.to(self.device, self.dtype).repeat(context.shape[0], 1)  # [B, 6]
        return cond

    def _model_fn(self, cond: dict, guidance: float, cfg: bool, cache=None) -> Callable:
        """The guided model output as a function of (x, t), in fp32. `cache` (e.g. speed.deepcache)
        wraps the UNet for this one generation, so any state it keeps starts fresh each call."""
        proj_dim = self.unet.cfg.time_cond_proj_dim
        unet = self.unet if cache is None else cache.wrap(self.unet)
        n = cond["context"].shape[0] // (2 if cfg else 1)
        if proj_dim is not None:
            w = torch.full((n,), guidance - 1.0)
            cond = {**cond, "timestep_cond": guidance_embedding(w, proj_dim).to(self.device, self.dtype)}
        if self.token_downsample > 1:
            cond = {**cond, "token_downsample": self.token_downsample}
        fmt = memory_format(self.unet)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(self.dtype, memory_format=fmt)
            if cfg:
                x = torch.cat([x, x])
            out = unet(x, t, **cond).to(torch.float32, memory_format=torch.contiguous_format)
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

    def _initial_latents(self, request: Request, part: slice, generators: list) -> torch.Tensor:
        """Unit noise for the batch, row i from image i's generator; or the request's own latents."""
        shape = (self.unet.cfg.out_channels, request.height // self.vae_scale, request.width // self.vae_scale)
        if request.latents is None:
            return samplers.randn((len(generators), *shape), generators, device=self.device)
        want = (len(request.prompts), *shape)
        if tuple(request.latents.shape) != want:
            raise FewstepError(f"latents have shape {tuple(request.latents.shape)}, expected {want} for "
                               f"{request.width}x{request.height}")
        return request.latents[part].to(self.device, torch.float32)

    def _batch(self, request: Request, part: slice, callback, progress: bool, cache):
        """One model-call batch of the request: latents, [N, 3, H, W] images or PIL images."""
        cfg = request.guidance > 1.0 and self.unet.cfg.time_cond_proj_dim is None
        cond = self._conditioning(request, part, cfg)
        denoise = Denoiser(self._model_fn(cond, request.guidance, cfg, cache), self.scheduler)
        # One generator per image (seed + i), first for its initial noise, then for each step's fresh noise,
        # as diffusers draws from a list of generators: any image of a batch is the image made alone.
        generators = [torch.Generator().manual_seed(s) for s in request.seeds[part]]
        noise = self._initial_latents(request, part, generators)
        z = samplers.run(request.sampler, denoise, noise, self.scheduler, request.steps, karras=request.karras,
                         eta=request.eta, generator=generators, callback=callback, progress=progress)
        if request.output_type == "latent":
            return z
        images = self.decode(z)
        if request.output_type == "pt":
            return images
        name = samplers.spec(request.sampler).a1111 or request.sampler
        out = to_pil(images)
        for i, image in zip(range(part.start, part.stop), out):
            image.info["parameters"] = infotext(request, i, self.name, name)  # A1111's text, for saving
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

    @torch.no_grad()
    def generate(self, request: Request, *, callback: Callable | None = None, progress: bool = True, cache=None):
        """Run a resolved request, `request.batch_size` images per model call (memory stays that of one
        batch); returns what `__call__` returns."""
        if self.unet.cfg.in_channels != self.unet.cfg.out_channels:
            raise FewstepError(f"this UNet takes {self.unet.cfg.in_channels} input channels (an inpainting model): "
                               "text-to-image needs a 4-channel UNet")
        check(self.work(request), self.device)
        outs = [self._batch(request, part, callback, progress, cache) for part in request.batches()]
        return [im for out in outs for im in out] if request.output_type == "pil" else torch.cat(outs)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                 seed: int | None = 0, width: int | None = None, height: int | None = None, num_images: int = 1,
                 batch_size: int | None = None, latents: torch.Tensor | None = None, karras: bool | None = None,
                 eta: float = 0.0, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 output_type: str = "pil", callback: Callable | None = None, progress: bool = True, cache=None):
        """Generate `num_images` images per prompt; returns PIL images (or a [N,3,H,W] tensor in [-1, 1]
        with output_type="pt", or latents with output_type="latent"). None means the model's default.

        Image i uses seed + i (-1 or None: a random seed); PIL images carry A1111's `parameters` text in
        `image.info` (`fewstep.outputs.save_image` writes it). `batch_size` (throughput mode) runs the images that many at a time:
        each model call then works on a batch (faster per image, on CPU as on GPU) while memory stays
        that of one batch. `latents` replaces the seeds' initial noise. SDXL micro-conditioning:
        `original_size`, `crop_top_left`, `target_size` as (height, width). `callback(i, x, denoised,
        sigma)` sees every step (`fewstep.speed.accel.preview_callback` makes previews); `cache` is an
        object whose `wrap(unet)` returns a callable used exactly like the UNet for this generation
        (feature caching, e.g. `fewstep.speed.deepcache`)."""
        request = resolve(self.defaults, prompt, negative_prompt, steps=steps, guidance=guidance, sampler=sampler,
                          seed=seed, width=width, height=height, num_images=num_images, batch_size=batch_size,
                          latents=latents, karras=karras, eta=eta, original_size=original_size,
                          crop_top_left=crop_top_left, target_size=target_size, output_type=output_type)
        return self.generate(request, callback=callback, progress=progress, cache=cache)
