"""Image-conditioned generation's inputs and A1111's options on the built-in model: the kinds of image a
user hands in, the notices and one-line errors, the original kept where it should be, outpainting, the
command line, and the seed contract with a source image."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.edits import MAX_PIXELS, load_image, outpaint_canvas
from fewstep.errors import FewstepError
from fewstep.outputs import read_parameters
from fewstep.shapes.data import batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return fewstep.load()


@pytest.fixture(scope="module")
def scene():
    images, captions, _ = batch(3, 1, drop=0.0)
    return Image.fromarray(images[0]), captions[0]


def half_mask(size=128, left=True) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, (0, 0, size // 2, size) if left else (size // 2, 0, size, size))
    return m


def test_the_kinds_of_image_a_user_hands_in(tmp_path):
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent: flattened onto white
    deep = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert deep.mode.startswith("I")
    assert load_image(deep).getpixel((0, 0)) == (255, 255, 255)  # 16 bits scaled, not clipped
    assert load_image(Image.new("L", (4, 4), 100)).getpixel((1, 1)) == (100, 100, 100)
    x = torch.zeros(1, 3, 8, 8)
    assert load_image(x).getpixel((0, 0)) == (0, 0, 0)  # [0, 1] tensors, as diffusers
    assert load_image(x - 1).getpixel((0, 0)) == (0, 0, 0)  # negative values: read as [-1, 1]
    assert load_image(np.full((8, 8, 3), 255, np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.png", "no such file"),
    (lambda p: (p / "x.png").write_text("not an image") and p / "x.png", "is not an image fewstep can read"),
    (lambda p: Image.new("1", (9000, 8000)).save(p / "big.png") or p / "big.png", f"more than {MAX_PIXELS} pixels"),
    (lambda p: torch.full((3, 8, 8), float("nan")), "expected finite"),
    (lambda p: torch.zeros(5, 8, 8), "expected finite"),
    (lambda p: 5, "must be a PIL image, a file path"),
])
def test_what_is_not_an_image_is_one_line(tmp_path, make, match):
    with pytest.raises(FewstepError, match=match) as e:
        load_image(make(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=1.5), "strength=1.5 must be between 0 and 1"),
    (dict(strength=-0.1), "strength=-0.1 must be a finite number >= 0"),
    (dict(strength=float("nan")), "strength=nan"),
    (dict(mask_image=Image.new("L", (128, 128), 0)), "mask_image is all black"),
    (dict(mask_blur=-2, mask_image=half_mask()), "mask_blur=-2"),
    (dict(masked_content="fill", mask_image=half_mask()), "masked_content='fill'"),
    (dict(overlay=True), "need a mask_image"),
    (dict(outpaint=(8, 0, 0, 0), mask_image=half_mask()), "outpaint needs an image"),
])
def test_edit_mistakes_are_one_line(pipe, scene, kwargs, match):
    with pytest.raises(FewstepError, match=match) as e:
        pipe(scene[1], image=scene[0], progress=False, **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(FewstepError, match="need an image to start from"):
        pipe(scene[1], mask_image=half_mask(), progress=False)


def test_sizes_follow_the_image_with_a_notice(pipe, scene):
    odd = scene[0].resize((134, 70))
    with pytest.warns(UserWarning, match="the image is 134x70: generating at 128x64"):
        out = pipe(scene[1], image=odd, strength=0.5, progress=False)
    assert out[0].size == (128, 64)
    with pytest.warns(UserWarning, match="resizing the mask to the image"):
        pipe(scene[1], image=scene[0], mask_image=half_mask(64), progress=False)
    assert pipe(scene[1], image=scene[0], width=64, height=96, progress=False)[0].size == (64, 96)


def test_a_strength_that_runs_no_step_returns_the_image(pipe, scene):
    with pytest.warns(UserWarning, match="strength 0.1 of 4 steps runs no step"):
        out = pipe(scene[1], image=scene[0], strength=0.1, progress=False, output_type="pt")
    want = torch.from_numpy(np.asarray(scene[0])).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(out[0], want, atol=1e-6)


def test_overlay_keeps_the_original_exactly_and_options_are_recorded(pipe, scene):
    src = np.asarray(scene[0])
    plain = pipe("a small yellow square", image=scene[0], mask_image=half_mask(), seed=2, progress=False)[0]
    over = pipe("a small yellow square", image=scene[0], mask_image=half_mask(), seed=2, overlay=True,
                progress=False)[0]
    assert np.array_equal(np.asarray(over)[:, 64:], src[:, 64:])
    assert not np.array_equal(np.asarray(plain)[:, 64:], src[:, 64:])  # the VAE round trip changes them a little
    assert np.array_equal(np.asarray(over)[:, :64], np.asarray(plain)[:, :64])
    text = pipe("x", image=scene[0], mask_image=half_mask(), mask_blur=4, invert_mask=True,
                masked_content="latent nothing", padding_mask_crop=8, progress=False)[0].info["parameters"]
    assert text.endswith("Denoising strength: 1, Mask blur: 4, Mask mode: Inpaint not masked, "
                         "Masked content: latent nothing, Inpaint area: Only masked, Masked area padding: 8")


def test_only_the_masked_region_is_worked_on_and_pasted_back(pipe, scene):
    small = Image.new("L", (128, 128), 0)
    small.paste(255, (80, 80, 100, 100))
    out = pipe("a small red circle", image=scene[0], mask_image=small, padding_mask_crop=4, seed=1,
               progress=False)[0]
    a, src = np.asarray(out).astype(int), np.asarray(scene[0]).astype(int)
    assert out.size == (128, 128)
    outside = np.ones((128, 128), bool)
    outside[76:104, 76:104] = False  # the crop (mask + padding): only there can pixels change
    assert np.array_equal(a[outside], src[outside]) and np.abs(a - src).max() > 30


@pytest.mark.parametrize("fill", ["original", "latent noise", "latent nothing"])
def test_masked_content_starts_differently(pipe, scene, fill):
    kw = dict(image=scene[0], mask_image=half_mask(), strength=0.7, seed=4, progress=False, output_type="pt")
    out = pipe(scene[1], masked_content=fill, **kw)
    if fill != "original":
        assert (out - pipe(scene[1], **kw)).abs().max() > 0.05


def test_outpaint_grows_the_canvas_and_keeps_the_original(pipe, scene):
    canvas, mask = outpaint_canvas(scene[0], left=30, top=8)
    assert canvas.size == (128 + 32, 128 + 8) and np.asarray(mask)[20, 0] == 255 and np.asarray(mask)[100, 100] == 0
    out = pipe(scene[1], image=scene[0], outpaint=(30, 0, 8, 0), seed=3, progress=False)[0]
    assert out.size == (160, 136)
    kept = np.asarray(out)[8 + 8:, 32 + 8:]  # the original, less the 8-pixel seam that is repainted too
    assert np.array_equal(kept, np.asarray(scene[0])[8:, 8:])
    with pytest.raises(FewstepError, match="give at least one of left"):
        pipe(scene[1], image=scene[0], outpaint=(0, 0, 0, 0), progress=False)


def test_image_i_of_an_edit_batch_is_its_seed_alone(pipe, scene):
    kw = dict(image=scene[0], strength=0.75, sampler="euler_a", steps=4, progress=False, output_type="pt")
    both = pipe(scene[1], seed=8, num_images=2, **kw)
    for i in range(2):
        assert (both[i] - pipe(scene[1], seed=8 + i, **kw)[0]).abs().max() <= 1e-4


def test_the_command_line_edits(tmp_path, scene, capsys):
    scene[0].save(tmp_path / "in.png")
    half_mask().save(tmp_path / "mask.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["generate", scene[1], "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--output",
                     str(tmp_path / "a.png"), "--quiet"]) == 0
        assert main(["generate", "a small red square", "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "--mask-blur", "2", "--inpaint-only-masked", "--output",
                     str(tmp_path / "b.png"), "--quiet"]) == 0
        assert main(["generate", scene[1], "--image", str(tmp_path / "in.png"), "--outpaint", "16,16,0,0",
                     "--output", str(tmp_path / "c.png"), "--quiet"]) == 0
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "a.png")
    assert "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 32" in read_parameters(tmp_path / "b.png")
    assert Image.open(tmp_path / "c.png").size == (160, 128)
    capsys.readouterr()
    for args, match in ((["--image", str(tmp_path / "nope.png")], "no such file"),
                        (["--outpaint", "1,2"], "four margins"), (["--mask", str(tmp_path / "mask.png")], "need an image")):
        assert main(["generate", scene[1], "--output", str(tmp_path / "x.png"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "x.png").exists()
