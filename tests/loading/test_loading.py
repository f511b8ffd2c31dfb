"""Loading diffusers folders as diffusers writes them: variant files, sharded weights, dtypes, defaults."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fewstep
from helpers.env import requires_shared

pytestmark = requires_shared


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("load")
    folder, pipe = make_pipeline("sd1", root)
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)  # adds *.fp16.safetensors beside
    return folder


def _unet_equal(a, b):
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_variant_files(sd1, tmp_path):
    plain, fp16 = fewstep.load(sd1), fewstep.load(sd1, variant="fp16")
    assert _unet_equal(plain, fp16)  # same values: the variant was saved from the same fp32 weights
    only = tmp_path / "only-fp16"
    shutil.copytree(sd1, only, ignore=shutil.ignore_patterns("*model.safetensors"))
    assert _unet_equal(fewstep.load(only), plain), "with no plain weights the fp16 variant is used"
    with pytest.raises(fewstep.errors.FewstepError, match=r"expected diffusion_pytorch_model\.bf16\.safetensors"):
        fewstep.load(sd1, variant="bf16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_conversion(sd1, dtype):
    pipe = fewstep.load(sd1, dtype=dtype)
    for m in (pipe.unet, *pipe.text_encoders):
        assert {p.dtype for p in m.parameters()} == {dtype}
    # the tiny VAE's config says force_upcast: fp16 keeps it in fp32 (as diffusers decodes it); bf16 does
    # not, except on a CPU without bf16 hardware (fewstep.loading.dtypes.native_bf16), where fp32 is faster
    from fewstep.loading.dtypes import native_bf16
    bf16_vae = dtype == torch.bfloat16 and native_bf16("cpu")
    assert {p.dtype for p in pipe.vae.parameters()} == {dtype if bf16_vae else torch.float32}
    image = pipe("a cat", steps=1, guidance=0.0, width=64, height=64, progress=False, output_type="pt")
    ref = fewstep.load(sd1)("a cat", steps=1, guidance=0.0, width=64, height=64, progress=False, output_type="pt")
    assert (image.float() - ref).abs().mean() < 0.05


def test_sharded_weights(sd1, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(sd1, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, folder / "unet" / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    path.unlink()
    for f in (folder / "unet").glob("*.fp16.safetensors"):
        f.unlink()
    assert _unet_equal(fewstep.load(folder), fewstep.load(sd1))


def test_defaults_from_scheduler_and_fewstep_json(sd1, tmp_path):
    assert fewstep.load(sd1).defaults.steps == 25  # a leading/linspace Euler model: the usual 25 steps, CFG 7.5
    folder = tmp_path / "turbo"
    shutil.copytree(sd1, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "timestep_spacing": "trailing"}))
    d = fewstep.load(folder).defaults
    assert (d.steps, d.guidance) == (1, 0.0)  # trailing spacing marks a Turbo model
    (folder / "fewstep.json").write_text(json.dumps({"steps": 2, "guidance": 1.5, "sampler": "euler_a"}))
    d = fewstep.load(folder).defaults
    assert (d.steps, d.guidance, d.sampler) == (2, 1.5, "euler_a")
    (folder / "fewstep.json").write_text(json.dumps({"stpes": 2}))
    with pytest.raises(fewstep.errors.FewstepError, match=r"unknown keys \['stpes'\]"):
        fewstep.load(folder)
