"""`fewstep train controlnet`: a ControlNet for a shapes model, conditioned on a layout or edge map of the
scene (docs/controlnet.md, "ControlNet for the built-in model").

    fewstep train controlnet --base MODEL --condition layout --out runs/cn-layout --steps 2000

The ControlNet starts as diffusers' `ControlNetModel.from_unet` makes it: the base UNet's conv_in, time
embedding, down and mid blocks copied, the control image's embedding net freshly initialised with its output
conv at zero, and every zero convolution at zero, so step 0 leaves the base model's images as they were
(Zhang et al. 2023). Only the ControlNet trains; the base UNet, text encoder and VAE stay frozen. Each step
renders a fresh batch of scenes (`fewstep.shapes.control.training_batch`: full captions with parts left out,
colour-only and empty captions, so that the control alone must place and shape the objects), encodes them,
noises the latents and regresses the base model's own prediction type (epsilon, v or x0). A few-step base
(a default of 8 steps or fewer, as the 4-step shapes-turbo) is trained at the timesteps its sampler visits
(trailing spacing: 999, 749, 499, 249; `one_step` of each batch at 999, where only the map can place
the objects), any other base at uniform timesteps.

The loop is the other stages' (`loop.Stage`: accelerate, progress bar, loss log and plot, checkpoints, exact
resume) in `OUT.train/` beside the output folder; OUT gets config.json and diffusion_pytorch_model.safetensors
in diffusers' ControlNetModel layout when the steps are done, which `fewstep.load(..., controlnet=OUT)` and
diffusers' `ControlNetModel.from_pretrained` read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import text
from ..errors import FewstepError
from ..imaging import from_uint8
from ..loading.hub import resolve
from ..models.controlnet import ControlNet, ControlNetConfig
from ..pipeline import load_pipeline
from ..schedules import alphas_cumprod
from ..shapes.control import CONDITIONS, training_batch
from .common import batches, count, descend, generator, save_weights, seed_for, set_lr, target, warmup_lr
from .loop import Hyper, Stage
from .teacher import diffuse

HINT_CHANNELS = (16, 32, 64, 128)  # the control image's embedding net: 128 px -> 16 latents in three halvings
COPIED = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
ZEROED = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
FEW_STEPS = 8  # a base whose default is this many steps or fewer trains at its sampler's timesteps
# the UNet config fields diffusers' ControlNetModel takes (ControlNetModel.from_unet passes these)
UNET_FIELDS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
               "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
               "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
               "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
               "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
               "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
               "projection_class_embeddings_input_dim", "mid_block_type")


def base_unet_config(base: str | None) -> dict:
    """The base model folder's unet/config.json (a ControlNet's config is written from it)."""
    path = resolve(base) / "unet" / "config.json"
    if not path.is_file():
        raise FewstepError(f"--base {base}: train controlnet needs a diffusers model folder (with unet/config.json)")
    return json.loads(path.read_text())


def diffusers_config(unet_json: dict, hint: tuple[int, ...] = HINT_CHANNELS) -> dict:
    """A ControlNetModel config.json for a ControlNet copied from the UNet of `unet_json`."""
    d = {k: unet_json[k] for k in UNET_FIELDS if k in unet_json}
    layers = d.get("layers_per_block", 2)
    if isinstance(layers, list):  # diffusers' ControlNetModel takes one number for every level
        if len(set(layers)) != 1:
            raise FewstepError(f"train controlnet: the base UNet has {layers} layers per level; diffusers' "
                               "ControlNetModel needs the same number at every level")
        d["layers_per_block"] = layers[0]
    return {"_class_name": "ControlNetModel", "_diffusers_version": unet_json.get("_diffusers_version", "0.30.0"),
            **d, "conditioning_channels": 3, "conditioning_embedding_out_channels": list(hint),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


def from_unet(unet, config: dict, seed: int = 0) -> ControlNet:
    """A ControlNet whose copied parts are the UNet's weights, whose zero convolutions are zero and whose
    control-image embedding has PyTorch's default init drawn from `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ControlNet(ControlNetConfig.from_diffusers(config))
    theirs = unet.state_dict()
    state = net.state_dict()
    fresh = [k for k in state if not k.startswith(COPIED)]
    assert all(k.startswith(("controlnet_",)) for k in fresh), fresh
    with torch.no_grad():
        for k, v in state.items():
            if k.startswith(COPIED):
                v.copy_(theirs[k])
            elif k.startswith(ZEROED):
                v.zero_()
    return net


def few_timesteps(steps: int) -> torch.Tensor:
    """The timesteps a trailing-spaced sampler of `steps` steps visits (diffusers' 'trailing'): 999, 749, ..."""
    return torch.from_numpy(np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1)


class Steered(torch.nn.Module):
    """The ControlNet (trainable) and the frozen UNet it steers, as one module for `accelerate.prepare`."""

    def __init__(self, controlnet: ControlNet, unet):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        downs, mid = self.controlnet(x, t, context, hint)
        return self.unet(x, t, context, down_block_additional_residuals=downs, mid_block_additional_residual=mid)


def _check(pipe, condition: str, out: Path) -> None:
    if condition not in CONDITIONS:
        raise FewstepError(f"--condition {condition!r}: use one of {', '.join(CONDITIONS)}")
    if pipe.defaults.prompt_grammar != "shapes":
        raise FewstepError("train controlnet trains on the shapes world: --base must be a shapes model "
                           "(shapes-turbo, shapes-teacher or one fewstep train made)")
    if out.suffix:
        raise FewstepError(f"--out {out}: a ControlNet is written as a folder (no file suffix)")
    if not out.parent.is_dir():
        raise FewstepError(f"--out {out}: the folder {out.parent} does not exist")


def save_controlnet(net: ControlNet, config: dict, out: Path) -> None:
    """config.json and diffusion_pytorch_model.safetensors (fp32), each written whole then renamed."""
    out.mkdir(exist_ok=True)
    tmp = out / "diffusion_pytorch_model.safetensors.tmp"
    save_weights(net.state_dict(), tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "diffusion_pytorch_model.safetensors")
    (out / "config.json.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(out / "config.json.tmp", out / "config.json")


def train_controlnet(base: str | None, condition: str, out: str | Path, *, steps: int = 2000, batch: int = 16,
                     lr: float = 1e-4, seed: int = 0, resume: bool = False, stop_at: int | None = None,
                     one_step: float | None = None) -> dict:
    """Train a ControlNet for `base` (a shapes model folder; None: the built-in model) on `condition` maps;
    writes the folder `out` when the steps are done (not when `stop_at` ends the run early: resume later)."""
    out = Path(out)
    config = diffusers_config(base_unet_config(base))
    pipe = load_pipeline(base)
    _check(pipe, condition, out)
    size = pipe.defaults.size or pipe.unet.cfg.sample_size * pipe.vae_scale
    pipe.unet.requires_grad_(False)
    net = from_unet(pipe.unet, config, seed).train().requires_grad_(True)
    hyper = Hyper(steps, batch, lr, warmup=min(100, steps // 10), log_every=max(1, min(25, steps // 20)),
                  ckpt_every=max(50, steps // 4), stop_at=stop_at)
    stage = Stage("controlnet", Path(str(out) + ".train"), hyper, seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    model, optimizer = stage.accel.prepare(Steered(net, pipe.unet), optimizer)
    start = stage.restore(resume)
    ac = alphas_cumprod(pipe.scheduler).to(stage.accel.device)
    few = few_timesteps(pipe.defaults.steps) if pipe.defaults.steps <= FEW_STEPS else None

    @torch.no_grad()
    def make(step: int) -> dict:
        s = seed_for(seed, "controlnet", step, stage.rank)
        images, maps, texts = training_batch(s, stage.per_process, condition, size)
        g = generator(s + 1)  # noise and timesteps
        latents = pipe.vae.encode(from_uint8(images).to(pipe.device)).float().cpu()
        pick = torch.randint(0, len(ac) if few is None else len(few), (len(images),), generator=g)
        if few is not None and one_step is not None:  # this share at the first (noisiest) step, the rest even
            first = torch.rand(len(images), generator=g) < one_step
            pick = torch.where(first, 0, torch.randint(1, len(few), (len(images),), generator=g))
        context = text.encode(pipe.tokenizers, pipe.text_encoders, pipe.conditioning, [texts], pipe.device,
                              torch.float32)[0][0].cpu()
        return {"latents": latents, "noise": torch.randn(latents.shape, generator=g), "context": context,
                "t": pick if few is None else few[pick], "hint": torch.from_numpy(maps).permute(0, 3, 1, 2) / 255}

    def step_fn(step: int, b: dict) -> dict:
        set_lr(optimizer, warmup_lr(step, lr, hyper.warmup, steps))
        predicted = model(diffuse(b["latents"], b["noise"], b["t"], ac), b["t"], b["context"], b["hint"])
        loss = F.mse_loss(predicted, target(b, ac, pipe.scheduler.prediction_type))
        return descend(stage.accel, optimizer, loss)

    model.train()
    done = stage.run(batches(make, start, steps), step_fn)
    result = {"steps": stage.counter.step, "seconds": round(stage.counter.seconds, 1), "condition": condition,
              "timesteps": "uniform" if few is None else [int(t) for t in few], "parameters": count(net)}
    if done and stage.main:
        save_controlnet(stage.accel.unwrap_model(model).controlnet, config, out)
        result.update(out=str(out), bytes=(out / "diffusion_pytorch_model.safetensors").stat().st_size)
    return result
