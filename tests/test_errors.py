"""Every user mistake gives a one-line FewstepError that names the thing and says what to do."""

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fewstep
from fewstep.cli import main
from fewstep.errors import FewstepError
from helpers.env import requires_shared

pytestmark = requires_shared


@pytest.fixture(scope="module")
def sd1(tiny_folders):
    """The shared tiny SD 1.x folder, read only: tests that break a folder get a `copy`."""
    return tiny_folders["sd1"]


@pytest.fixture
def copy(sd1, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(sd1, dst)
    return dst


def _raises(match, fn, *a, **kw):
    with pytest.raises(FewstepError, match=match) as e:
        fn(*a, **kw)
    assert "\n" not in str(e.value), "error message must be one line"
    return str(e.value)


def test_missing_folder_and_file(tmp_path, copy):
    _raises("no such file or folder", fewstep.load, tmp_path / "nope")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _raises(r"no weights in .*unet.*diffusion_pytorch_model.safetensors", fewstep.load, copy)
    (copy / "vae" / "config.json").unlink()
    _raises("not an autoencoder folder|no config.json", fewstep.load_autoencoder, copy / "vae")


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    msg = _raises("not a local path, and downloading it from the hub failed", fewstep.load, "nobody/no-such-model")
    assert "nobody/no-such-model" in msg


def _edit_unet(folder, fn):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_missing_unexpected_misshaped_keys(copy):
    _edit_unet(copy, lambda sd: sd.pop("conv_in.bias"))
    _raises(r"1 missing keys: conv_in\.bias", fewstep.load, copy)
    _edit_unet(copy, lambda sd: sd.update({"conv_in.bias": torch.zeros(32), "extra.weight": torch.zeros(1)}))
    _raises(r"1 unexpected keys: extra\.weight", fewstep.load, copy)
    _edit_unet(copy, lambda sd: (sd.pop("extra.weight"), sd.update({"conv_in.bias": torch.zeros(31)})))
    _raises(r"mis-shaped: conv_in\.bias \(31,\) != \(32,\)", fewstep.load, copy)


def test_unknown_architecture(copy):
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["down_block_types"][0] = "KDownBlock2D"
    cfg_path.write_text(json.dumps(cfg))
    _raises("down block type 'KDownBlock2D' is not supported", fewstep.load, copy)


def test_pickle_refused_without_allow_pickle(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(path), copy / "unet" / "diffusion_pytorch_model.bin")
    path.unlink()
    _raises("pickle file.*allow_pickle=True", fewstep.load, copy)
    assert fewstep.load(copy, allow_pickle=True).unet is not None


@pytest.mark.parametrize("kw,match", [
    (dict(width=100), r"width=100 must be a positive multiple of 8"),
    (dict(height=0), r"height=0 must be a positive multiple of 8"),
    (dict(steps=0), r"steps"),
    (dict(sampler="dpm_fast"), r"unknown sampler 'dpm_fast'"),
    (dict(num_images=0), r"num_images=0"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), r"latents have shape \(1, 4, 3, 3\), expected \(1, 4, 8, 8\)"),
])
def test_bad_generation_arguments(sd1, kw, match):
    pipe = fewstep.load(sd1)
    _raises(match, pipe, "a cat", **{"width": 64, "height": 64, "progress": False, **kw})


def test_overlong_prompt_is_chunked_not_truncated(sd1):
    """Past 75 tokens a prompt goes on in a second chunk, as in A1111: no error, and the tail counts."""
    pipe = fewstep.load(sd1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        long = pipe("cat " * 99 + "dog", steps=1, guidance=0.0, width=64, height=64, progress=False, seed=1)
        cut = pipe("cat " * 99, steps=1, guidance=0.0, width=64, height=64, progress=False, seed=1)
    assert not [x for x in w if "truncated" in str(x.message)]
    assert np.abs(np.asarray(long[0], float) - np.asarray(cut[0], float)).max() > 0


def test_fp16_vae_overflow_is_retried_in_fp32(sd1):
    from fewstep.imaging import safe_decode
    ae = fewstep.load_autoencoder(sd1, dtype=torch.float16)
    with torch.no_grad():
        # post_quant_conv outputs now exceed fp16's 65504 (the weights themselves still fit); the
        # decoder's GroupNorms bring fp32 activations back to O(1).
        ae.post_quant_conv.weight.mul_(1e5).clamp_(-6e4, 6e4)
    z = torch.randn(1, 4, 8, 8)
    assert not torch.isfinite(ae.decode(z.half())).all(), "the setup must overflow in fp16"
    with pytest.warns(UserWarning, match="NaN/inf; decoding again in float32"):
        x = safe_decode(ae, z)
    assert torch.isfinite(x).all() and ae.post_quant_conv.weight.dtype == torch.float16


def test_cli_prints_one_line_and_writes_nothing(sd1, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "a cat", "--model", str(tmp_path / "nope"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no such file or folder") and "\n" not in err
    assert main(["generate", "a cat", "--model", str(sd1), "--width", "60", "--output", str(out)]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), "a failed run must leave no files"


def test_cli_writes_pngs_with_parameters(sd1, tmp_path, capsys):
    out = tmp_path / "imgs"
    rc = main(["generate", "a cat", "--model", str(sd1), "--width", "64", "--height", "64", "--steps", "1",
               "--guidance", "0", "--num-images", "2", "--seed", "5", "--output", str(out), "--quiet"])
    assert rc == 0
    paths = capsys.readouterr().out.split()
    assert [p.split("/")[-1] for p in paths] == ["00000-5.png", "00001-6.png"]
    from PIL import Image
    im = Image.open(paths[1])
    assert im.size == (64, 64) and "Seed: 6" in im.text["parameters"]
    assert not list(out.glob("*.part"))


def test_cli_speed_options(sd1, tmp_path, capsys):
    """--token-downsample and --quantize int8-cpu reach the pipeline: same picture, nearly; bad values are one line."""
    import numpy as np
    from PIL import Image
    args = ["generate", "a cat", "--model", str(sd1), "--width", "64", "--height", "64", "--steps", "1", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--output", str(tmp_path / "b.png"), "--token-downsample", "2", "--quantize", "int8-cpu",
                 "--quantize-parts", "unet,text,decoder"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float64) for n in "ab")
    assert 0 < np.abs(a - b).mean() < 8  # mean change in 0-255 levels
    capsys.readouterr()
    for bad, match in ((["--token-downsample", "0"], "whole number >= 1"),
                       (["--quantize", "int8-cpu", "--quantize-parts", "vae"], "unknown part")):
        assert main([*args, "--output", str(tmp_path / "c.png"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and re.search(match, err), err
    assert not (tmp_path / "c.png").exists()
