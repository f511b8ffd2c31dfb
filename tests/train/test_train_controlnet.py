"""`fewstep train controlnet`: a ControlNet for the built-in model starts as diffusers' `from_unet` makes it
(the UNet's weights, zero residuals), trains a few steps in seconds to a folder that diffusers'
ControlNetModel loads to fewstep's outputs, resumes to the straight run, leaves the base model as it was,
is scored by `fewstep eval --controlnet`, and refuses bad input in one line."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep
from fewstep.cli import main
from fewstep.loading.controlnet import load_control
from fewstep.train.controlnet import (HINT_CHANNELS, Steered, base_unet_config, diffusers_config, from_unet,
                                      train_controlnet)

STUDENT = Path(fewstep.__file__).parent / "assets" / "shapes-turbo"
KW = dict(steps=6, batch=2, lr=1e-3, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("controlnet") / "cn"
    return out, train_controlnet(None, "layout", out, **KW)


def test_it_starts_as_diffusers_from_unet():
    """The same keys and shapes as diffusers' ControlNetModel.from_unet, the UNet's own weights in the copied
    parts, and residuals of exactly zero: the base model's images are unchanged at step 0."""
    import diffusers
    pipe = fewstep.load(STUDENT)
    net = from_unet(pipe.unet, diffusers_config(base_unet_config(None)))
    unet = diffusers.UNet2DConditionModel.from_pretrained(STUDENT / "unet", layers_per_block=1)  # diffusers: one number
    ref = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    ours, theirs = net.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()} and len(ours) == 172
    copied = [k for k in ours if k.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))]
    assert len(copied) == 142 and all(torch.equal(ours[k], theirs[k]) for k in copied)
    downs, mid = net(torch.randn(2, 4, 16, 16), torch.tensor([999, 249]), torch.randn(2, 32, 128),
                     torch.rand(2, 3, 128, 128))
    assert len(downs) == 6 and all(d.abs().max() == 0 for d in downs) and mid.abs().max() == 0


def test_the_folder_is_diffusers_controlnet_with_the_same_outputs(trained):
    import diffusers
    out, report = trained
    assert report["steps"] == 6 and report["timesteps"] == [999, 749, 499, 249] and report["out"] == str(out)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert (Path(str(out) + ".train") / "logs" / "controlnet.jsonl").is_file()
    pipe = fewstep.load(STUDENT)
    ours = load_control(out, pipe.unet.cfg)
    ref = diffusers.ControlNetModel.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, hint = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 32, 128, generator=g), \
        torch.rand(2, 3, 128, 128, generator=g)
    t = torch.tensor([999, 499])
    with torch.no_grad():
        downs, mid = ours(x, t, ctx, hint)
        rdowns, rmid = ref(x, t, ctx, hint, return_dict=False)
    assert mid.abs().max() > 1e-4, "training moved nothing"
    for a, b in zip([*downs, mid], [*rdowns, rmid], strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_the_base_model_is_untouched(trained):
    pipe = fewstep.load(STUDENT)
    shipped = load_file(STUDENT / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.unet.state_dict()[k], v.float()) for k, v in shipped.items())


def test_stop_and_resume_give_the_straight_run(trained, tmp_path):
    straight, _ = trained
    out = tmp_path / "resumed"
    assert train_controlnet(None, "layout", out, stop_at=3, **KW)["steps"] == 3 and not out.exists()
    assert train_controlnet(None, "layout", out, resume=True, **KW)["steps"] == 6
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (out, straight))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_one_step_trains_that_share_at_t_999(tmp_path, monkeypatch):
    """A 4-step base trains at its sampler's timesteps; one_step puts that share of each batch at the
    first (999, where the noise holds no layout and only the map can place the objects), the rest evenly."""
    seen = []
    forward = Steered.forward

    def spy(self, x, t, context, hint):
        seen.append(t.tolist())
        return forward(self, x, t, context, hint)

    monkeypatch.setattr(Steered, "forward", spy)
    for share in (None, 1.0, 0.5):
        out = tmp_path / f"cn{share}".replace(".", "-")
        train_controlnet(None, "layout", out, steps=1, batch=40, lr=1e-3, one_step=share)
    plain, first, half = seen
    assert set(plain) == {999, 749, 499, 249} and first == [999] * 40
    assert set(half) == {999, 749, 499, 249} and 12 <= half.count(999) <= 28


def test_eval_scores_it(trained, capsys):
    out, _ = trained
    assert main(["eval", "--controlnet", str(out), "--n", "4", "--steps", "1", "--control-scale", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "| shapes-turbo + cn at 0.5 | colours | 2 |" in table and "| shapes-turbo, no control | full | 2 |" in table
    assert "| shapes-turbo before loading it | 1 |" in table and "| shapes-turbo after unloading it | 1 |" in table


@pytest.mark.parametrize("args,match", [
    (["--condition", "depth"], "--condition 'depth': use one of layout, canny"),
    ([], "train controlnet needs --condition layout or --condition canny"),
    (["--condition", "layout", "--base", "{tmp}/nothing"], "no such file or folder: .*nothing"),
    (["--condition", "layout", "--out", "{tmp}/cn.safetensors"], "a ControlNet is written as a folder"),
    (["--condition", "layout", "--data", "{tmp}"], "--data and --text-encoder are options of the lora stage"),
    (["--condition", "layout", "--one-step", "2"], "--one-step is a probability between 0 and 1, not 2.0"),
    (["--condition", "layout", "--processes", "2"], "--processes: options of the recipe's stages, not of "
     "controlnet \\(several processes: `accelerate launch --multi_gpu --num_processes N -m fewstep.train.cli "
     "controlnet ...`"),
    (["--condition", "layout", "--scale", "0.1", "--tiny"], "--tiny, --scale: options of the recipe's stages, not "
     "of controlnet$"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, match):
    argv = ["train", "controlnet", "--out", str(tmp_path / "cn"), "--steps", "1",
            *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(match, err) and "\n" not in err, err
    assert not (tmp_path / "cn").exists()
