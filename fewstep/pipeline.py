"""Text-to-image: prompt -> CLIP context -> k-diffusion sampling of the UNet -> VAE decode -> PIL.

Follows the diffusers StableDiffusionPipeline / StableDiffusionXLPipeline numerics (classifier-free
guidance on the raw model output, SDXL micro-conditioning, `force_zeros_for_empty_prompt`, the
initial noise scaled by the sampler's initial sigma) so both stacks give the same image from the
same initial latents; everything else is a plain function call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import samplers
from .configs import SchedulerConfig
from .denoiser import Denoiser
from .errors import FewstepError


@dataclass(frozen=True)
class Defaults:
    """What a checkpoint is meant to be run with when the caller does not say."""

    steps: int = 25
    guidance: float = 7.5
    sampler: str | None = None  # None: the checkpoint's scheduler class decides
    size: int | None = None  # None: the UNet's training size x 8


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale w (VDM's Fourier features of w * 1000), [B, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.nn.functional.pad(torch.cat([emb.sin(), emb.cos()], dim=1), (0, dim % 2))


def to_pil(images: torch.Tensor) -> list:
    """[N, 3, H, W] in [-1, 1] -> PIL images, rounding as diffusers' image processor does."""
    from PIL import Image
    x = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def native_bf16(device) -> bool:
    """Whether `device` multiplies bf16 in hardware: any GPU, or a CPU with AVX512-BF16 or AMX. On
    other CPUs oneDNN emulates bf16 through fp32, slower than fp32 itself (4x for the SD VAE decoder
    on this project's development CPU, docs/BENCHMARKS.md)."""
    if torch.device(device).type != "cpu":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's CPU feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def vae_dtype(cfg, dtype: torch.dtype, device, sdxl: bool = False) -> torch.dtype:
    """The dtype to keep an autoencoder in when the rest of a pipeline on `device` runs in `dtype`.

    fp16 on a GPU, as diffusers' pipelines do: an SDXL pipeline (`sdxl`) whose VAE config says
    `force_upcast` (the SDXL VAE's decoder activations overflow fp16) keeps that VAE in fp32, decided
    once at load time (diffusers converts it there and back around every call); SD 1.x / 2.x pipelines
    decode in fp16, as diffusers' StableDiffusionPipeline and A1111 do (their configs carry
    AutoencoderKL's default force_upcast=True, which diffusers' SD pipeline does not read). A decode
    that overflows anyway is caught by `safe_decode` and run again in fp32 (A1111's "revert VAE to
    32-bit"). fp16 on a CPU: a force_upcast VAE stays fp32, as CPUs have no fast fp16 convolutions
    (diffusers' fp16 SD-Turbo decode took 59.7 s against fewstep's fp32 1.6 s at 64x64 on the
    development CPU, one run). bf16 has fp32's range and is kept, except on a CPU without bf16
    hardware (`native_bf16`), where the autoencoder stays fp32: faster there, and exact. TAESD
    configs have no force_upcast flag."""
    cpu = torch.device(device).type == "cpu"
    if dtype == torch.float16 and (sdxl or cpu) and getattr(cfg, "force_upcast", False):
        return torch.float32
    if dtype == torch.bfloat16 and not native_bf16(device):
        return torch.float32
    return dtype


def memory_format(m: torch.nn.Module) -> torch.memory_format:
    """The layout `m`'s convolutions hold their weights in (see `accel.optimize`): inputs are
    handed over in it, so the first conv does not convert."""
    w = next((c.weight for c in m.modules() if isinstance(c, torch.nn.Conv2d)), None)
    if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def autoencoder_input(ae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Latents on `ae`'s device, in its dtype and its convolutions' memory layout."""
    p = next(ae.parameters())
    return z.to(p.device, p.dtype, memory_format=memory_format(ae))


def safe_decode(ae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decode latents in the autoencoder's own dtype; if a half-precision one overflows (NaN/inf),
    warn and decode again in fp32 (a rare, per-call conversion; see `vae_dtype` for the usual case)."""
    dtype = next(ae.parameters()).dtype
    x = ae.decode(autoencoder_input(ae, z))
    if not torch.isfinite(x).all():
        if dtype == torch.float32:
            raise FewstepError("the VAE produced NaN/inf in fp32: the latents are broken (check the model and inputs)")
        warnings.warn(f"VAE decode in {dtype} gave NaN/inf; decoding again in float32", stacklevel=2)
        x = _decode_as(ae, z, torch.float32)
    return x


def _decode_as(ae: torch.nn.Module, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    old = next(ae.parameters()).dtype
    try:
        return ae.to(dtype).decode(z.to(dtype))
    finally:
        ae.to(old)


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < 8 or v % 8:
            raise FewstepError(f"{name}={v!r} must be a positive multiple of 8 (e.g. 512)")


@dataclass
class Pipeline:
    """A loaded text-to-image model. Call it with a prompt; see `__call__`.

    `decoder` (e.g. TAESD, set by `fewstep.accel.optimize`) decodes instead of `vae` when set; `vae`
    stays for encoding and for switching back. The UNet and the autoencoders get their inputs in the
    memory layout of their own conv weights (`memory_format`; `optimize` sets it)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: SchedulerConfig
    force_zeros_for_empty_prompt: bool = False
    defaults: Defaults = field(default_factory=Defaults)
    name: str = ""
    decoder: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def sdxl(self) -> bool:
        """Two text encoders, penultimate layers concatenated, pooled text + size ids (SDXL)."""
        return len(self.text_encoders) == 2

    @property
    def vae_scale(self) -> int:
        """Pixels per latent: 2 ** (levels - 1) for an AutoencoderKL, as diffusers computes it; TAESD is 8x."""
        levels = getattr(self.vae.cfg, "block_out_channels", None)
        return 2 ** (len(levels) - 1) if levels else 8

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> (context [B, 77, D], pooled [B, P] or None)."""
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(tok(prompts).to(self.device))
            states.append(out.penultimate if self.sdxl else out.last_hidden_state)
            pooled = out.text_embeds
        context = torch.cat(states, dim=-1).to(self.dtype)  # [B, 77, 768 | 1024 | 2048]
        return context, (pooled.to(self.dtype) if self.sdxl else None)

    def _conditioning(self, prompts, negative, cfg: bool, time_ids: torch.Tensor):
        """The UNet's keyword inputs for the whole (possibly CFG-doubled) batch."""
        context, pooled = self.encode_prompt(prompts)
        if cfg:
            if negative is None and self.force_zeros_for_empty_prompt:
                neg_ctx, neg_pooled = torch.zeros_like(context), (None if pooled is None else torch.zeros_like(pooled))
            else:
                neg_ctx, neg_pooled = self.encode_prompt(negative if negative is not None else [""] * len(prompts))
            context = torch.cat([neg_ctx, context])
            pooled = None if pooled is None else torch.cat([neg_pooled, pooled])
        cond = {"context": context}
        if self.sdxl:
            cond["text_embeds"] = pooled
            cond["time_ids"] = time_ids.to(self.device, self.dtype).repeat(context.shape[0], 1)
        return cond

    def _model_fn(self, cond: dict, guidance: float, cfg: bool, cache=None) -> Callable:
        """The guided model output as a function of (x, t), in fp32. `cache` (e.g. fewstep.deepcache)
        wraps the UNet for this one generation, so any state it keeps starts fresh each call."""
        proj_dim = self.unet.cfg.time_cond_proj_dim
        unet = self.unet if cache is None else cache.wrap(self.unet)
        n = cond["context"].shape[0] // (2 if cfg else 1)
        if proj_dim is not None:
            w = torch.full((n,), guidance - 1.0)
            cond = {**cond, "timestep_cond": guidance_embedding(w, proj_dim).to(self.device, self.dtype)}
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

    def _initial_latents(self, latents, n: int, width: int, height: int, seed: int) -> torch.Tensor:
        shape = (n, self.unet.cfg.out_channels, height // self.vae_scale, width // self.vae_scale)
        if latents is None:
            # One generator per image (seed + i), so any image of a batch can be made again alone.
            return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(seed + i))
                              for i in range(n)]).to(self.device)
        if tuple(latents.shape) != shape:
            raise FewstepError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {width}x{height}")
        return latents.to(self.device, torch.float32)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                 seed: int = 0, width: int | None = None, height: int | None = None, num_images: int = 1,
                 latents: torch.Tensor | None = None, karras: bool | None = None, eta: float = 0.0,
                 original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, callback: Callable | None = None,
                 progress: bool = True, output_type: str = "pil", cache=None, batch_size: int | None = None):
        """Generate `num_images` images per prompt; returns PIL images (or a [N,3,H,W] tensor in [-1, 1]
        with output_type="pt", or latents with output_type="latent").

        `batch_size` (throughput mode) runs many images `batch_size` at a time: each model call then
        works on a batch (faster per image, on CPU as on GPU) while memory stays that of one batch.
        Image i keeps its seed + i, so with a deterministic sampler the images are those of one call
        per image; ancestral samplers draw their per-step noise per batch.

        `callback(i, x, denoised, sigma)` sees every step (`fewstep.accel.preview_callback` makes
        previews); `cache` is an object whose `wrap(unet)` returns a callable used exactly like the
        UNet for this generation (feature caching, e.g. `fewstep.deepcache`)."""
        d = self.defaults
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        sampler = sampler or d.sampler or self.scheduler.sampler
        size = d.size or self.unet.cfg.sample_size * self.vae_scale
        width, height = (size if width is None else width), (size if height is None else height)
        check_size(width, height)
        if num_images < 1:
            raise FewstepError(f"num_images={num_images} must be at least 1")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        negative = negative_prompt
        if negative is not None:
            negative = [negative] if isinstance(negative, str) else list(negative)
            if len(negative) not in (1, len(prompts) // num_images):
                raise FewstepError("negative_prompt must be one string or one per prompt")
            negative = [n for n in negative for _ in range(num_images)] if len(negative) > 1 else negative * len(prompts)
        if batch_size is not None and batch_size < 1:
            raise FewstepError(f"batch_size={batch_size} must be at least 1")
        if batch_size is not None and len(prompts) > batch_size:
            outs = []
            for start in range(0, len(prompts), batch_size):
                part = slice(start, start + batch_size)
                outs.append(self(prompts[part], None if negative is None else negative[part], steps=steps,
                                 guidance=guidance, sampler=sampler, seed=seed + start, width=width, height=height,
                                 latents=None if latents is None else latents[part], karras=karras, eta=eta,
                                 original_size=original_size, crop_top_left=crop_top_left, target_size=target_size,
                                 callback=callback, progress=progress, output_type=output_type, cache=cache))
            return [im for out in outs for im in out] if output_type == "pil" else torch.cat(outs)

        if self.unet.cfg.in_channels != self.unet.cfg.out_channels:
            raise FewstepError(f"this UNet takes {self.unet.cfg.in_channels} input channels (an inpainting model): "
                               "text-to-image needs a 4-channel UNet")
        cfg = guidance > 1.0 and self.unet.cfg.time_cond_proj_dim is None
        time_ids = torch.tensor([list((original_size or (height, width)) + tuple(crop_top_left)
                                     + (target_size or (height, width)))], dtype=torch.float32)
        cond = self._conditioning(prompts, negative, cfg, time_ids)
        denoise = Denoiser(self._model_fn(cond, guidance, cfg, cache), self.scheduler)
        noise = self._initial_latents(latents, len(prompts), width, height, seed)
        z = samplers.run(sampler, denoise, noise, self.scheduler, steps, karras=karras, eta=eta,
                         generator=torch.Generator().manual_seed(seed), callback=callback, progress=progress)
        if output_type == "latent":
            return z
        images = self.decode(z)
        return images if output_type == "pt" else to_pil(images)
