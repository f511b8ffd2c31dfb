"""Write trained models as diffusers-layout folders that both `fewstep.load` and diffusers'
`StableDiffusionPipeline.from_pretrained` read: model_index.json, one folder per component with
its config.json (diffusers / transformers keys, written here from fewstep's config dataclasses),
fp16 safetensors, the scheduler config and fewstep.json sampling defaults.

Each exported folder stands alone (text encoder, tokenizer and VAE are copied into both the
teacher and the student), as a diffusers pipeline folder must.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from ..configs import SchedulerConfig, UNetConfig, VAEConfig, read_json
from ..loading.folders import load_autoencoder, load_text_encoder, load_unet
from .common import save_weights, write_json
from .runs import text_encoder_folder

DIFFUSERS_VERSION = "0.42.1"
TRAIN_SCHEDULE = SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 prediction_type="epsilon")  # Stable Diffusion's training schedule
# The student predicts v (train/distill.py: from epsilon, a one-step x0 at t = 999 multiplies the UNet's error by 15)
STUDENT_PREDICTION = "v_prediction"


def unet_json(cfg: UNetConfig) -> dict:
    """diffusers UNet2DConditionModel config. `attention_head_dim` holds the head *count* per level
    (diffusers issue #2011: without `num_attention_heads`, that is what diffusers reads it as)."""
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.mid_block else None,
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": list(cfg.layers_per_block),
        "transformer_layers_per_block": list(cfg.transformer_depth), "attention_head_dim": list(cfg.num_heads),
        "only_cross_attention": list(cfg.only_cross_attention), "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection, "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_num_groups, "norm_eps": cfg.norm_eps, "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift, "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    }


def vae_json(cfg: VAEConfig, sample_size: int) -> dict:
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": cfg.norm_num_groups, "sample_size": sample_size, "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor, "force_upcast": cfg.force_upcast, "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv, "mid_block_add_attention": cfg.mid_block_add_attention,
    }


def scheduler_json(spacing: str, prediction_type: str = "epsilon") -> dict:
    """EulerDiscreteScheduler over SD's training schedule; "trailing" starts the 1-4 step student at
    t = 999, "linspace" lets the teacher's 25 steps cover 999..0; `prediction_type`: what the UNet outputs."""
    s = replace(TRAIN_SCHEDULE, prediction_type=prediction_type)
    return {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start, "beta_end": s.beta_end,
            "beta_schedule": s.beta_schedule, "trained_betas": None, "prediction_type": s.prediction_type,
            "interpolation_type": "linear", "use_karras_sigmas": False, "timestep_spacing": spacing,
            "steps_offset": 1, "timestep_type": "discrete", "final_sigmas_type": "zero",
            "rescale_betas_zero_snr": False}


TEACHER_SCHEDULER = scheduler_json("linspace")
STUDENT_SCHEDULER = scheduler_json("trailing", STUDENT_PREDICTION)


def model_index() -> dict:
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def save_unet(folder: Path, unet: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    write_json(folder / "config.json", unet_json(unet.cfg))
    save_weights(unet.state_dict(), folder / "diffusion_pytorch_model.safetensors", dtype)


def save_text_encoder(folder: Path, text: torch.nn.Module, config_from: Path, dtype: torch.dtype | None = None) -> None:
    """A transformers CLIPTextModel folder: `config_from`'s config.json (with the dtype) and the weights."""
    config = read_json(Path(config_from) / "config.json")
    write_json(folder / "config.json", {**config, "torch_dtype": "float16" if dtype == torch.float16 else "float32"})
    save_weights(text.state_dict(), folder / "model.safetensors", dtype)


def save_vae(folder: Path, vae: torch.nn.Module, sample_size: int, dtype: torch.dtype | None = None) -> None:
    write_json(folder / "config.json", vae_json(vae.cfg, sample_size))
    save_weights(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors", dtype)


def export_pipeline(run: Path, unet_folder: Path, dest: Path, scheduler: dict, defaults: dict) -> Path:
    """A standalone fp16 pipeline folder at `dest` from a run folder's trained components."""
    run, dest = Path(run), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    half = torch.float16
    unet = load_unet(unet_folder)
    save_unet(dest / "unet", unet, half)
    vae = load_autoencoder(run / "vae")
    save_vae(dest / "vae", vae, unet.cfg.sample_size * 8, half)
    text_folder = text_encoder_folder(run)
    save_text_encoder(dest / "text_encoder", load_text_encoder(text_folder), text_folder, half)
    shutil.copytree(run / "tokenizer", dest / "tokenizer")
    write_json(dest / "scheduler" / "scheduler_config.json", scheduler)
    write_json(dest / "model_index.json", model_index())
    write_json(dest / "fewstep.json", defaults)
    return dest


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6
