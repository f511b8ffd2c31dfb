"""T2I-Adapters give diffusers' images: full and light adapters on an SD 1.x-layout UNet, the XL adapter on SDXL,
made by the same tiny random pipeline and adapter with the same seed (a CPU generator, batch of one), scheduler,
steps and guidance as diffusers' StableDiffusion(XL)AdapterPipeline, with its scale and conditioning factor; the
module's features are diffusers' T2IAdapter's; an adapter for another UNet is a one-line error.

Tolerance: the txt2img parity's, mean |difference| <= 1/255, max <= 4/255; features to 1e-5."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import fewstep
from fewstep.errors import FewstepError
from fewstep.models.t2i_adapter import AdapterConfig, T2IAdapter
from helpers.env import requires_shared

pytestmark = [requires_shared, pytest.mark.usefixtures("one_thread")]

PROMPT = "a red circle on the left and a small blue square"
SIZE = 64
# (family, adapter_type, channels, downscale_factor, control image mode): each fits its UNet's down path
ADAPTERS = {"full": ("sd1-cross-first", "full_adapter", (32, 64), 8, "RGB"),
            "light": ("sd1-cross-first", "light_adapter", (32, 64), 8, "RGB"),
            "grey": ("sd1-cross-first", "full_adapter", (32, 64), 8, "L"),
            "xl": ("sdxl", "full_adapter_xl", (32, 64), 16, "RGB")}


def make_adapter(kind: str, seed: int) -> diffusers.T2IAdapter:
    _, adapter_type, channels, factor, mode = ADAPTERS[kind]
    torch.manual_seed(seed)
    adapter = diffusers.T2IAdapter(in_channels=1 if mode == "L" else 3, channels=list(channels), num_res_blocks=2,
                                   downscale_factor=factor, adapter_type=adapter_type)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if adapter_type == "light_adapter" else 0.1))
    return adapter.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (pipeline folder, diffusers pipeline)} and {kind: (adapter folder, diffusers adapter)}. The SD 1.x
    layout puts attention first, as SD 1.5 does (the tiny sd1 pipeline of helpers.tiny has it last)."""
    from helpers.tiny import UNET, make_pipeline, randomize_norms
    root = tmp_path_factory.mktemp("t2i")
    _, sd1 = make_pipeline("sd1", root)
    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel(**{**UNET, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                                             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
                                          cross_attention_dim=32, attention_head_dim=2)
    pipe = diffusers.StableDiffusionPipeline(**{**sd1.components, "unet": randomize_norms(unet, 8)})
    pipe.save_pretrained(root / "sd1-cross-first", safe_serialization=True)
    families = {"sd1-cross-first": (root / "sd1-cross-first", pipe), "sdxl": make_pipeline("sdxl", root)}
    adapters = {}
    for kind in ADAPTERS:
        adapters[kind] = (root / f"adapter-{kind}", make_adapter(kind, 3))
        adapters[kind][1].save_pretrained(adapters[kind][0], safe_serialization=True)
    return families, adapters


def control_image(mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 34, 34), outline=(255, 200, 255), width=3)
    draw.rectangle((30, 28, 58, 56), outline=(120, 255, 255), width=2)
    return image.convert(mode)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_the_module_is_diffusers_t2i_adapter(tiny, kind):
    _, adapters = tiny
    ref = adapters[kind][1]
    mine = T2IAdapter(AdapterConfig.from_diffusers(dict(ref.config)))
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, ref.config.in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(x), mine(x)
    assert len(want) == len(got) >= 2
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,guidance,scale,factor", [  # diffusers' SD 1.x adapter pipeline has no factor
    *[(kind, g, s, 1.0) for kind in ADAPTERS for g, s in ((0.0, 1.0), (5.0, 0.7))], ("xl", 5.0, 0.8, 0.5)])
def test_text_to_image_is_diffusers(tiny, kind, guidance, scale, factor):
    families, adapters = tiny
    family, *_, mode = ADAPTERS[kind]
    folder, ref = families[family]
    cls = diffusers.StableDiffusionXLAdapterPipeline if family == "sdxl" else diffusers.StableDiffusionAdapterPipeline
    keys = set(cls._get_signature_keys(cls)[0])
    pipe = cls(**{k: v for k, v in ref.components.items() if k in keys}, adapter=adapters[kind][1])
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, image=control_image(mode), num_inference_steps=4, guidance_scale=guidance, height=SIZE,
                  width=SIZE, adapter_conditioning_scale=scale, output_type="np",
                  generator=torch.Generator().manual_seed(3), **({"adapter_conditioning_factor": factor}
                                                                  if family == "sdxl" else {})).images
    ours = fewstep.load(folder, controlnet=adapters[kind][0])
    kw = dict(steps=4, guidance=guidance, sampler="euler", seed=3, progress=False)
    mine = np.asarray(ours(PROMPT, control_image=control_image(mode), controlnet_conditioning_scale=scale,
                           control_guidance_end=factor, **kw)[0], np.int16)
    b = np.round(theirs[0] * 255).astype(np.int16)
    diff = np.abs(mine - b)
    assert b.std() > 5 and diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())
    ours.unload_controlnet()
    plain = np.asarray(ours(PROMPT, width=SIZE, height=SIZE, **kw)[0], np.int16)
    assert np.abs(mine - plain).mean() > 2, np.abs(mine - plain).mean()  # the adapter steers


def test_an_adapter_for_another_unet_is_refused(tiny):
    families, adapters = tiny
    pipe = fewstep.load(families["sdxl"][0])
    with pytest.raises(FewstepError, match=r"^T2I-Adapter adapter-full is for another base model: its features") as e:
        pipe.load_controlnet([adapters["xl"][0], adapters["full"][0]])
    assert "\n" not in str(e.value) and pipe.controls == []


def test_an_adapter_and_a_controlnet_steer_together(tiny, tmp_path):
    """Both kinds at once (diffusers has no such pipeline): each alone is checked above; together the result
    differs from either alone, and a scale of 0 for one gives the other alone, exactly."""
    families, adapters = tiny
    folder, ref = families["sd1-cross-first"]
    net = diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.normal_(0, 0.1)
    net.save_pretrained(tmp_path / "cn")
    pipe = fewstep.load(folder, controlnet=[adapters["full"][0], tmp_path / "cn"])
    kw = dict(control_image=[control_image(), control_image()], steps=3, guidance=0.0, sampler="euler", seed=2,
              output_type="pt", progress=False)
    both, no_net = pipe(PROMPT, **kw), pipe(PROMPT, controlnet_conditioning_scale=[1.0, 0.0], **kw)
    pipe.controls.pop()
    alone = pipe(PROMPT, **{**kw, "control_image": control_image()})
    torch.testing.assert_close(no_net, alone, rtol=0, atol=0)
    assert (both - alone).abs().mean() > 0.01


@pytest.mark.parametrize("kind", ["light", "xl"])
def test_inspect_shows_an_adapter_and_its_features(tiny, kind):
    from fewstep.inspect.controlnet import report, rows
    _, adapters = tiny
    what, parts = rows(adapters[kind][0])
    assert sum(r["parameters"] for r in parts) == sum(p.numel() for p in adapters[kind][1].parameters())
    assert what.endswith({"light": "32@/8, 64@/16, 64@/32", "xl": "32@/16, 64@/16"}[kind])
    assert f"{sum(r['parameters'] for r in parts):,}" in report(adapters[kind][0])
