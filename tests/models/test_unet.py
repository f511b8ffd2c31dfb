"""UNet parity with diffusers `UNet2DConditionModel` (random weights, fp32 CPU) for every family's
real block layout at reduced width, the full-width SD-Turbo UNet, exact parameter counts of the
full-size models (built on the meta device), and state-dict key identity.

Tolerance everywhere: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|).
"""

import time

import pytest
import torch

from fewstep.configs import UNetConfig, read_json
from fewstep.errors import FewstepError
from fewstep.models.unet import UNet
from helpers.env import CONFIGS, requires_shared
from helpers.tiny import randomize_norms

diffusers = pytest.importorskip("diffusers")
pytestmark = requires_shared


def reference(name: str, **overrides):
    """A seeded random diffusers UNet from the real config of `name` with `overrides` applied."""
    d = {k: v for k, v in read_json(CONFIGS / name / "unet" / "config.json").items() if not k.startswith("_")}
    torch.manual_seed(0)
    return randomize_norms(diffusers.UNet2DConditionModel.from_config({**d, **overrides}))


def ours_from(ref) -> UNet:
    with torch.device("meta"):
        model = UNet(UNetConfig.from_diffusers(dict(ref.config)))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


def inputs(ref, h: int = 16, w: int = 16, batch: int = 2) -> dict:
    """Random inputs for both models; distinct, fractional timesteps per sample."""
    c = ref.config
    x = torch.randn(batch, c.in_channels, h, w)
    t = torch.tensor([999.0, 250.5, 17.25, 0.0][:batch])
    ctx = torch.randn(batch, 7, c.cross_attention_dim)
    kw = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["text_embeds"] = torch.randn(batch, pooled)
        kw["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 12, 40, 832, 1216]])[:batch]
    if c.time_cond_proj_dim is not None:
        kw["timestep_cond"] = torch.randn(batch, c.time_cond_proj_dim)
    return dict(x=x, t=t, context=ctx, **kw)


def assert_parity(ref, ours, inp: dict) -> float:
    with torch.inference_mode():
        added = {k: inp[k] for k in ("text_embeds", "time_ids") if k in inp} or None
        want = ref(inp["x"], inp["t"], inp["context"], timestep_cond=inp.get("timestep_cond"),
                   added_cond_kwargs=added).sample
        got = ours(**inp)
    diff = (got - want).abs().max().item()
    assert got.shape == want.shape
    assert diff <= 1e-4 * max(1.0, want.abs().max().item()), diff
    return diff


SD21_SMALL = dict(block_out_channels=(40, 80, 160, 160), norm_num_groups=8, cross_attention_dim=64)  # head dim 8
CASES = {
    # SD 1.x: 8 heads per level (head dim 4/8), 1x1-conv projections; 8 groups to catch a hard-coded 32
    "sd15": ("sd15", dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=48)),
    "sd21-base": ("sd21-base", SD21_SMALL),
    "sd-turbo": ("sd-turbo", SD21_SMALL),
    "sd21-upcast": ("sd21-base", dict(SD21_SMALL, upcast_attention=True)),
    # SDXL: real 3-level layout, no attention at the top, per-level distinct depth, text_time add-embedding
    "sdxl": ("sdxl-base", dict(block_out_channels=(40, 80, 160), norm_num_groups=8, cross_attention_dim=64,
                               transformer_layers_per_block=(1, 2, 3), addition_time_embed_dim=8,
                               projection_class_embeddings_input_dim=32 + 6 * 8)),
    # SDXS-style: 3 levels, one resnet per level, no mid block, attn1 attends to the text
    "sdxs": ("sd21-base", dict(SD21_SMALL, block_out_channels=(40, 80, 160), attention_head_dim=(5, 10, 20),
                               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                               layers_per_block=1, mid_block_type=None, only_cross_attention=True)),
    "inpaint": ("sd15", dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=48, in_channels=9)),
    "lcm": ("sd15", dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=48, time_cond_proj_dim=256)),
}


def case_reference(case: str):
    name, overrides = CASES[case]
    return reference(name, **overrides)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_reduced_width(case):
    ref = case_reference(case)
    assert_parity(ref, ours_from(ref), inputs(ref))


def test_parity_odd_latent_size():
    """12x20 latents: 3 -> 2 after the third downsample, so upsampling must match the skip's size."""
    ref = case_reference("sd15")
    assert_parity(ref, ours_from(ref), inputs(ref, h=12, w=20))


def test_case_configs_are_what_they_claim():
    sdxl, sdxs, lcm = (UNetConfig.from_diffusers(dict(case_reference(c).config)) for c in ("sdxl", "sdxs", "lcm"))
    assert sdxl.down_attention == (False, True, True) and sdxl.transformer_depth == (1, 2, 3)
    assert sdxl.head_dims == (8, 8, 8) and sdxl.addition_time_embed_dim == 8
    assert not sdxs.mid_block and sdxs.only_cross_attention == (True,) * 3 and sdxs.layers_per_block == (1,) * 3
    assert lcm.time_cond_proj_dim == 256


def test_channels_last_and_keys():
    ref = case_reference("sd15")
    ours = ours_from(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert not list(ours.buffers())  # nothing computed is stored: a diffusers checkpoint has no such key
    inp = inputs(ref)
    with torch.inference_mode():
        want = ours(**inp)
        ours.to(memory_format=torch.channels_last)
        got = ours(**{**inp, "x": inp["x"].to(memory_format=torch.channels_last)})
    assert want.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_missing_key_fails_strict_load():
    ref = case_reference("sd15")
    sd = ref.state_dict()
    del sd["up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2.weight"]
    model = UNet(UNetConfig.from_diffusers(dict(ref.config)))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    ref = case_reference("sd21-upcast")
    ours = ours_from(ref)
    inp = inputs(ref)
    with torch.inference_mode():
        want = ours(**inp)
        ours.to(dtype)
        got = ours(**{k: v.to(dtype) if k != "t" else v for k, v in inp.items()})
    assert got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_missing_sdxl_conditioning_is_a_clear_error():
    ref = case_reference("sdxl")
    inp = inputs(ref)
    del inp["time_ids"]
    with pytest.raises(FewstepError, match="time_ids"):
        ours_from(ref)(**inp)


REAL = {  # config folder: (exact parameter count, expected per-level structure)
    "sd15": (859_520_964, dict(num_heads=(8,) * 4, head_dims=(40, 80, 160, 160), use_linear_projection=False)),
    "sd21-base": (865_910_724, dict(num_heads=(5, 10, 20, 20), head_dims=(64,) * 4, use_linear_projection=True)),
    "sd-turbo": (865_910_724, dict(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, upcast_attention=False)),
    "sdxl-base": (2_567_463_684, dict(down_attention=(False, True, True), up_attention=(True, True, False),
                                      transformer_depth=(1, 2, 10), head_dims=(64,) * 3, cross_attention_dim=2048,
                                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_structure_and_parameter_count(name):
    count, expect = REAL[name]
    cfg = UNetConfig.from_diffusers(read_json(CONFIGS / name / "unet" / "config.json"))
    for key, value in expect.items():
        assert getattr(cfg, key) == value, key
    with torch.device("meta"):
        model = UNet(cfg)
    assert sum(p.numel() for p in model.parameters()) == count


def test_full_width_sd_turbo():
    """The real 865.9M-parameter SD-Turbo UNet with random weights, 16x16 latents, batch 2 (~20 s)."""
    t0 = time.perf_counter()
    ref = reference("sd-turbo")
    ours = ours_from(ref)  # assign=True: shares the reference's tensors, no second copy
    assert sum(p.numel() for p in ours.parameters()) == 865_910_724
    diff = assert_parity(ref, ours, inputs(ref))
    print(f"full-width SD-Turbo UNet: max abs diff {diff:.3g} in {time.perf_counter() - t0:.1f} s")


def test_scalar_timestep_broadcasts_over_the_batch():
    ref = case_reference("sd15")
    ours = ours_from(ref)
    inp = inputs(ref)
    with torch.inference_mode():
        want = ours(**{**inp, "t": torch.tensor([500.5, 500.5])})
        got_tensor = ours(**{**inp, "t": torch.tensor(500.5)})
        got_float = ours(**{**inp, "t": 500.5})
    assert torch.equal(got_tensor, want) and torch.equal(got_float, want)
