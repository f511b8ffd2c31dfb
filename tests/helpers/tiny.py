"""Tiny random models: diffusers pipelines of each family, written with `save_pretrained` (test
oracle only), and fewstep UNets of two layouts with their inputs.

The shapes follow the diffusers test suite (`block_out_channels=(32, 64)`), with the real
block layout of each family and the real CLIP vocabulary from ../shared/data, so a pipeline
loads and runs in well under a second. Random weights are seeded; norm layers get random affine
parameters too, so a layer that is skipped or misnamed shows up in the output.
"""

from pathlib import Path

import torch

from fewstep.configs import UNetConfig
from fewstep.models.unet import UNet
from helpers.env import CONFIGS, SHARED

TEXT = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
            max_position_embeddings=77)
VAE = dict(block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3, layers_per_block=1,
           norm_num_groups=8, latent_channels=4, sample_size=64,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
FAMILIES = ("sd1", "sd2-eps", "sd2-v", "sdxl", "sd1-inpaint", "sdxl-refiner")
UNETS = {
    # SD-style: 3 levels, 2 resnets per level, attention below the top, a mid block -> 9 skip branches
    "sd": dict(block_out_channels=(32, 64, 64), down_attention=(False, True, True), up_attention=(True, True, False),
               layers_per_block=(2, 2, 2), transformer_depth=(1, 1, 1), num_heads=(2, 4, 4),
               only_cross_attention=(False,) * 3),
    # SDXS-style: 1 resnet per level, no mid block, SDXL add-embeddings -> 4 skip branches
    "sdxs-xl": dict(block_out_channels=(32, 64), down_attention=(True, True), up_attention=(True, True),
                    layers_per_block=(1, 1), transformer_depth=(1, 2), num_heads=(2, 4),
                    only_cross_attention=(True, True), mid_block=False,
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
}


def randomize_norms(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random affine params on every norm, so a skipped or misnamed norm changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module.eval()


def make_unet(name: str) -> UNet:
    """A seeded fewstep UNet of layout `name` (a key of UNETS), norms randomized."""
    torch.manual_seed(0)
    cfg = UNetConfig(**UNETS[name], cross_attention_dim=32, norm_num_groups=8, sample_size=8)
    return randomize_norms(UNet(cfg), seed=3)


def unet_inputs(unet, scale: float = 1.0, seed: int = 0) -> tuple:
    """(x, t, cond) for a batch of 2 at 8x8 latents, with SDXL's extra conditioning where the UNet takes it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g) * scale
    t = torch.tensor([999.0, 500.0]) * scale
    cond = {"context": torch.randn(2, 7, 32, generator=g)}
    if unet.cfg.addition_time_embed_dim is not None:
        cond["text_embeds"] = torch.randn(2, 32, generator=g)
        cond["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    return x, t, cond


def _tokenizer(pad: str):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(SHARED / "clip-tokenizer" / "vocab.json"), str(SHARED / "clip-tokenizer" / "merges.txt"),
                         pad_token=pad, model_max_length=77)


def _text_encoder(projection: bool, seed: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(**TEXT, hidden_act=act, projection_dim=32)
    return randomize_norms((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), seed)


def make_pipeline(family: str, root: Path, seed: int = 0):
    """Build and save a tiny pipeline of `family` under root/family; returns (folder, pipeline)."""
    import diffusers
    folder = Path(root) / family
    torch.manual_seed(seed)
    vae = randomize_norms(diffusers.AutoencoderKL(**VAE), seed + 1)
    sched_src = {"sd1": "sd15", "sd1-inpaint": "sd15", "sd2-eps": "sd21-base", "sd2-v": "sd21-base",
                 "sdxl": "sdxl-base", "sdxl-refiner": "sdxl-base"}[family]
    sched_cfg = diffusers.EulerDiscreteScheduler.load_config(CONFIGS / sched_src / "scheduler")
    if family == "sd2-v":
        sched_cfg["prediction_type"] = "v_prediction"
    scheduler = diffusers.EulerDiscreteScheduler.from_config(sched_cfg)
    if family == "sdxl-refiner":  # one text encoder (the second), an aesthetic score in the time ids
        unet = diffusers.UNet2DConditionModel(
            **UNET, attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 5 * 8)
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=_text_encoder(True, seed + 5, "gelu"), tokenizer=None,
            tokenizer_2=_tokenizer("!"), unet=randomize_norms(unet, seed + 6), scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    elif family == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            **UNET, attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=_text_encoder(False, seed + 2), text_encoder_2=_text_encoder(True, seed + 3, "gelu"),
            tokenizer=_tokenizer("<|endoftext|>"), tokenizer_2=_tokenizer("!"),
            unet=randomize_norms(unet, seed + 4), scheduler=scheduler)
    else:
        sd2 = family.startswith("sd2")
        unet = diffusers.UNet2DConditionModel(
            **{**UNET, "in_channels": 9 if family.endswith("inpaint") else 4}, cross_attention_dim=32,
            attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2, upcast_attention=sd2)
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=_text_encoder(False, seed + 2, "gelu" if sd2 else "quick_gelu"),
            tokenizer=_tokenizer("!" if sd2 else "<|endoftext|>"),
            unet=randomize_norms(unet, seed + 4), scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe
