"""TAESD tiny autoencoder: parity with diffusers AutoencoderTiny (random and real weights), round trip
on a photo-like image, exact parameter counts, and one-line errors for bad files."""

import pytest
import torch

from fewstep.configs import TAEConfig
from fewstep.errors import FewstepError
from fewstep.loading.folders import load_taesd
from fewstep.models.tae import TinyAutoencoder, taesd_to_diffusers
from helpers.env import requires_shared
from helpers.taesd import TAESD, diffusers_with_original_weights


def photo_like(size: int = 256) -> torch.Tensor:
    """A smooth synthetic 'photo' in [-1, 1]: colour gradients, a soft-edged disc, a shaded box."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - x), 0.8 - 0.5 * y])  # [3, H, W] sky-like ramp
    disc = torch.sigmoid((0.18 - ((x - 0.35) ** 2 + (y - 0.4) ** 2).sqrt()) * 60)
    img = img * (1 - disc) + torch.tensor([0.9, 0.25, 0.1])[:, None, None] * (0.6 + 0.4 * (1 - y)) * disc
    box = (torch.sigmoid((x - 0.55) * 80) * torch.sigmoid((0.88 - x) * 80)
           * torch.sigmoid((y - 0.6) * 80) * torch.sigmoid((0.92 - y) * 80))
    img = img * (1 - box) + torch.stack([0.2 + 0.5 * x, 0.5 + 0.3 * x, 0.2 * y]) * box
    return (img * 2 - 1)[None]  # [1, 3, H, W]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean()  # on the [0, 1] scale
    return (-10 * torch.log10(mse)).item()


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_random_weights_match_diffusers(latent_channels):
    from diffusers import AutoencoderTiny
    ref = AutoencoderTiny(latent_channels=latent_channels).eval()
    cfg = TAEConfig.from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = TinyAutoencoder(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    z = torch.randn(2, latent_channels, 8, 12) * 2
    with torch.no_grad():
        assert rel_err(ours.encode(x), ref.encode(x).latents) <= 1e-4
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-4


def test_parameter_counts():
    with torch.device("meta"):
        m = TinyAutoencoder(TAEConfig())
    assert sum(p.numel() for p in m.encoder.parameters()) == 1_222_532
    assert sum(p.numel() for p in m.decoder.parameters()) == 1_222_531


# Round-trip PSNR measured on photo_like(256): taesd 30.7 dB, taesdxl 36.0 dB; the bars sit just under.
MIN_PSNR = {"taesd": 30.0, "taesdxl": 35.0}


@requires_shared
@pytest.mark.parametrize("prefix", ["taesd", "taesdxl"])
def test_real_weights_match_diffusers_and_round_trip(prefix):
    ours = load_taesd(TAESD / f"{prefix}_encoder.safetensors", TAESD / f"{prefix}_decoder.safetensors")
    ref = diffusers_with_original_weights(prefix)
    x = photo_like(256)
    with torch.no_grad():
        z = ours.encode(x)
        assert z.shape == (1, 4, 32, 32)
        assert rel_err(z, ref.encode(x).latents) <= 1e-4
        y = ours.decode(z)
        assert rel_err(y, ref.decode(z).sample) <= 1e-4
    assert psnr(y.clamp(-1, 1), x) >= MIN_PSNR[prefix]


@requires_shared
def test_pth_and_single_side_files(tmp_path):
    from safetensors.torch import load_file
    torch.save(load_file(TAESD / "taesd_encoder.safetensors"), tmp_path / "enc.pth")
    a = load_taesd(encoder_path=tmp_path / "enc.pth")
    b = load_taesd(encoder_path=TAESD / "taesd_encoder.safetensors")
    x = photo_like(64)
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))
    assert a.decoder is None
    with pytest.raises(FewstepError, match="no decoder"):
        a.decode(torch.zeros(1, 4, 8, 8))
    dec = load_taesd(decoder_path=TAESD / "taesdxl_decoder.safetensors", dtype=torch.bfloat16)
    assert dec.encoder is None and next(dec.parameters()).dtype == torch.bfloat16


def original_layout(model: TinyAutoencoder, side: str) -> dict:
    """Our state dict written back in taesd.py's plain-Sequential naming (decoder shifted by the Clamp)."""
    shift = 1 if side == "decoder" else 0
    out = {}
    for k, v in getattr(model, side).layers.state_dict().items():
        i, rest = k.split(".", 1)
        out[f"{int(i) + shift}.{rest}"] = v.clone()
    return out


def testlatent_channels_come_from_shapes_not_names(tmp_path):
    from safetensors.torch import save_file
    src = TinyAutoencoder(TAEConfig(latent_channels=16))
    save_file(original_layout(src, "encoder"), tmp_path / "taesd_encoder.safetensors")  # a misleading name
    save_file(original_layout(src, "decoder"), tmp_path / "taesd_decoder.safetensors")
    m = load_taesd(tmp_path / "taesd_encoder.safetensors", tmp_path / "taesd_decoder.safetensors")
    assert m.cfg.latent_channels == 16
    assert taesd_to_diffusers({"3.conv.0.weight": 0}, "decoder") == {"decoder.layers.2.conv.0.weight": 0}
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m.decode(m.encode(x)), src.decode(src.encode(x)))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope_decoder.safetensors"
    with pytest.raises(FewstepError, match="nope_decoder.safetensors"):
        load_taesd(decoder_path=missing)
    with pytest.raises(FewstepError, match="needs an encoder file"):
        load_taesd()


def test_wrong_keys_are_named(tmp_path):
    from safetensors.torch import save_file
    sd = original_layout(TinyAutoencoder(TAEConfig()), "encoder")
    sd["99.extra.weight"] = torch.zeros(1)
    del sd["1.conv.2.bias"]
    sd["0.weight"] = torch.zeros(64, 5, 3, 3)
    save_file(sd, tmp_path / "enc.safetensors")
    with pytest.raises(FewstepError) as e:
        load_taesd(encoder_path=tmp_path / "enc.safetensors")
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("encoder.layers.1.conv.2.bias", "encoder.layers.99.extra.weight", "encoder.layers.0.weight"):
        assert name in msg
