"""Stage 4: the teacher, fewstep's UNet trained as a latent DDPM on the frozen VAE's latents,
conditioned on the frozen text encoder's last hidden states.

Follows Ho et al. 2020 (DDPM: predict the noise, uniform timesteps) with Stable Diffusion's
choices (Rombach et al. 2022): scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon
prediction, 10% of captions replaced by "" so classifier-free guidance (Ho & Salimans 2021)
works, and an EMA of the weights as the model. The loss is weighted by min-SNR-5 (Hang et al.
2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), which converges several
times faster than the plain epsilon loss: the budget here is an hour of CPU.

Stage 5, refine, is this same training continued from the teacher (`init`) for 5,000 steps at
6e-4 (the teacher's peak is 5e-4) with the two options below on, all four text layers tuned
(docs/log/2026-11-22-teacher-options.md compares 2 and 4 layers, 3e-4 and 6e-4, 1,000 to 5,000 steps): trained from the start with
them, the teacher lost its positions (docs/log/2026-11-22-refine-stage.md); after it has learned places, they keep
them and lift colour binding. Stage 6, pairs, continues once more (from OUT/refine, 2,000 steps at
2e-4, same options) on a mix of 80% two-object scenes with fuller captions (Hyper.two_objects,
Hyper.caption_drop): what the refined teacher still got wrong was two-object prompts. Stage 7, swap,
continues pairs for 2,000 more steps with the swap contrast (Hyper.swap, `denoising_loss`), against
the two objects drawn at each other's places.

Three options (Hyper.text_layers, Hyper.offset_noise, Hyper.init), for what the frozen-CLIP teacher
gets wrong:
- `text_layers` = k: the text encoder's last k layers (and final LayerNorm) train with the UNet,
  from the CLIP stage's weights, as LDM's text-to-image models trained their text transformer
  with the UNet (Rombach et al. 2022, sec. 4.3.1): a contrastive CLIP need not keep which colour
  goes with which shape (its in-batch negatives rarely differ only in that), and the UNet's loss
  asks for exactly that. The frozen layers run in the data worker; the tuned ones in the training
  process: with all four tuned, a step costs 1.3x a teacher step (32 text positions; 1.7x with 77). Each stage writes its text encoder beside its
  UNet (OUT/teacher/text_encoder is a copy of the CLIP's, k = 0); the refined one is the model's:
  the student and the exported folders use it; the CLIP stage's stays the CLIP-score model.
- `offset_noise` = s (Guttenberg 2023, "Diffusion with Offset Noise"): the training noise gets a
  per-image, per-channel constant of std s. With SD's schedule the last timestep keeps 7% of the
  latent, and these scenes' latents are mostly one flat background: the mean of x_T gives the
  background colour away, so a model trained on it follows the mean of the *sampling* noise, not
  the prompt (measured: removing the noise's mean at sampling lifted the frozen-CLIP teacher's
  one-object accuracy from 82% to 93% on 28 prompts).
- `init` = a trained teacher's folder (its unet/ and, when present, text_encoder/): fine-tune it
  instead of starting from random weights (`fewstep train teacher --init DIR`; refine's default is
  OUT/teacher).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewstepError
from ..imaging import from_uint8
from ..loading.dtypes import native_bf16
from ..loading.folders import load_autoencoder, load_text_encoder, load_unet
from ..models.unet import UNet
from ..schedules import alphas_cumprod
from ..shapes.caption import swap_positions
from ..shapes.data import batch
from ..tokenizer import CLIPTokenizer
from .common import EMA, batches, count, generator, init_weights, seed_for, set_lr, warmup_lr
from .evaluate import finish_unet, preview
from .export import TEACHER_SCHEDULER, TRAIN_SCHEDULE, save_text_encoder
from .loop import Hyper, Stage
from .runs import text_encoder_folder
from .sizes import Sizes

CAPTION_DROPOUT = 0.1
GUIDANCE = 5.0  # the teacher's classifier-free guidance scale: its default, and the distillation target's
MIN_SNR_GAMMA = 5.0
SWAP_MARGIN = 0.1  # swap contrast: the swapped caption's loss should be at least 10% above the true one's
SWAP_MIN_T = 300  # ... at timesteps from here up, where a sample's layout is still being decided
UNET_ZERO = ("conv2", "conv_out", "proj_out", "to_out.0")  # residual branches and the output start at 0


def text_prefix(text: nn.Module, ids: torch.Tensor, layers: int) -> torch.Tensor:
    """A CLIPTextModel's first `layers` layers (after the token and position embeddings)."""
    return text.run_layers(text.text_model.embeddings(ids), 0, layers)


class LatentData:
    """One process's batch of step i: rendered scenes -> VAE latents (posterior samples) and the
    frozen text encoder's output (from `text_folder`): its context and pooled output, or with
    `prefix` = k the hidden states after its first k layers — in a data worker when the stage has one.
    `mix` = (fraction of two-object scenes, caption-part drop probability), the renderer's `batch`.
    With `swap` (and `prefix`), also the hidden states of each caption's position-swapped twin
    (`swap_positions`; "swap_hidden", for the batch rows "swap_index"), for `denoising_loss`'s swap contrast.
    With `pool` (a pool.Pool), also that step's rows of the student's regression pool (noise, teacher
    latents, their captions' context)."""

    def __init__(self, run: Path, stage: str, sizes: Sizes, seed: int, n: int, rank: int, dropout: float,
                 text_folder: Path, prefix: int | None = None, mix: tuple[float, float] = (0.5, 0.3),
                 swap: bool = False, pool=None):
        self.tokenizer = CLIPTokenizer.from_folder(Path(run) / "tokenizer")
        self.text = load_text_encoder(text_folder)
        self.vae = load_autoencoder(Path(run) / "vae")
        self.stage, self.sizes, self.seed, self.n, self.rank, self.dropout = stage, sizes, seed, n, rank, dropout
        self.prefix, self.mix, self.swap, self.pool = prefix, mix, swap, pool
        self.bf16 = native_bf16("cpu")  # the batch is made on the CPU, also for a GPU run

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        s = seed_for(self.seed, self.stage, step, self.rank)
        images, captions, _ = batch(s, self.n, size=self.sizes.image, drop=self.mix[1], two=self.mix[0])
        g = generator(s)
        drop = torch.rand(self.n, generator=g) < self.dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = self.tokenizer(captions)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):  # the encoder's convolutions in bf16
            # where the CPU has it: a third of the batch's time off (16 scenes: 45 against 68 ms on one thread),
            # latents 0.5% of their std off (docs/log/2026-12-05-bf16-encoder-and-chain-regression.md); fp32 out, same noise
            latents = self.vae.encode(from_uint8(images), g, sample=True)
        b = {"latents": latents, "seed": s, "captions": captions}
        if self.prefix is not None:
            b["hidden"] = text_prefix(self.text, ids, self.prefix)
            if self.swap:
                swapped = [swap_positions(c) if c else None for c in captions]
                index = [i for i, c in enumerate(swapped) if c is not None]
                if index:
                    b["swap_index"] = torch.tensor(index, dtype=torch.long)
                    b["swap_hidden"] = text_prefix(self.text, self.tokenizer([swapped[i] for i in index]),
                                                   self.prefix)
        else:
            out = self.text(ids)
            b.update(context=out.last_hidden_state, pooled=out.pooled)
        if self.pool is not None:
            rows = self.pool.rows(self.seed, self.stage, step, self.rank)
            b.update(pool_z=self.pool.z[rows], pool_x0=self.pool.x0[rows],
                     pool_context=self.text(self.pool.ids[rows]).last_hidden_state)
        return b


class Conditioned(nn.Module):
    """The UNet and the text encoder trained with it, as one module: one optimiser, one EMA and one
    checkpoint hold both. Only the text encoder's last `tuned` layers and final LayerNorm train (none: 0);
    forward(x, t, hidden) takes the hidden states before them (`text_prefix`, in the data worker)."""

    def __init__(self, unet: UNet, text: nn.Module, tuned: int):
        super().__init__()
        self.unet, self.text = unet, text
        layers = text.text_model.encoder.layers
        self.start = len(layers) - tuned
        text.requires_grad_(False)
        if tuned > 0:
            for module in (*layers[self.start:], text.text_model.final_layer_norm):
                module.requires_grad_(True)

    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text.text_model.final_layer_norm(self.text.run_layers(hidden, self.start))

    def forward(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, self.context(hidden))


def diffuse(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), a_t = alphas_cumprod[t]."""
    a = ac[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def min_snr_weight(t: torch.Tensor, ac: torch.Tensor, gamma: float = MIN_SNR_GAMMA,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """min(SNR, gamma) per sample, as a weight on the loss of `prediction_type`: divided by SNR for epsilon,
    by SNR + 1 for v, as is for x0 (Hang et al. 2023; diffusers' training scripts' `--snr_gamma`)."""
    snr = ac[t] / (1 - ac[t])
    weight = snr.clamp(max=gamma)
    return weight if prediction_type == "sample" else weight / (snr + (prediction_type == "v_prediction"))


def training_noise(shape: tuple[int, ...], g: torch.Generator, offset: float) -> torch.Tensor:
    """Unit Gaussian noise plus a per-image, per-channel constant of std `offset` (drawn also when 0,
    so the draws that follow do not depend on it)."""
    return torch.randn(shape, generator=g) + offset * torch.randn((*shape[:2], 1, 1), generator=g)


def _trained_teacher(init: str | Path) -> tuple[UNet, Path | None]:
    """`init`'s UNet (trainable) and its text encoder folder, when it has one."""
    init = Path(init)
    weights = init / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FewstepError(f"--init {init}: no trained teacher there (expected {weights})")
    text = init / "text_encoder"
    return load_unet(init / "unet").requires_grad_(True).train(), text if (text / "config.json").is_file() else None


def denoising_loss(model, b: dict, ac: torch.Tensor, offset: float = 0.0,
                   swap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """min-SNR-weighted epsilon loss at uniform timesteps (noise with `offset`), plus `swap` times the swap
    contrast; the plain per-sample MSE and the swap contrast (for the log). `model(x_t, t, hidden)` is a
    `Conditioned`; `ac` (alphas_cumprod) is on the batch's device, moved there once by the stage.

    Swap contrast: for the rows with a position-swapped twin caption (b["swap_index"]) at t >= SWAP_MIN_T,
    the same x_t is denoised under the twin too, in the same forward pass, and the hinge
    relu(mse_true - mse_swapped + SWAP_MARGIN * mse_true) (min-SNR weighted, summed over those rows / batch
    size) asks the twin's error to exceed the true caption's by the margin. A swapped twin is itself a
    true caption of other images, so the only way to meet it is to tie each object to its own position —
    the shipped teacher's commonest two-object fault is drawing the two objects at each other's places
    (docs/log/2026-12-03-swap-contrast-and-pool.md). A ranking loss on the denoising error under matched and mismatched conditions, as in
    contrastive guidance of diffusion models (e.g. Diffusion-DPO, Wallace et al. 2023, ranks two images
    under one caption; here one image under two captions)."""
    g = generator(b["seed"] + 1)
    x0 = b["latents"]
    n = len(x0)
    t = torch.randint(0, len(ac), (n,), generator=g).to(x0.device)  # drawn on the CPU: the same on any device
    noise = training_noise(x0.shape, g, offset).to(x0.device)
    x_t, hidden, target = diffuse(x0, noise, t, ac), b["hidden"], noise
    rows = None
    if swap and "swap_index" in b:
        keep = t[b["swap_index"]] >= SWAP_MIN_T
        rows, twins = b["swap_index"][keep], b["swap_hidden"][keep]
    if rows is not None and len(rows):
        x_t, t, hidden, target = (torch.cat([x_t, x_t[rows]]), torch.cat([t, t[rows]]),
                                  torch.cat([hidden, twins]), torch.cat([noise, noise[rows]]))
    per_sample = F.mse_loss(model(x_t, t, hidden), target, reduction="none").mean((1, 2, 3))
    weight = min_snr_weight(t, ac)
    loss = (per_sample[:n] * weight[:n]).mean()
    contrast = torch.zeros((), device=x0.device)
    if rows is not None and len(rows):
        true, twin = per_sample[rows], per_sample[n:]
        contrast = (F.relu(true - twin + SWAP_MARGIN * true.detach()) * weight[n:]).sum() / n
    return loss + swap * contrast, per_sample[:n].mean(), contrast


def train_teacher(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool, name: str = "teacher") -> dict:
    """Train the teacher (stage `name`) and its text encoder; writes their EMA weights to OUT/NAME/unet/
    and OUT/NAME/text_encoder/ (diffusers / transformers layout, fp32) and returns a quick accuracy
    check (full size only: the evaluator needs 128x128 scenes). From random weights and the CLIP
    stage's text encoder, or with `hyper.init` from a trained teacher's folder."""
    out = Path(out)
    stage = Stage(name, out, hyper, seed)
    text = out / "clip" / "text_encoder"
    torch.manual_seed(seed)
    if hyper.init is None:
        unet = init_weights(UNet(sizes.unet), zero=UNET_ZERO)
    else:  # fine-tune a trained teacher (and its text encoder, when it has one)
        unet, own_text = _trained_teacher(hyper.init)
        text = own_text or text
    joint = Conditioned(unet, load_text_encoder(text).train(), hyper.text_layers)
    data = LatentData(out, name, sizes, seed, stage.per_process, stage.rank, CAPTION_DROPOUT, text,
                      prefix=joint.start, mix=(hyper.two_objects, hyper.caption_drop), swap=hyper.swap > 0)
    opt = torch.optim.AdamW([p for p in joint.parameters() if p.requires_grad], lr=hyper.lr, weight_decay=0.01)
    model, opt = stage.accel.prepare(joint, opt)
    ema = EMA(stage.accel.unwrap_model(model), 0.999)
    stage.track(ema)
    start = stage.restore(resume)
    ac = alphas_cumprod(TRAIN_SCHEDULE).to(stage.accel.device)

    def step_fn(step: int, b: dict) -> dict:
        set_lr(opt, warmup_lr(step, hyper.lr, hyper.warmup, hyper.steps))
        loss, mse, contrast = denoising_loss(model, b, ac, hyper.offset_noise, hyper.swap)
        opt.zero_grad(set_to_none=True)
        stage.accel.backward(loss)
        stage.accel.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(stage.accel.unwrap_model(model), step)
        return {"loss": loss.item(), "mse": mse.item(), **({"swap": contrast.item()} if hyper.swap else {})}

    def on_preview(step: int) -> None:
        shadow = ema.averaged(stage.accel.unwrap_model(model))
        path = out / "samples" / f"{name}-{step:05d}.png"
        preview(shadow.unet, data, TEACHER_SCHEDULER, 20, GUIDANCE, path, text=shadow.text)

    if stage.main:
        tuned = sum(p.numel() for p in joint.text.parameters() if p.requires_grad)
        print(f"{name}: UNet {count(unet) / 1e6:.2f}M parameters, text encoder {tuned / 1e6:.2f}M of "
              f"{count(joint.text) / 1e6:.2f}M tuned", flush=True)
    done = stage.run(batches(data, start, hyper.steps, hyper.workers), step_fn, on_preview)
    if done and stage.main:
        trained = stage.accel.unwrap_model(model)
        trained.load_state_dict(ema.shadow)
        text_out = out / name / "text_encoder"
        save_text_encoder(text_out, trained.text, text)
        return finish_unet(out, name, trained.unet, sizes, TEACHER_SCHEDULER, 20, GUIDANCE, 64, text_out)
    return {}


def refine_teacher(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool) -> dict:
    """Stage 5, refine: fine-tune the teacher (OUT/teacher) with the text encoder's last layers and
    offset noise (recipe settings), into OUT/refine, which the pairs stage fine-tunes on into the
    final teacher. See docs/log/2026-11-22-refine-stage.md: tuning these from the start cost the teacher its positions; tuning
    them after it has learned places keeps them (36/36 in the position test) and lifts colour binding."""
    if hyper.init is None:
        hyper = replace(hyper, init=str(Path(out) / "teacher"))
    return train_teacher(out, sizes, hyper, seed, resume, name="refine")


def pairs_teacher(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool) -> dict:
    """Stage 6, pairs: fine-tune the refined teacher (OUT/refine) on a mix of 80% two-object scenes whose
    captions leave out half as much (each optional part with probability 0.15, not 0.3), at a third of
    refine's learning rate, into OUT/pairs, which the swap stage fine-tunes on into the final teacher. Binding
    two objects' attributes is what the refined teacher still got wrong (its one-object prompts were
    99% right), and such captions are where that is learned (docs/log/2026-12-03-pairs-stage.md)."""
    if hyper.init is None:
        hyper = replace(hyper, init=str(Path(out) / "refine"))
    return train_teacher(out, sizes, hyper, seed, resume, name="pairs")


def swap_teacher(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool) -> dict:
    """Stage 7, swap: the pairs stage once more (OUT/pairs, same mix, schedule and learning rate), with the
    swap contrast on (Hyper.swap = 1, `denoising_loss`), into OUT/swap — the final teacher, which the
    student learns from and that ships. The pairs teacher's commonest two-object fault is drawing the two
    objects at each other's places; on two 500-prompt sets the contrast cut those 48 -> 33 against the
    same 2,000 steps without it (docs/log/2026-12-03-swap-contrast-and-pool.md)."""
    if hyper.init is None:
        hyper = replace(hyper, init=str(Path(out) / "pairs"))
    return train_teacher(out, sizes, hyper, seed, resume, name="swap")
