"""Frozen config dataclasses for every model fewstep builds, and their readers from diffusers /
transformers `config.json` files.

One config is passed whole to each module (as in nanoGPT). Per-model differences are data here
(which levels have attention, transformer depth per level, context width, add-embeddings), never
branches on a version name. Runtime choices (device, dtype, decoder, compile) are not configs.

diffusers quirk kept on purpose: in UNet configs `attention_head_dim` is really the number of
heads when `num_attention_heads` is absent (diffusers issue #2011); `UNetConfig.num_heads` stores
the true head count per level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import FewstepError


def _per_level(value, n: int, name: str) -> tuple:
    """Broadcast an int/bool to n levels, or check a list has n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise FewstepError(f"config '{name}' has {len(value)} entries, expected one per level ({n})")
        return tuple(value)
    return (value,) * n


def _reject(cfg: dict, key: str, allowed: tuple, what: str) -> None:
    if cfg.get(key, allowed[0]) not in allowed:
        raise FewstepError(f"{what}: {key}={cfg[key]!r} is not supported (supported: {allowed})")


def read_json(path: Path) -> dict:
    """Read a config.json with a one-line error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"missing config file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FewstepError(f"malformed JSON in {path}: {e}") from None


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel structure. Tuples are per resolution level, top (full size) first;
    `up_attention` is in `up_blocks` order (deepest level first), as in diffusers."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_attention: tuple[bool, ...] = (True, True, True, False)
    up_attention: tuple[bool, ...] = (False, True, True, True)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)  # up blocks have one more resnet each
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # the mid block uses the last entry
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # head dim = channels // heads
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)  # attn1 attends to context
    cross_attention_dim: int = 768
    use_linear_projection: bool = False  # proj_in/proj_out: Linear (SD2, SDXL) or 1x1 Conv (SD1)
    upcast_attention: bool = False  # compute attention scores in fp32 (SD 2.1)
    mid_block: bool = True  # UNetMidBlock2DCrossAttn; SDXS-style UNets have none
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_time_embed_dim: int | None = None  # SDXL "text_time": Fourier dim of each size/crop id
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 1280 pooled + 6 * 256 = 2816
    time_cond_proj_dim: int | None = None  # LCM guidance-scale embedding
    sample_size: int = 64  # latent side the model was trained at

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_attention", "up_attention", "layers_per_block", "transformer_depth",
                     "num_heads", "only_cross_attention"):
            if len(getattr(self, name)) != n:
                raise FewstepError(f"UNetConfig.{name} needs {n} entries, one per level")
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h:
                raise FewstepError(f"UNetConfig: {c} channels do not split into {h} heads")
        if (self.addition_time_embed_dim is None) != (self.projection_class_embeddings_input_dim is None):
            raise FewstepError("UNetConfig: text_time add-embedding needs both addition_time_embed_dim "
                               "and projection_class_embeddings_input_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def top_attention_level(self) -> int:
        """The highest-resolution level with a transformer (the mid block's level when no other has one)."""
        n = len(self.block_out_channels)
        return min((lv for lv in range(n) if self.down_attention[lv] or self.up_attention[n - 1 - lv]), default=n - 1)

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(c // h for c, h in zip(self.block_out_channels, self.num_heads))

    @classmethod
    def from_diffusers(cls, d: dict) -> UNetConfig:
        down, up, mid = _unet_block_types(d)
        n = len(down)
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        depth = d.get("transformer_layers_per_block", 1)
        text_time = d.get("addition_embed_type") == "text_time"
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d["block_out_channels"]),
            down_attention=tuple(t == "CrossAttnDownBlock2D" for t in down),
            up_attention=tuple(t == "CrossAttnUpBlock2D" for t in up),
            layers_per_block=_per_level(d.get("layers_per_block", 2), n, "layers_per_block"),
            transformer_depth=_per_level(depth, n, "transformer_layers_per_block"),
            num_heads=_per_level(heads, n, "attention_head_dim"),
            only_cross_attention=_per_level(d.get("only_cross_attention", False), n, "only_cross_attention"),
            cross_attention_dim=d.get("cross_attention_dim", 1280),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention") or False),
            mid_block=mid is not None,
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            addition_time_embed_dim=d.get("addition_time_embed_dim") if text_time else None,
            projection_class_embeddings_input_dim=(
                d.get("projection_class_embeddings_input_dim") if text_time else None),
            time_cond_proj_dim=d.get("time_cond_proj_dim"),
            sample_size=d.get("sample_size", 64),
        )


# UNet2DConditionModel options fewstep does not build, each with the only value(s) it accepts.
UNET_FIXED = (("class_embed_type", (None,)), ("encoder_hid_dim_type", (None,)),
              ("resnet_time_scale_shift", ("default",)), ("act_fn", ("silu",)),
              ("time_embedding_type", ("positional",)), ("dual_cross_attention", (False,)),
              ("addition_embed_type", (None, "text_time")), ("conv_in_kernel", (3,)),
              ("conv_out_kernel", (3,)), ("center_input_sample", (False,)),
              ("downsample_padding", (1,)), ("mid_block_scale_factor", (1, 1.0)),
              ("num_class_embeds", (None,)), ("reverse_transformer_layers_per_block", (None,)),
              ("attention_type", ("default",)), ("resnet_out_scale_factor", (1.0, 1)),
              ("time_embedding_dim", (None,)), ("timestep_post_act", (None,)))


def _unet_block_types(d: dict) -> tuple[list, list, str | None]:
    """(down block types, up block types, mid block type) of a diffusers UNet config, after checking
    that fewstep builds every block and option it names."""
    what = "UNet config"
    down, up = d.get("down_block_types", []), d.get("up_block_types", [])
    if not down or len(up) != len(down):
        raise FewstepError(f"{what}: down_block_types and up_block_types must be non-empty and equal length")
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise FewstepError(f"{what}: down block type {t!r} is not supported")
    for t in up:
        if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
            raise FewstepError(f"{what}: up block type {t!r} is not supported")
    mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise FewstepError(f"{what}: mid_block_type {mid!r} is not supported")
    for key, allowed in UNET_FIXED:
        _reject(d, key, allowed, what)
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in depth):
        raise FewstepError(f"{what}: nested transformer_layers_per_block is not supported")
    oca = d.get("only_cross_attention", False)
    if d.get("mid_block_only_cross_attention") not in (None, False) or (mid and isinstance(oca, bool) and oca):
        raise FewstepError(f"{what}: cross-only attention in the mid block is not supported")
    return down, up, mid


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL: encoder/decoder of DownEncoderBlock2D / UpDecoderBlock2D levels."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True  # the checkpoint's VAE overflows in fp16: decode in fp32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        what = "VAE config"
        for t in d.get("down_block_types", ["DownEncoderBlock2D"]):
            if t != "DownEncoderBlock2D":
                raise FewstepError(f"{what}: down block type {t!r} is not supported")
        for t in d.get("up_block_types", ["UpDecoderBlock2D"]):
            if t != "UpDecoderBlock2D":
                raise FewstepError(f"{what}: up block type {t!r} is not supported")
        _reject(d, "act_fn", ("silu",), what)
        kw = _known(cls, d)
        kw["block_out_channels"] = tuple(d.get("block_out_channels", cls.block_out_channels))
        if kw.get("force_upcast") is None:
            kw.pop("force_upcast", None)
        return cls(**kw)


@dataclass(frozen=True)
class TAEConfig:
    """TAESD tiny autoencoder (Ollin Boer Bohan's taesd.py): 64-channel conv stacks, 8x scaling."""

    latent_channels: int = 4
    channels: int = 64
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    scaling_factor: float = 1.0  # TAESD latents are already in the diffusion model's space
    shift_factor: float = 0.0

    @classmethod
    def from_diffusers(cls, d: dict) -> TAEConfig:
        what = "AutoencoderTiny config"
        enc = tuple(d.get("encoder_block_out_channels", (64,) * 4))
        dec = tuple(d.get("decoder_block_out_channels", (64,) * 4))
        if len(set(enc + dec)) != 1:
            raise FewstepError(f"{what}: only equal block widths are supported, got {enc} / {dec}")
        _reject(d, "act_fn", ("relu",), what)
        _reject(d, "upsampling_scaling_factor", (2,), what)
        return cls(latent_channels=d.get("latent_channels", 4), channels=enc[0],
                   num_encoder_blocks=tuple(d.get("num_encoder_blocks", cls.num_encoder_blocks)),
                   num_decoder_blocks=tuple(d.get("num_decoder_blocks", cls.num_decoder_blocks)),
                   scaling_factor=d.get("scaling_factor", 1.0), shift_factor=d.get("shift_factor", 0.0) or 0.0)


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer (transformers CLIPTextModel / CLIPTextModelWithProjection layout)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set only for CLIPTextModelWithProjection (text_projection)
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # 2 in old configs: pooling then takes the argmax id, as transformers does
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise FewstepError(f"CLIP text config: hidden_act {self.hidden_act!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise FewstepError("CLIP text config: hidden_size must split evenly into heads")

    @classmethod
    def from_transformers(cls, d: dict) -> CLIPTextConfig:
        archs = d.get("architectures") or ["CLIPTextModel"]
        kw = _known(cls, d)
        kw["projection_dim"] = d.get("projection_dim") if "WithProjection" in archs[0] else None
        return cls(**kw)


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule and the shipped sampling defaults (a diffusers scheduler config)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    steps_offset: int = 0
    use_karras_sigmas: bool = False
    set_alpha_to_one: bool = False  # DDIM: the final step's alpha
    class_name: str = "EulerDiscreteScheduler"  # the diffusers scheduler: which sampler the model ships with
    original_inference_steps: int = 50  # LCM
    timestep_scaling: float = 10.0  # LCM boundary condition

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and self.trained_betas is None:
            raise FewstepError(f"scheduler: beta_schedule {self.beta_schedule!r} is not supported")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise FewstepError(f"scheduler: prediction_type {self.prediction_type!r} is not supported")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise FewstepError(f"scheduler: timestep_spacing {self.timestep_spacing!r} is not supported")

    @classmethod
    def from_diffusers(cls, d: dict) -> SchedulerConfig:
        if d.get("rescale_betas_zero_snr"):
            raise FewstepError("scheduler: rescale_betas_zero_snr=True is not supported")
        kw = _known(cls, d)
        kw["class_name"] = d.get("_class_name") or cls.class_name
        if d.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(d["trained_betas"])
        kw["use_karras_sigmas"] = bool(d.get("use_karras_sigmas") or False)
        return cls(**kw)


@dataclass(frozen=True)
class TextConditioning:
    """How a model family turns prompts into the UNet's conditioning (diffusers' StableDiffusionPipeline
    vs StableDiffusionXLPipeline), as data read at load time rather than guessed from the encoder count.

    SD 1.x / 2.x: the last encoder's final-LayerNorm'd hidden states are the context (SD 2.x's
    "penultimate layer" is already in its config: 23 of OpenCLIP-H's 24 layers). SDXL: each encoder's
    penultimate hidden states (no final LayerNorm), concatenated; the last encoder's projected pooled
    output and the size / crop ids feed the UNet's add-embedding."""

    hidden_state: str = "last"  # "last" | "penultimate"
    pooled: bool = False  # the last encoder's text_embeds -> the UNet's `text_embeds`
    time_ids: bool = False  # (original size, crop top-left, target size) -> the UNet's `time_ids`
    zeros_for_empty_negative: bool = False  # no negative prompt: zero conditioning, not the empty prompt's
    aesthetic_score: bool = False  # SDXL refiner: an aesthetic score in the time ids, not the target size

    def __post_init__(self):
        if self.hidden_state not in ("last", "penultimate"):
            raise FewstepError(f"TextConditioning.hidden_state {self.hidden_state!r}: use 'last' or 'penultimate'")

    @classmethod
    def for_unet(cls, unet: UNetConfig, zeros_for_empty_negative: bool = False,
                 aesthetic_score: bool = False) -> TextConditioning:
        """SDXL's conditioning for a UNet with the text_time add-embedding (with `aesthetic_score`: the
        refiner's, diffusers' `requires_aesthetics_score`), else SD 1.x / 2.x's."""
        sdxl = unet.addition_time_embed_dim is not None
        return cls("penultimate" if sdxl else "last", sdxl, sdxl, zeros_for_empty_negative, sdxl and aesthetic_score)
