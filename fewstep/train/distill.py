"""Stage 9: the student, distilled from the final teacher (OUT/swap) to 1-4 steps by Adversarial
Diffusion Distillation (Sauer et al. 2023, "Adversarial Diffusion Distillation", the SD-/SDXL-Turbo recipe).

The student starts as a copy of the teacher and is trained at the four trailing timesteps
999 / 749 / 499 / 249 on noised real latents x_s, except that at 999 its input is pure noise: at
inference a 1-step sample starts from pure noise, and with Stable Diffusion's schedule x_999 still
holds 7% of the data, which a student could learn to lean on. From its one-step sample x0_hat:

* adversarial loss (hinge): a discriminator judges x0_hat against real latents. As in LADD (Sauer
  et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
  Distillation") the frozen features are the teacher UNet's own encoder (its down blocks and
  mid block) on re-noised latents, so the discriminator works in latent space and no VAE decode
  is backpropagated; one small per-position head per feature map, conditioned on the pooled text by
  projection (Miyato & Koyama 2018), as ADD's heads are, and one head that sees the whole lowest
  feature map at once (so something in the discriminator can count objects);
* distillation loss: x0_hat re-noised to a random teacher timestep t, the teacher's
  classifier-free-guided x0 prediction there as the (stop-gradient) target, squared error weighted
  by c(t) = sqrt(alphas_cumprod[t]) (ADD's "exponential" weighting), lambda = 2.5;
* regression (with Hyper.pool, the recipe's setting): POOL_ROWS more rows a step, each the pure noise z
  of a teacher sample the evaluator read right (pool.py), whose one-step x0 is pulled onto that sample
  by squared error, weighted as one row's distillation (DMD's regression loss, Yin et al. 2024): the
  student learns where the teacher puts each object for a given noise, which neither loss above says.
* backward simulation (with Hyper.backward, 1 in the recipe): a row drawn at s < 999 gets, with
  that probability, not a noised real latent as its input but what the 4-step sampler would give it, the
  student's own chain from pure noise down to s (DMD2's backward simulation, Yin et al. 2024, "Improved
  Distribution Matching Distillation", section 4.5), so it learns to correct its own earlier steps.

The student predicts v, not epsilon, though it starts as a copy of the epsilon teacher (Salimans & Ho
2022, "Progressive Distillation", section 4: few-step students need a parameterization whose x0 stays
stable at low signal-to-noise). From epsilon, x0 = (x - sqrt(1 - a) eps) / sqrt(a), and at t = 999
sqrt(a) = 0.068, so every error of the UNet reaches the one-step image 15 times larger (the grain of
the epsilon student's one-step images); from v, x0 = sqrt(a) x - sqrt(1 - a) v takes it at most once.
The exported student's scheduler says `prediction_type: v_prediction`, which diffusers reads as well.

ADD's fixed lambda balances losses measured in its own units (DINOv2 features, SDXL latents); here
the scales differ, so the adversarial gradient is rescaled to ADV_BALANCE times the norm of the
distillation gradient, VQGAN's adaptive weight (Esser et al. 2021, eq. 7), taken at x0_hat rather
than at the last layer: both losses reach the student only through x0_hat, so the two gradients
are computed there (the costly one, through the teacher's encoder, once) and sent back together.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import scalings
from ..loading.folders import load_unet
from ..schedules import alphas_cumprod
from .common import EMA, batches, generator, set_lr, warmup_lr
from .evaluate import finish_unet, preview
from .export import STUDENT_PREDICTION, STUDENT_SCHEDULER, TRAIN_SCHEDULE
from .loop import Hyper, Stage
from .pool import Pool, rows_per_process
from .runs import teacher_folder, text_encoder_folder
from .sizes import Sizes
from .teacher import GUIDANCE, LatentData, diffuse

STUDENT_TIMESTEPS = (999, 749, 499, 249)  # trailing spacing of 4 steps: what the exported scheduler uses
STUDENT_WEIGHTS = (0.7, 0.1, 0.1, 0.1)  # t = 999 (one step) drawn most; on the two-process recipe's teacher 0.7
# beat the one-process recipe's 0.85 at 4 steps and kept the one-step target (docs/log/2026-12-05-students-on-two-process-teacher.md)
DISTILL_WEIGHT = 2.5  # lambda of ADD
DISC_MAX_T = 700  # the discriminator sees latents re-noised to t ~ U[0, 700)
ADV_BALANCE = 1.0  # adversarial gradient norm / distillation gradient norm at x0_hat
REGRESSION_WEIGHT = DISTILL_WEIGHT  # the pool's regression (pool.py): a pool row weighs as a batch row's distillation


def encoder_features(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the UNet's down blocks and mid block (`UNet.encode`)."""
    h, _, feats = unet.encode(x, unet.time_embed(x, t, None, None, None), context)
    return feats + [h] if unet.mid_block is not None else feats


class Head(nn.Module):
    """conv-GroupNorm-SiLU-conv on one feature map, then a projection-discriminator logit per
    position: out(h) + <h, W text> / sqrt(C)."""

    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(min(8, channels), channels),
                                  nn.SiLU(), nn.Conv2d(channels, channels, 1))
        self.out = nn.Conv2d(channels, 1, 1)
        self.embed = nn.Linear(text_dim, channels)

    def forward(self, f: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.body(f))
        proj = (h * self.embed(pooled)[:, :, None, None]).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return (self.out(h) + proj).flatten(1)  # [B, H * W]


class WholeHead(nn.Module):
    """One logit from the whole smallest feature map at once (1x1 conv to 32 channels, flattened, an MLP),
    plus the same text projection. The per-position heads judge each place alone, so none of them can
    count objects, and the one-step student's commonest fault is an object drawn twice (docs/log/2026-12-03-pairs-stage.md)."""

    def __init__(self, channels: int, side: int, text_dim: int, width: int = 256):
        super().__init__()
        self.reduce = nn.Conv2d(channels, 32, 1)
        self.fc = nn.Linear(32 * side * side, width)
        self.out = nn.Linear(width, 1)
        self.embed = nn.Linear(text_dim, width)

    def forward(self, f: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.fc(F.silu(self.reduce(f)).flatten(1)))  # [B, width]
        return self.out(h) + (h * self.embed(pooled)).sum(1, keepdim=True) / math.sqrt(h.shape[1])  # [B, 1]


class Discriminator(nn.Module):
    def __init__(self, channels: list[int], text_dim: int, side: int):
        super().__init__()
        self.heads = nn.ModuleList(Head(c, text_dim) for c in channels)
        self.whole = WholeHead(channels[-1], side, text_dim)  # side: the last feature map's

    def forward(self, feats: list[torch.Tensor], pooled: torch.Tensor) -> list[torch.Tensor]:
        """Per-position logits of each head, [B, H_i * W_i], then the whole-map logit [B, 1]; losses
        average each head, then the heads, so the 4x4 heads weigh as much as the 16x16 one."""
        return [head(f, pooled) for head, f in zip(self.heads, feats)] + [self.whole(feats[-1], pooled)]


def head_mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.mean() for v in values]).mean()


def feature_channels(unet: nn.Module) -> list[int]:
    cfg = unet.cfg
    return list(cfg.block_out_channels) + ([cfg.block_out_channels[-1]] if cfg.mid_block else [])


def feature_side(unet: nn.Module) -> int:
    """The side of the UNet's last encoder feature map (its lowest level)."""
    cfg = unet.cfg
    return cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1)


def to_x0(x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, ac: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from a UNet's output at x_t, by the samplers' own parameterization (`denoiser.scalings`, in
    sigma units: sigma = sqrt((1 - a) / a), x_t = c_in * x_sigma): epsilon gives (x - sqrt(1 - a) eps) / sqrt(a),
    v gives sqrt(a) x - sqrt(1 - a) v, a = alphas_cumprod[t]."""
    a = ac[t].view(-1, 1, 1, 1)
    c_skip, c_out, c_in = scalings(((1 - a) / a).sqrt(), prediction_type)
    return c_skip / c_in * x + c_out * out


class ADD:
    """One stage's student, discriminator, their optimisers and the EMA, and the step that
    trains them: a generator step on adversarial + distillation loss, then a discriminator step."""

    def __init__(self, stage: Stage, teacher: nn.Module, student: nn.Module, disc: nn.Module, empty: torch.Tensor,
                 disc_lr: float):
        h, accel = stage.hyper, stage.accel
        self.device = accel.device
        self.stage, self.teacher, self.disc_lr = stage, teacher.to(self.device), disc_lr
        self.empty = empty.to(self.device)  # "" [1, L, D]
        self.ac = alphas_cumprod(TRAIN_SCHEDULE).to(self.device)
        opt = torch.optim.AdamW(student.parameters(), lr=h.lr, betas=(0.0, 0.99), weight_decay=0.0)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=disc_lr, betas=(0.0, 0.99), weight_decay=0.0)
        self.model, self.disc, self.opt, self.d_opt = accel.prepare(student, disc, opt, d_opt)
        self.inner_disc = accel.unwrap_model(self.disc)
        self.ema = EMA(accel.unwrap_model(self.model), 0.995)
        stage.track(self.ema)

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """A random draw (made on the CPU, from the step's generator: the same on any device) on the device."""
        return x.to(self.device)

    @torch.no_grad()
    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The teacher's guided x0 prediction from x0 re-noised to t (clamped: at t near 999 it divides by 0.07)."""
        xt = diffuse(x0, noise, t, self.ac)
        uncond, cond = self.teacher(torch.cat([xt, xt]), torch.cat([t, t]),
                                    torch.cat([self.empty.expand_as(context), context])).chunk(2)
        return to_x0(xt, uncond + GUIDANCE * (cond - uncond), t, self.ac, "epsilon").clamp(-5, 5)

    @torch.no_grad()
    def own_inputs(self, s: torch.Tensor, context: torch.Tensor, g: torch.Generator, shape: tuple) -> torch.Tensor:
        """The student's input at each row's s < 999 as the 4-step sampler makes it: its x0 from pure noise at
        999, re-noised to the next trailing timestep, its x0 there, and so on down to s (no gradient)."""
        model, n = self.stage.accel.unwrap_model(self.model), len(s)
        x = self.draw(torch.randn((n, *shape), generator=g))
        t = torch.full((n,), STUDENT_TIMESTEPS[0], device=self.device)
        for nxt in STUDENT_TIMESTEPS[1:]:
            go = s <= nxt  # rows whose chain goes on to nxt
            if not go.any():
                break
            x0 = to_x0(x, model(x, t, context), t, self.ac, STUDENT_PREDICTION)
            t_next = torch.full_like(t, nxt)
            step = diffuse(x0, self.draw(torch.randn(x.shape, generator=g)), t_next, self.ac)
            x, t = torch.where(go.view(-1, 1, 1, 1), step, x), torch.where(go, t_next, t)
        return x

    def generator_grad(self, x0_hat: torch.Tensor, b: dict, g: torch.Generator) -> tuple[torch.Tensor, dict, list]:
        """The gradient at x0_hat (a leaf) of lambda * distillation + w * adversarial, w the adaptive
        weight; also the (detached) fake and real features for the discriminator step."""
        adv, distill, feats = self.generator_losses(x0_hat, b, g)
        g_adv, = torch.autograd.grad(adv, x0_hat)  # through the teacher's encoder
        g_distill, = torch.autograd.grad(DISTILL_WEIGHT * distill, x0_hat)
        w = (ADV_BALANCE * g_distill.norm() / (g_adv.norm() + 1e-12)).clamp(max=1e4)
        logs = {"adv": adv.item(), "distill": distill.item(), "adv_weight": w.item(),
                "grad_distill": g_distill.norm().item()}
        return g_distill + w * g_adv, logs, feats

    def generator_losses(self, x0_hat: torch.Tensor, b: dict, g: torch.Generator) -> tuple:
        """(adversarial, distillation, [fake features detached, real features])."""
        n = len(x0_hat)
        t = self.draw(torch.randint(0, len(self.ac), (n,), generator=g))
        target = self.target(x0_hat.detach(), t, self.draw(torch.randn(x0_hat.shape, generator=g)), b["context"])
        distill = (self.ac[t].sqrt() * (x0_hat - target).pow(2).mean(dim=(1, 2, 3))).mean()
        td = self.draw(torch.randint(0, DISC_MAX_T, (n,), generator=g))
        fake_in = diffuse(x0_hat, self.draw(torch.randn(x0_hat.shape, generator=g)), td, self.ac)
        fake = encoder_features(self.teacher, fake_in, td, b["context"])
        adv = -head_mean(self.inner_disc(fake, b["pooled"]))  # the unwrapped D: one DDP forward per step
        with torch.no_grad():
            real_in = diffuse(b["latents"], self.draw(torch.randn(x0_hat.shape, generator=g)), td, self.ac)
            real = encoder_features(self.teacher, real_in, td, b["context"])
        return adv, distill, [[f.detach() for f in fake], real]

    def discriminator_loss(self, fake: list, real: list, pooled: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Hinge loss on the features the generator step produced."""
        both = self.disc([torch.cat([r, f]) for r, f in zip(real, fake)], torch.cat([pooled, pooled]))
        logits_real, logits_fake = zip(*(x.chunk(2) for x in both))
        loss = head_mean([F.relu(1 - x) for x in logits_real]) + head_mean([F.relu(1 + x) for x in logits_fake])
        return loss, {"d": loss.item(), "d_real": head_mean(logits_real).item(), "d_fake": head_mean(logits_fake).item()}

    def step(self, step: int, b: dict) -> dict:
        h, accel = self.stage.hyper, self.stage.accel
        set_lr(self.opt, warmup_lr(step, h.lr, h.warmup, h.steps, decay=False))
        set_lr(self.d_opt, warmup_lr(step, self.disc_lr, h.warmup, h.steps, decay=False))
        g = generator(b["seed"] + 1)
        n = len(b["latents"])
        s = self.draw(student_timesteps(n, g, h.one_step))
        multi = s != STUDENT_TIMESTEPS[0]  # the multi-step rows; at t = 999 the input is pure noise
        real = b["latents"] * multi.view(-1, 1, 1, 1)
        xs = diffuse(real, self.draw(torch.randn(real.shape, generator=g)), s, self.ac)
        if h.backward > 0:  # its own draws, so the step's other draws stay those of a run without it
            g_own = generator(b["seed"] + 2)
            own = multi & self.draw(torch.rand((n,), generator=g_own) < h.backward)
            if own.any():
                xs[own] = self.own_inputs(s[own], b["context"][own], g_own, tuple(xs.shape[1:]))
        context = b["context"]
        if "pool_z" in b:  # the regression pool's noise, as the 1-step sampler feeds it, in the same forward
            top = torch.full((len(b["pool_z"]),), STUDENT_TIMESTEPS[0], device=self.device)
            noise_only = diffuse(torch.zeros_like(b["pool_z"]), b["pool_z"], top, self.ac)
            xs, s = torch.cat([xs, noise_only]), torch.cat([s, top])
            context = torch.cat([context, b["pool_context"]])
        x0_all = to_x0(xs, self.model(xs, s, context), s, self.ac, STUDENT_PREDICTION)
        x0_hat = x0_all[:n]
        self.inner_disc.requires_grad_(False)  # the generator step must not touch the discriminator
        grad, logs, (fake, real) = self.generator_grad(x0_hat.detach().requires_grad_(True), b, g)
        surrogate = (x0_hat * grad).sum()  # d/dtheta of this surrogate is J^T grad: the student's gradient
        if "pool_z" in b:
            regression = (x0_all[n:] - b["pool_x0"]).pow(2).mean(dim=(1, 2, 3)).sum() / n
            surrogate = surrogate + REGRESSION_WEIGHT * regression
            logs["regression"] = regression.item()
        self.opt.zero_grad(set_to_none=True)
        accel.backward(surrogate)
        accel.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.update(accel.unwrap_model(self.model), step)
        self.inner_disc.requires_grad_(True)
        d_loss, d_logs = self.discriminator_loss(fake, real, b["pooled"])
        self.d_opt.zero_grad(set_to_none=True)
        accel.backward(d_loss)
        self.d_opt.step()
        return {**logs, **d_logs}


def student_weights(one_step: float | None = None) -> tuple[float, ...]:
    """The draw's weights of STUDENT_TIMESTEPS: STUDENT_WEIGHTS, or `one_step` at t = 999 and the rest evenly."""
    if one_step is None:
        return STUDENT_WEIGHTS
    rest = (1 - one_step) / (len(STUDENT_TIMESTEPS) - 1)
    return (one_step,) + (rest,) * (len(STUDENT_TIMESTEPS) - 1)


def student_timesteps(n: int, g: torch.Generator, one_step: float | None = None) -> torch.Tensor:
    idx = torch.multinomial(torch.tensor(student_weights(one_step)), n, replacement=True, generator=g)
    return torch.tensor(STUDENT_TIMESTEPS)[idx]


def student_setup(stage: Stage, out: Path, sizes: Sizes, seed: int, disc_lr: float = 1e-4) -> tuple:
    """The student stage's parts from OUT's final teacher (and pool, with Hyper.pool): (the ADD trainer, whose
    student is a copy of the teacher and whose discriminator is fresh, the data stream, the teacher)."""
    hyper, pool = stage.hyper, None
    if hyper.pool:
        pool = Pool(out, k=rows_per_process(stage.per_process, hyper.batch))
    data = LatentData(out, "student", sizes, seed, stage.per_process, stage.rank, dropout=0.0,
                      text_folder=text_encoder_folder(out), mix=(hyper.two_objects, hyper.caption_drop), pool=pool)
    teacher = load_unet(teacher_folder(out) / "unet")
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    torch.manual_seed(seed)
    disc = Discriminator(feature_channels(teacher), data.text.cfg.hidden_size, feature_side(teacher))
    with torch.no_grad():
        empty = data.text(data.tokenizer([""])).last_hidden_state
    return ADD(stage, teacher, student, disc, empty, disc_lr), data, teacher


def train_student(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool, disc_lr: float = 1e-4) -> dict:
    """ADD from the final teacher (OUT/swap/unet), plus regression onto its pool (OUT/pool); writes the
    student's EMA weights to OUT/student/unet/ and returns a quick 1-step accuracy check (full size only)."""
    out = Path(out)
    stage = Stage("student", out, hyper, seed)
    add, data, teacher = student_setup(stage, out, sizes, seed, disc_lr)
    start = stage.restore(resume)
    def on_preview(step: int) -> None:
        preview(add.ema.averaged(teacher), data, STUDENT_SCHEDULER, 1, 0.0, out / "samples" / f"student-{step:05d}.png")

    done = stage.run(batches(data, start, hyper.steps, hyper.workers), add.step, on_preview)
    if done and stage.main:
        student = stage.accel.unwrap_model(add.model)
        student.load_state_dict(add.ema.shadow)
        return finish_unet(out, "student", student, sizes, STUDENT_SCHEDULER, 1, 0.0, 128)
    return {}
