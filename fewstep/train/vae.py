"""Stage 3: the KL autoencoder (128x128x3 <-> 16x16x4 latents, 8x down-sampling).

Follows Rombach et al. 2022 (LDM, `AutoencoderKL`): an encoder that outputs a diagonal Gaussian,
a decoder fed a sample of it, a reconstruction loss (here L1 + L2: flat colours and hard edges
need no perceptual or adversarial term) and a small KL penalty towards N(0, I) that keeps the
latent space smooth. The network is fully convolutional, so it trains on random 64x64 crops (4x
cheaper) and is used at 128x128. Afterwards `scaling_factor` is set to 1 / std of the latents,
as Stable Diffusion's 0.18215 was, so the diffusion models see unit-variance latents.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..imaging import from_uint8, to_uint8
from ..models.vae import AutoencoderKL
from ..shapes.data import batch
from ..shapes.evaluate import accuracy
from .common import batches, count, generator, init_weights, seed_for, set_lr, warmup_lr
from .export import save_vae
from .loop import Hyper, Stage
from .sizes import Sizes

KL_WEIGHT = 1e-5  # per latent element, against the per-pixel mean reconstruction loss


class VAELoss(nn.Module):
    """The training objective as a module, so a data-parallel wrapper sees one forward."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mean, logvar = self.vae.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * noise  # reparameterised posterior sample
        rec = self.vae.decoder(self.vae.post_quant_conv(z))
        l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return l1 + l2 + KL_WEIGHT * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def crops(images: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """One random side x side crop per image, at multiples of 8 (the latent grid)."""
    size = images.shape[1]
    if side >= size:
        return images
    offsets = rng.integers(0, (size - side) // 8 + 1, size=(len(images), 2)) * 8
    return np.stack([im[y:y + side, x:x + side] for im, (y, x) in zip(images, offsets)])


def train_vae(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool) -> dict:
    """Train the autoencoder; writes OUT/vae/ (diffusers layout, fp32) with its scaling factor."""
    out = Path(out)
    stage = Stage("vae", out, hyper, seed)
    torch.manual_seed(seed)
    vae = init_weights(AutoencoderKL(sizes.vae))
    model = VAELoss(vae)
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.lr, weight_decay=0.0, betas=(0.9, 0.99))
    model, opt = stage.accel.prepare(model, opt)
    start = stage.restore(resume)
    crop = max(32, sizes.image // 2)

    def make(step: int) -> dict:
        s = seed_for(seed, "vae", step, stage.rank)
        images, _, _ = batch(s, stage.per_process, size=sizes.image)
        x = from_uint8(crops(images, crop, np.random.default_rng(s)))
        lat = (crop // 8, crop // 8)
        return {"x": x, "noise": torch.randn(len(x), sizes.vae.latent_channels, *lat, generator=generator(s))}

    def step_fn(step: int, b: dict) -> dict:
        set_lr(opt, warmup_lr(step, hyper.lr, hyper.warmup, hyper.steps))
        loss, parts = model(b["x"], b["noise"])
        opt.zero_grad(set_to_none=True)
        stage.accel.backward(loss)
        opt.step()
        return parts

    if stage.main:
        print(f"vae: {count(vae) / 1e6:.2f}M parameters (decoder {count(vae.decoder) / 1e6:.2f}M)", flush=True)
    done = stage.run(batches(make, start, hyper.steps, hyper.workers), step_fn)
    if done and stage.main:
        vae = stage.accel.unwrap_model(model).vae.eval().cpu()  # the closing checks render on the CPU
        scale = latent_scale(vae, sizes, seed)
        vae.cfg = replace(vae.cfg, scaling_factor=scale)
        save_vae(out / "vae", vae, sizes.image)
        report = reconstruction_report(vae, sizes)
        print(f"vae: scaling_factor {scale:.4f}; reconstructions: PSNR {report['psnr']:.1f} dB, "
              f"evaluator accuracy {report['accuracy']:.3f}", flush=True)
        return {"scaling_factor": round(scale, 5), **{k: round(float(v), 4) for k, v in report.items()}}
    return {}


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, sizes: Sizes, seed: int, n: int = 256) -> float:
    """1 / std of posterior samples of n full-size scenes (the raw latents: scaling factor 1)."""
    vae = vae.eval()
    vae.cfg = replace(vae.cfg, scaling_factor=1.0)
    images, _, _ = batch(seed_for(seed, "vae", 10**9), n, size=sizes.image)
    z = vae.encode(from_uint8(images), generator(seed), sample=True)
    return float(1.0 / z.std())


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKL, sizes: Sizes, n: int = 64) -> dict:
    """PSNR of full-size reconstructions and the shapes evaluator's accuracy on them (full captions)."""
    images, captions, _ = batch(seed_for(777, "vae", 0), n, size=sizes.image, drop=0.0)
    x = from_uint8(images)
    rec = vae.decode(vae.encode(x)).clamp(-1, 1)
    mse = float(((rec - x) / 2).pow(2).mean())
    acc = accuracy(captions, list(to_uint8(rec)))["all"] if sizes.image >= 64 else float("nan")
    return {"psnr": 10 * np.log10(1 / max(mse, 1e-10)), "accuracy": acc}
