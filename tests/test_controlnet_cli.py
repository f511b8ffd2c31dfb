"""`fewstep generate --controlnet PATH[:SCALE] --control-image FILE`: the Python API's image, the PNG's
parameters with sd-webui-controlnet's "ControlNet N" field, `fewstep inspect` on a ControlNet folder, and
one-line errors before the model loads."""

import diffusers
import numpy as np
import pytest
from PIL import Image, ImageDraw

import fewstep
from fewstep.cli import main
from helpers.env import ROOT
from test_controlnet import make_controlnet


@pytest.fixture(scope="module")
def net_dir(tmp_path_factory):
    """A steering ControlNet for the built-in model (random zero convolutions), as a diffusers folder."""
    real = diffusers.UNet2DConditionModel.from_pretrained(ROOT / "fewstep/assets/shapes-turbo/unet")
    # diffusers' ControlNetModel takes one layers_per_block for all levels; the built-in UNet lists [1, 1, 1]
    unet = diffusers.UNet2DConditionModel.from_config({**real.config, "layers_per_block": 1,
                                                       "transformer_layers_per_block": 1})
    unet.load_state_dict(real.state_dict())
    folder = tmp_path_factory.mktemp("cn") / "edges-net"
    make_controlnet(unet, 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "edges.png"
    image = Image.new("RGB", (128, 128))
    ImageDraw.Draw(image).ellipse((20, 30, 90, 100), outline="white", width=3)
    image.save(path)
    return path


def test_the_command_line_makes_the_python_apis_image(net_dir, edges, tmp_path):
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--controlnet", f"{net_dir}:0.7", "--control-image", str(edges),
                 "--control-end", "0.5", "--seed", "4", "--output", str(out), "--quiet"]) == 0
    pipe = fewstep.load(controlnet=net_dir)
    want = pipe("a red circle", control_image=Image.open(edges), controlnet_conditioning_scale=0.7,
                control_guidance_end=0.5, seed=4, progress=False)[0]
    got = Image.open(out)
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    plain = fewstep.load()("a red circle", seed=4, progress=False)[0]
    assert np.abs(np.asarray(got.convert("RGB"), np.int16) - np.asarray(plain, np.int16)).mean() > 1  # it steered
    assert got.info["parameters"].endswith('ControlNet 0: "Module: none, Model: edges-net, Weight: 0.7, Resize Mode: '
                                           'Just Resize, Guidance Start: 0, Guidance End: 0.5, Control Mode: Balanced"')


def test_inspect_reads_a_controlnet_folder(net_dir, capsys):
    assert main(["inspect", str(net_dir)]) == 0
    assert "ControlNet" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--controlnet", "{net}"], "1 --controlnet and 0 --control-image: give one control image per control model"),
    (["--control-image", "{img}"], "0 --controlnet and 1 --control-image"),
    (["--controlnet", "{net}", "--control-image", "{tmp}/none.png"], "none.png"),
    (["--controlnet", "{tmp}/nowhere", "--control-image", "{img}"], "nowhere"),
])
def test_mistakes_are_one_line_errors_and_nothing_is_written(net_dir, edges, tmp_path, capsys, args, message):
    args = [x.format(net=net_dir, img=edges, tmp=tmp_path) for x in args]
    assert main(["generate", "a red circle", *args, "--output", str(tmp_path / "x.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_a_photo_through_canny_is_the_preprocessed_image(net_dir, tmp_path):
    photo = tmp_path / "photo.png"
    image = Image.new("RGB", (128, 128), (40, 80, 120))
    ImageDraw.Draw(image).rectangle((30, 40, 90, 100), fill=(230, 210, 50))
    image.save(photo)
    out = tmp_path / "a.png"
    assert main(["generate", "a red square", "--controlnet", str(net_dir), "--control-image", str(photo),
                 "--control-preprocess", "canny", "--output", str(out), "--quiet"]) == 0
    from fewstep.preprocess import canny
    want = fewstep.load(controlnet=net_dir)("a red square", control_image=canny(image), progress=False)[0]
    got = Image.open(out)
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    assert 'ControlNet 0: "Module: canny, Model: edges-net, Weight: 1,' in got.info["parameters"]
    assert main(["generate", "a red square", "--controlnet", str(net_dir), "--control-image", str(photo),
                 "--control-preprocess", "canny", "--control-preprocess", "none", "--output", str(out)]) == 2
