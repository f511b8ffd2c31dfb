"""Stage 4: the teacher, fewstep's UNet trained as a latent DDPM on the frozen VAE's latents,
conditioned on the frozen text encoder's last hidden states.

Follows Ho et al. 2020 (DDPM: predict the noise, uniform timesteps) with Stable Diffusion's
choices (Rombach et al. 2022): scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon
prediction, 10% of captions replaced by "" so classifier-free guidance (Ho & Salimans 2021)
works, and an EMA of the weights as the model. The loss is weighted by min-SNR-5 (Hang et al.
2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), which converges several
times faster than the plain epsilon loss: the budget here is an hour of CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.unet import UNet
from ..schedules import alphas_cumprod
from .common import EMA, batches, count, generator, images_to_tensor, init_weights, seed_for, set_lr, warmup_lr
from .loop import Hyper, Stage
from .sizes import Sizes

CAPTION_DROPOUT = 0.1
GUIDANCE = 5.0  # the teacher's classifier-free guidance scale: its default, and the distillation target's
MIN_SNR_GAMMA = 5.0
UNET_ZERO = ("conv2", "conv_out", "proj_out", "to_out.0")  # residual branches and the output start at 0


class LatentData:
    """One process's batch of step i: rendered scenes -> VAE latents (posterior samples) and text
    context, computed by the frozen encoders (in a data worker when the stage has one)."""

    def __init__(self, run: Path, stage: str, sizes: Sizes, seed: int, n: int, rank: int, dropout: float):
        from ..loading import load_autoencoder, load_text_encoder
        from ..tokenizer import CLIPTokenizer
        self.tokenizer = CLIPTokenizer.from_folder(Path(run) / "tokenizer")
        self.text = load_text_encoder(Path(run) / "clip" / "text_encoder")
        self.vae = load_autoencoder(Path(run) / "vae")
        self.stage, self.sizes, self.seed, self.n, self.rank, self.dropout = stage, sizes, seed, n, rank, dropout

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        from ..shapes.render import batch
        s = seed_for(self.seed, self.stage, step, self.rank)
        images, captions, _ = batch(s, self.n, size=self.sizes.image)
        g = generator(s)
        drop = torch.rand(self.n, generator=g) < self.dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        out = self.text(self.tokenizer(captions))
        latents = self.vae.encode(images_to_tensor(images), g, sample=True)
        return {"latents": latents, "context": out.last_hidden_state, "pooled": out.pooled, "seed": s,
                "captions": captions}


def diffuse(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), a_t = alphas_cumprod[t]."""
    a = ac[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def min_snr_weight(t: torch.Tensor, ac: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample: the epsilon-loss form of min-SNR-gamma weighting."""
    snr = ac[t] / (1 - ac[t])
    return snr.clamp(max=gamma) / snr


def denoising_loss(model, b: dict, ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min-SNR-weighted epsilon loss at uniform timesteps, and the plain per-sample MSE (for the log)."""
    g = generator(b["seed"] + 1)
    x0 = b["latents"]
    t = torch.randint(0, len(ac), (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    per_sample = F.mse_loss(model(diffuse(x0, noise, t, ac), t, b["context"]), noise, reduction="none").mean((1, 2, 3))
    return (per_sample * min_snr_weight(t, ac)).mean(), per_sample.mean()


def train_teacher(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool) -> dict:
    """Train the teacher; writes the EMA weights to OUT/teacher/unet/ (diffusers layout, fp32) and
    returns a quick accuracy check (full size only: the evaluator needs 128x128 scenes)."""
    from .evaluate import finish_unet, preview
    from .export import TRAIN_SCHEDULE
    out = Path(out)
    stage = Stage("teacher", out, hyper, seed)
    data = LatentData(out, "teacher", sizes, seed, stage.per_process, stage.rank, CAPTION_DROPOUT)
    torch.manual_seed(seed)
    unet = init_weights(UNet(sizes.unet), zero=UNET_ZERO)
    opt = torch.optim.AdamW(unet.parameters(), lr=hyper.lr, weight_decay=0.01)
    model, opt = stage.accel.prepare(unet, opt)
    ema = EMA(stage.accel.unwrap_model(model), 0.999)
    stage.track(ema)
    start = stage.restore(resume)
    ac = alphas_cumprod(TRAIN_SCHEDULE)

    def step_fn(step: int, b: dict) -> dict:
        set_lr(opt, warmup_lr(step, hyper.lr, hyper.warmup, hyper.steps))
        loss, mse = denoising_loss(model, b, ac)
        opt.zero_grad(set_to_none=True)
        stage.accel.backward(loss)
        stage.accel.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(stage.accel.unwrap_model(model), step)
        return {"loss": loss.item(), "mse": mse.item()}

    def on_preview(step: int) -> None:
        ema_unet = UNet(sizes.unet)
        ema_unet.load_state_dict(ema.shadow)
        preview(ema_unet, data, "linspace", 20, GUIDANCE, out / "samples" / f"teacher-{step:05d}.png")

    if stage.main:
        print(f"teacher: UNet {count(unet) / 1e6:.2f}M parameters", flush=True)
    done = stage.run(batches(data, start, hyper.steps, hyper.workers), step_fn, on_preview)
    if done and stage.main:
        return finish_unet(out, "teacher", stage.accel.unwrap_model(model), ema, sizes, "linspace", 20, GUIDANCE, 64)
    return {}
