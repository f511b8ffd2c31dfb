"""ControlNets give diffusers' images: the same tiny random pipeline and ControlNet, seed (a CPU generator, batch
of one), scheduler, steps and guidance make the same pixels as diffusers' StableDiffusion(XL)ControlNetPipeline,
its Img2Img and Inpaint pipelines, with one or two ControlNets, guess mode and guidance windows; the module's
outputs are diffusers' ControlNetModel's; an original single-file ControlNet (LDM keys) loads to the folder's
weights; bad inputs are one-line errors that leave the pipeline as it was.

Tolerance: the txt2img parity's, mean |difference| <= 1/255, max <= 4/255; module outputs to 1e-5."""

import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import fewstep
from fewstep.errors import FewstepError
from fewstep.loading.controlnet import ldm_modules
from fewstep.models.controlnet import ControlNet, ControlNetConfig
from helpers.env import requires_shared

pytestmark = [requires_shared, pytest.mark.usefixtures("one_thread")]

PROMPT = "a red circle on the left and a small blue square"
SIZE = 64
CLASSES = {("sd1", "txt2img"): diffusers.StableDiffusionControlNetPipeline,
           ("sd1", "img2img"): diffusers.StableDiffusionControlNetImg2ImgPipeline,
           ("sd1", "inpaint"): diffusers.StableDiffusionControlNetInpaintPipeline,
           ("sd1-inpaint", "inpaint"): diffusers.StableDiffusionControlNetInpaintPipeline,
           ("sdxl", "txt2img"): diffusers.StableDiffusionXLControlNetPipeline,
           ("sdxl", "img2img"): diffusers.StableDiffusionXLControlNetImg2ImgPipeline}


def make_controlnet(unet, seed: int) -> diffusers.ControlNetModel:
    """A ControlNet from the UNet (diffusers' `from_unet`) whose zero convolutions and embedding output are
    random instead of zero, so that it steers."""
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # steers, unsaturated
    return net.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (pipeline folder, diffusers pipeline, [ControlNet folders], [diffusers ControlNets])}."""
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("controlnet")
    out = {}
    for family in ("sd1", "sdxl", "sd1-inpaint"):
        folder, pipe = make_pipeline(family, root)
        unet = pipe.unet
        if family.endswith("inpaint"):  # a ControlNet reads the 4 latent channels of a 9-channel UNet
            unet = diffusers.UNet2DConditionModel.from_config({**unet.config, "in_channels": 4})
        nets = [make_controlnet(unet, seed) for seed in (1, 2)]
        paths = []
        for i, net in enumerate(nets):
            paths.append(root / f"{family}-controlnet-{i}")
            net.save_pretrained(paths[-1], safe_serialization=True)
        out[family] = (folder, pipe, paths, nets)
    return out


def control_image(size: int = SIZE, shift: int = 0) -> Image.Image:
    """An edge-map-like picture: white shapes on black."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6 + shift, 6, 34 + shift, 34), outline=(255, 255, 255), width=3)
    draw.rectangle((30, 28 + shift, 58, 56), outline=(255, 255, 255), width=2)
    return image


def source(size: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8))


def mask(size: int = SIZE) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((30, 10, 62, 50), fill=255)
    return m


def reference(tiny, family: str, task: str, count: int = 1):
    folder, ref, _, nets = tiny[family]
    cls = CLASSES[(family, task)]
    keys = set(cls._get_signature_keys(cls)[0])
    pipe = cls(**{k: v for k, v in ref.components.items() if k in keys},
               controlnet=nets[0] if count == 1 else nets[:count])
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, theirs) -> np.ndarray:
    a, b = np.asarray(ours[0], dtype=np.int16), np.round(theirs[0] * 255).astype(np.int16)
    diff = np.abs(a - b)
    assert a.shape == b.shape and b.std() > 5
    assert diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())
    return a


def ours(tiny, family: str, count: int = 1):
    folder, _, paths, _ = tiny[family]
    return fewstep.load(folder, controlnet=paths[0] if count == 1 else paths[:count])


# ---- the module ----
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("guess", [False, True])
def test_the_module_is_diffusers_controlnet(tiny, family, guess):
    net = tiny[family][3][0]
    mine = ControlNet(ControlNetConfig.from_diffusers(dict(net.config)))
    mine.load_state_dict(net.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    ctx = torch.randn(1, 7, net.config.cross_attention_dim, generator=g)
    extra = {}
    if family == "sdxl":
        extra = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        d1, m1 = net(x, torch.tensor(601.0), ctx, hint, conditioning_scale=0.7, guess_mode=guess,
                     added_cond_kwargs=extra or None, return_dict=False)
        d2, m2 = mine(x, torch.tensor(601.0), ctx, hint, 0.7, guess, extra.get("text_embeds"), extra.get("time_ids"))
    assert len(d1) == len(d2) == 6 and m1.abs().mean() > 0.01
    for a, b in zip([*d1, m1], [*d2, m2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- pipelines ----
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("guidance,guess", [(0.0, False), (5.0, False), (5.0, True)])
def test_text_to_image_is_diffusers(tiny, family, guidance, guess):
    kw = dict(controlnet_conditioning_scale=0.8, guess_mode=guess)
    theirs = reference(tiny, family, "txt2img")(PROMPT, image=control_image(), num_inference_steps=4,
                                               guidance_scale=guidance, height=SIZE, width=SIZE, output_type="np",
                                               generator=torch.Generator().manual_seed(3), **kw).images
    pipe = ours(tiny, family)
    mine = compare(pipe(PROMPT, control_image=control_image(), steps=4, guidance=guidance, sampler="euler",
                        seed=3, progress=False, **kw), theirs)
    pipe.unload_controlnet()
    plain = np.asarray(pipe(PROMPT, steps=4, guidance=guidance, sampler="euler", seed=3, progress=False)[0], np.int16)
    assert np.abs(mine - plain).mean() > 3  # the ControlNet steers


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_controlnets_with_guidance_windows_are_diffusers(tiny, family):
    kw = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
              control_guidance_end=[0.5, 1.0])
    images = [control_image(), control_image(shift=8)]
    theirs = reference(tiny, family, "txt2img", 2)(PROMPT, image=images, num_inference_steps=4, guidance_scale=5.0,
                                                  height=SIZE, width=SIZE, output_type="np",
                                                  generator=torch.Generator().manual_seed(4), **kw).images
    compare(ours(tiny, family, 2)(PROMPT, control_image=images, steps=4, guidance=5.0, sampler="euler", seed=4,
                                  progress=False, **kw), theirs)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_image_to_image_is_diffusers(tiny, family):
    kw = dict(controlnet_conditioning_scale=0.6, control_guidance_end=0.7)  # diffusers' image-to-image default: 0.8
    theirs = reference(tiny, family, "img2img")(PROMPT, image=source(), control_image=control_image(), strength=0.7,
                                               num_inference_steps=5, guidance_scale=5.0, height=SIZE, width=SIZE,
                                               output_type="np", generator=torch.Generator().manual_seed(5), **kw).images
    compare(ours(tiny, family)(PROMPT, image=source(), control_image=control_image(), strength=0.7, steps=5,
                               guidance=5.0, sampler="euler", seed=5, progress=False, **kw), theirs)


@pytest.mark.parametrize("family,strength", [("sd1", 1.0), ("sd1", 0.75), ("sd1-inpaint", 1.0)])
def test_inpainting_is_diffusers(tiny, family, strength):
    kw = dict(controlnet_conditioning_scale=0.9)  # diffusers' inpainting default is 0.5, fewstep's always 1
    theirs = reference(tiny, family, "inpaint")(PROMPT, image=source(), mask_image=mask(), control_image=control_image(),
                                               strength=strength, num_inference_steps=4, guidance_scale=5.0,
                                               height=SIZE, width=SIZE, output_type="np",
                                               generator=torch.Generator().manual_seed(6), **kw).images
    compare(ours(tiny, family)(PROMPT, image=source(), mask_image=mask(), control_image=control_image(),
                               strength=strength, steps=4, guidance=5.0, sampler="euler", seed=6, progress=False,
                               **kw), theirs)


# ---- original single files ----
def to_ldm(folder, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    """A diffusers ControlNet folder written back in the original (lllyasviel) key layout, by inverting
    fewstep's table; `test_the_ldm_writer_is_honest` checks it with diffusers' own converter."""
    from fewstep.configs import read_json
    cfg = ControlNetConfig.from_diffusers(read_json(folder / "config.json"))
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    hints = {f"input_hint_block.{2 * i}.weight": () for i in range(2 * len(cfg.conditioning_embedding_out_channels))}
    out = {}
    for old, (new, table) in ldm_modules(cfg, hints).items():
        for param, targets in table.items():
            if f"{new}.{targets[0][0]}" in sd:
                out[f"{prefix}{old}.{param}"] = sd[f"{new}.{targets[0][0]}"].contiguous()
    assert len(out) == len(sd)
    return out


def test_the_ldm_writer_is_honest(tiny, tmp_path):
    _, _, paths, nets = tiny["sd1"]
    save_file(to_ldm(paths[0]), tmp_path / "control_v11p_tiny.safetensors")
    theirs = diffusers.ControlNetModel.from_single_file(tmp_path / "control_v11p_tiny.safetensors", config=str(paths[0]))
    want = nets[0].state_dict()
    assert theirs.state_dict().keys() == want.keys()
    assert all(torch.equal(theirs.state_dict()[k], want[k]) for k in want)


@pytest.mark.parametrize("family,prefix", [("sd1", "control_model."), ("sd1", ""), ("sdxl", "control_model.")])
def test_a_single_file_controlnet_is_the_folder(tiny, tmp_path, family, prefix):
    folder, _, paths, _ = tiny[family]
    path = tmp_path / "control.safetensors"
    save_file(to_ldm(paths[0], prefix), path)
    kw = dict(control_image=control_image(), steps=3, guidance=5.0, sampler="euler", seed=7, output_type="pt",
              progress=False)
    a = fewstep.load(folder, controlnet=path)(PROMPT, **kw)
    b = fewstep.load(folder, controlnet=paths[0])(PROMPT, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- bad input ----
def test_a_control_image_of_another_size_is_resized_with_a_notice(tiny):
    pipe = ours(tiny, "sd1")
    kw = dict(steps=2, guidance=0.0, sampler="euler", seed=1, width=SIZE, height=SIZE, output_type="pt", progress=False)
    with pytest.warns(UserWarning, match="control image 0 is 96x80: resized to 64x64"):
        a = pipe(PROMPT, control_image=control_image(96).resize((96, 80)), **kw)
    b = pipe(PROMPT, control_image=control_image(96).resize((96, 80)).resize((SIZE, SIZE), Image.LANCZOS), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipe(PROMPT, control_image=control_image(), **{**kw, "width": None, "height": None}).shape == (
            1, 3, SIZE, SIZE)  # the size comes from the control image, without a notice


def test_a_controlnet_for_another_base_is_refused_and_nothing_is_kept(tiny):
    pipe = fewstep.load(tiny["sd1"][0], controlnet=tiny["sd1"][2][0])
    with pytest.raises(FewstepError, match=r"^ControlNet sdxl-controlnet-0 is for another base model") as e:
        pipe.load_controlnet([tiny["sd1"][2][1], tiny["sdxl"][2][0]])
    assert "\n" not in str(e.value) and len(pipe.controls) == 1


def test_a_single_file_for_another_base_is_refused(tiny, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file(to_ldm(tiny["sdxl"][2][0]), path)
    with pytest.raises(FewstepError, match=r"^ControlNet xl.safetensors is for another base model: skip widths"):
        fewstep.load(tiny["sd1"][0], controlnet=path)


@pytest.mark.parametrize("kw,message", [
    (dict(control_image=[control_image(), control_image()]), r"2 control image\(s\) for 1 ControlNet"),
    (dict(control_image=control_image(), controlnet_conditioning_scale=[1.0, 0.5]),
     r"controlnet_conditioning_scale has 2 entries for 1 control image"),
    (dict(control_image=control_image(), control_guidance_start=0.6, control_guidance_end=0.5), r"0 <= start < end"),
    (dict(control_image=[]), "empty list"),
    (dict(control_image="nope.png"), "control_image nope.png: no such file"),
    (dict(), "give control_image"),
    (dict(control_image=control_image(), guess_mode="yes"), "guess_mode='yes' must be True or False"),
])
def test_mismatched_or_bad_control_arguments_are_one_line_errors(tiny, kw, message):
    pipe = ours(tiny, "sd1")
    with pytest.raises(FewstepError, match=message) as e:
        pipe(PROMPT, steps=1, progress=False, **kw)
    assert "\n" not in str(e.value)


def test_a_control_image_without_a_controlnet_is_refused(tiny):
    with pytest.raises(FewstepError, match="control_image needs a ControlNet"):
        fewstep.load(tiny["sd1"][0])(PROMPT, control_image=control_image(), steps=1, progress=False)


@pytest.mark.parametrize("content,message", [
    (b"not a safetensors file", "cannot read"),
    ({"lora_controlnet": torch.zeros(1), "input_blocks.1.0.in_layers.2.up": torch.zeros(4, 2)}, "control-LoRA"),
    ({"controlnet_cond_embedding.conv_in.weight": torch.zeros(8, 3, 3, 3)}, "without its config.json"),
    ({"adapter.body.0.resnets.0.block1.weight": torch.zeros(4, 4, 3, 3)}, "T2I-Adapter"),
    ({"something.else": torch.zeros(1)}, "is not a ControlNet"),
])
def test_corrupt_or_unsupported_files_are_one_line_errors(tiny, tmp_path, content, message):
    path = tmp_path / "cn.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, path)
    pipe = fewstep.load(tiny["sd1"][0])
    with pytest.raises(FewstepError, match=message) as e:
        pipe.load_controlnet(path)
    assert "\n" not in str(e.value) and pipe.controls == []


def test_a_truncated_single_file_is_refused(tiny, tmp_path):
    sd = to_ldm(tiny["sd1"][2][0])
    sd.pop("control_model.middle_block_out.0.weight")
    save_file(sd, tmp_path / "cut.safetensors")
    with pytest.raises(FewstepError, match=r"1 missing keys: controlnet_mid_block.weight"):
        fewstep.load(tiny["sd1"][0], controlnet=tmp_path / "cut.safetensors")


# ---- fewstep inspect ----
def test_inspect_shows_a_controlnet_beside_its_unet(tiny):
    from fewstep.inspect.controlnet import is_control, report, rows
    folder, ref, paths, nets = tiny["sdxl"]
    assert is_control(paths[0]) and not is_control(folder)
    what, parts = rows(paths[0])
    by = {r["part"]: r for r in parts}
    assert sum(r["parameters"] or 0 for r in parts) == sum(p.numel() for p in nets[0].parameters())
    assert sum(r["unet"] or 0 for r in parts) == sum(p.numel() for p in ref.unet.parameters())
    for i, block in enumerate(ref.unet.down_blocks):  # the copied blocks: the UNet's own, parameter for parameter
        assert by[f"down_blocks.{i}"]["parameters"] == by[f"down_blocks.{i}"]["unet"] == sum(
            p.numel() for p in block.parameters())
    assert by["controlnet_cond_embedding"]["unet"] is None and by["up_blocks.0"]["parameters"] is None
    assert "cross_attention_dim 64, SDXL add-embedding" in what
    text = report(paths[0])
    assert f"{sum(p.numel() for p in nets[0].parameters()):,}" in text and "controlnet_mid_block" in text
