"""AutoencoderKL parity with diffusers (random weights, fp32 CPU): encode_moments, encode (mean and
sampled with the same generator), decode, on the real SD 1.5 VAE config at full width; the SDXL
config's scaling factor; a shift_factor / no-quant-conv / no-mid-attention variant; exact parameter
count on the meta device; state-dict key identity.

Tolerance everywhere: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|).
"""

import pytest
import torch

from fewstep.configs import VAEConfig, read_json
from fewstep.models.vae import AutoencoderKL
from helpers.env import CONFIGS, requires_shared
from helpers.tiny import randomize_norms

diffusers = pytest.importorskip("diffusers")
pytestmark = requires_shared


def reference(name: str, **overrides):
    d = {k: v for k, v in read_json(CONFIGS / name / "vae" / "config.json").items() if not k.startswith("_")}
    torch.manual_seed(0)
    return randomize_norms(diffusers.AutoencoderKL.from_config({**d, **overrides}))


def ours_from(ref) -> AutoencoderKL:
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config)))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4 * max(1.0, want.abs().max().item()), diff


def check_parity(ref, ours, size: int = 32) -> None:
    """encode_moments, encode (mean and sampled), decode against diffusers, in diffusion space."""
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.inference_mode():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode_moments(x)
        assert_close(mean, dist.mean)
        assert_close(logvar, dist.logvar)
        assert_close(ours.encode(x), (dist.mean - shift) * scale)
        drawn = dist.sample(generator=torch.Generator().manual_seed(7))
        assert_close(ours.encode(x, generator=torch.Generator().manual_seed(7), sample=True), (drawn - shift) * scale)
        z = torch.randn_like(dist.mean)  # diffusion-space latents
        assert_close(ours.decode(z), ref.decode(z / scale + shift).sample)


def test_sd15_full_width_parity():
    ref = reference("sd15")
    ours = ours_from(ref)
    assert ours.cfg.scaling_factor == 0.18215 and ours.quant_conv is not None
    check_parity(ref, ours)


def test_logvar_is_clamped_like_diffusers():
    ref = reference("sd15", block_out_channels=(32, 64), norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    with torch.no_grad():
        ref.quant_conv.bias[4:].fill_(-100.0)  # pushes every logvar far below -30
    ours = ours_from(ref)
    with torch.inference_mode():
        _, logvar = ours.encode_moments(torch.zeros(1, 3, 16, 16))
    assert logvar.min().item() == -30.0


SMALL = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


@pytest.mark.parametrize("overrides", [
    # SD3 / Flux-style: 16 channels, shifted latents, no quant convs
    dict(latent_channels=16, shift_factor=0.1159, scaling_factor=1.5305, use_quant_conv=False,
         use_post_quant_conv=False),
    dict(mid_block_add_attention=False, scaling_factor=0.5),
])
def test_variants_parity(overrides):
    ref = reference("sd15", **SMALL, **overrides)
    ours = ours_from(ref)
    assert (ours.quant_conv is None) == (not ref.config.use_quant_conv)
    check_parity(ref, ours, size=16)


def test_sdxl_config_scaling_factor():
    cfg = VAEConfig.from_diffusers(read_json(CONFIGS / "sdxl-base" / "vae" / "config.json"))
    assert cfg.scaling_factor == 0.13025 and cfg.shift_factor is None and cfg.force_upcast
    ref = reference("sdxl-base", **SMALL)
    ours = ours_from(ref)
    assert ours.cfg.scaling_factor == 0.13025
    check_parity(ref, ours, size=16)


def test_parameter_count_and_keys():
    d = read_json(CONFIGS / "sd15" / "vae" / "config.json")
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.from_diffusers(d))
        ref = diffusers.AutoencoderKL.from_config(d)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert not list(model.buffers())


def test_missing_key_fails_strict_load():
    ref = reference("sd15", **SMALL)
    sd = ref.state_dict()
    del sd["decoder.mid_block.attentions.0.to_v.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config))).load_state_dict(sd, strict=True)


def test_channels_last_and_bf16():
    ref = reference("sd15", **SMALL)
    ours = ours_from(ref)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        want = ours.decode(ours.encode(x))
        ours.to(memory_format=torch.channels_last)
        got = ours.decode(ours.encode(x.to(memory_format=torch.channels_last)))
        assert_close(got, want)
        ours.to(torch.bfloat16)
        half = ours.decode(ours.encode(x.bfloat16()))
    assert half.dtype == torch.bfloat16
    assert (half.float() - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_encode_under_autocast_keeps_the_inputs_dtype_and_noise():
    """A bf16 autocast encoder (the training data stream's) returns fp32 latents for fp32 images, its posterior
    draw made from the same fp32 noise as without autocast: only the convolutions' rounding differs."""
    ours = ours_from(reference("sd15", **SMALL))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = ours.encode(x, torch.Generator().manual_seed(0), sample=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours.encode(x, torch.Generator().manual_seed(0), sample=True)
            mean, _ = ours.encode_moments(x)
    assert mean.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert 0 < (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
