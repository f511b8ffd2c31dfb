"""LoRA: the files people share load in each layout (diffusers / PEFT, kohya / A1111 under diffusers' or the
LDM UNet's names, LoCon convolutions), give diffusers' images for the same file and scale
(`load_lora_weights` + `set_adapters`), stack, fuse and come off bit for bit, and bad files are one line.

Tolerance: the txt2img parity's, mean |difference| <= 1/255, max <= 4/255 (random LoRAs big enough that
the image moves by far more than that)."""

import numpy as np
import pytest
import torch

import fewstep
from fewstep.errors import FewstepError
from helpers.env import requires_shared
from helpers.lora import ldm_names, random_lora, write_kohya, write_peft

pytestmark = [requires_shared, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
PROMPT = "a red circle on the left and a small blue square"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("lora-pipes")
    return {f: make_pipeline(f, root) for f in ("sd1", "sd2-v", "sdxl")}


def generate(pipe, ref=None, scale=None):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    if ref is None:
        return np.asarray(pipe(PROMPT, steps=2, guidance=4.0, latents=latents, width=64, height=64,
                               progress=False)[0], dtype=np.int16)
    out = ref(PROMPT, num_inference_steps=2, guidance_scale=4.0, latents=latents.clone(), height=64, width=64,
              output_type="np").images[0]
    return np.round(out * 255).astype(np.int16)


def write(layout: str, path, pipe, seed=0):
    lora = random_lora(pipe.lora_modules(), seed=seed, convs=layout == "locon")
    sdxl = "text_encoder_2" in lora
    if layout == "peft":
        return write_peft(path, lora, {c: 8.0 for c in lora})  # alpha 8 over rank 4: the update doubled
    ldm = ldm_names(pipe.unet.cfg) if layout == "kohya-ldm" else None
    return write_kohya(path, lora, alpha=2.0, ldm=ldm, sdxl=sdxl)  # alpha 2 over rank 4: halved


@pytest.mark.parametrize("family,layout", [("sd1", "peft"), ("sd1", "kohya"), ("sd2-v", "kohya"), ("sdxl", "peft"),
                                           ("sdxl", "kohya-ldm"), ("sd1", "locon")])
def test_lora_images_are_diffusers(pipelines, tmp_path, family, layout):
    folder, ref = pipelines[family]
    pipe = fewstep.load(folder)
    plain = generate(pipe)
    path = write(layout, tmp_path / "lora.safetensors", pipe)
    assert pipe.load_lora(path, scale=0.8) == "lora"
    try:
        ref.load_lora_weights(str(path), adapter_name="x")
        ref.set_adapters(["x"], adapter_weights=[0.8])
        theirs, ours = generate(None, ref), generate(pipe)
    finally:
        ref.unload_lora_weights()
    diff = np.abs(ours - theirs)
    assert diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())
    assert np.abs(ours - plain).mean() > 2  # the LoRA did change the image (the parity bound is 1)


def test_stacked_loras_and_their_scales_are_diffusers(pipelines, tmp_path):
    folder, ref = pipelines["sd1"]
    pipe = fewstep.load(folder)
    a, b = write("peft", tmp_path / "a.safetensors", pipe, 1), write("kohya", tmp_path / "b.safetensors", pipe, 2)
    pipe.load_lora(a, scale=0.5)
    pipe.load_lora(b, name="second", scale=1.5)
    try:
        ref.load_lora_weights(str(a), adapter_name="a")
        ref.load_lora_weights(str(b), adapter_name="b")
        ref.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
        theirs = generate(None, ref)
    finally:
        ref.unload_lora_weights()
    assert np.abs(generate(pipe) - theirs).mean() <= 1.0
    assert pipe.adapters.scales() == {"a": 0.5, "second": 1.5}
    pipe.set_lora_scale("second", 0.0)
    single = generate(pipe)
    pipe.unload_lora("second")
    assert np.array_equal(generate(pipe), single)  # scale 0 is the LoRA's absence


def test_fuse_and_unfuse_and_unload_are_exact(pipelines, tmp_path):
    folder, _ = pipelines["sdxl"]
    pipe = fewstep.load(folder)
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoders[1].state_dict()}.items()}
    pipe.load_lora(write("kohya-ldm", tmp_path / "l.safetensors", pipe), scale=0.7)
    hooked = generate(pipe)
    pipe.fuse_lora()
    assert pipe.adapters.saved is not None and any(
        not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # the weights hold the update
    fused = generate(pipe)
    assert np.abs(fused - hooked).max() <= 2  # the same update, summed in another order
    with pytest.raises(FewstepError, match="unfuse_lora"):
        pipe.set_lora_scale("l", 1.0)
    pipe.unfuse_lora()
    assert np.array_equal(generate(pipe), hooked)
    pipe.unload_lora()
    after = {**pipe.unet.state_dict(), **pipe.text_encoders[1].state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert not pipe.adapters.hooks and not pipe.adapters.loras


def test_infotext_records_the_loras(pipelines, tmp_path):
    folder, _ = pipelines["sd1"]
    pipe = fewstep.load(folder)
    path = write("peft", tmp_path / "style.safetensors", pipe)
    pipe.load_lora(path)
    import hashlib
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    text = pipe(PROMPT, steps=1, width=64, height=64, progress=False)[0].info["parameters"]
    assert f'Lora hashes: "style: {digest}"' in text


def test_bad_loras_are_one_line_and_change_nothing(pipelines, tmp_path):
    folder, _ = pipelines["sd1"]
    pipe = fewstep.load(folder)
    xl = fewstep.load(pipelines["sdxl"][0])
    cases = [
        (write("peft", tmp_path / "xl.safetensors", xl), "text_encoder_2, which this pipeline does not have"),
        (tmp_path / "missing.safetensors", "no such LoRA file"),
        ((tmp_path / "bad.safetensors").write_bytes(b"not safetensors") and tmp_path / "bad.safetensors", "cannot read"),
    ]
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "lokr.safetensors"))
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(32, 4)}, str(tmp_path / "stray.safetensors"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "old.pt")
    cases += [(tmp_path / "lokr.safetensors", "LoKr adapter"), (tmp_path / "stray.safetensors", "1 of 1 LoRA layers match no"),
              (tmp_path / "old.pt", "is a pickle file")]
    before = generate(pipe)
    for path, match in cases:
        with pytest.raises(FewstepError, match=match) as e:
            pipe.load_lora(path)
        assert "\n" not in str(e.value)
    ok = write("peft", tmp_path / "ok.safetensors", pipe)
    for scale in (float("nan"), float("inf"), "1"):
        with pytest.raises(FewstepError, match="must be a finite number"):
            pipe.load_lora(ok, scale=scale)
    with pytest.raises(FewstepError, match="no LoRA named 'x'"):
        pipe.unload_lora("x")
    assert not pipe.adapters.loras and not pipe.adapters.hooks and np.array_equal(generate(pipe), before)


def test_the_command_line_stacks_loras(tmp_path, capsys):
    from fewstep.cli import main
    from fewstep.outputs import read_parameters
    pipe = fewstep.load()
    a = write("peft", tmp_path / "a.safetensors", pipe, 1)
    b = write("kohya", tmp_path / "b.safetensors", pipe, 2)
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--lora", f"{a}:0.5", "--lora", str(b), "--output", str(out),
                 "--quiet"]) == 0
    text = read_parameters(out)
    assert 'Lora hashes: "a: ' in text and ", b: " in text
    capsys.readouterr()
    assert main(["generate", "a red circle", "--lora", str(tmp_path / "nope.safetensors:0.5"), "--output",
                 str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such LoRA file" in err and not (tmp_path / "y.png").exists()


def test_lora_tags_in_the_prompt_load_for_the_call(tmp_path):
    pipe = fewstep.load()  # the built-in model
    write("peft", tmp_path / "style.safetensors", pipe, 3)
    kw = dict(seed=2, progress=False, output_type="pt")
    plain = pipe("a red circle", **kw)
    pipe.lora_dir = tmp_path
    tagged = pipe("a red circle <lora:style:0.7>", **kw)
    assert not pipe.adapters.loras  # loaded for the call only
    pipe.load_lora(tmp_path / "style.safetensors", scale=0.7)
    assert torch.equal(tagged, pipe("a red circle", **kw)) and not torch.equal(tagged, plain)
    assert torch.equal(pipe("a red circle <lora:style:0>", **kw), plain)  # a loaded one takes the tag's scale
    assert pipe.adapters.scales() == {"style": 0.7}  # and gets its own back
    pipe.unload_lora()
    for prompt, match in (("x <lora:nope:1>", "no nope.safetensors in"), ("x <hypernet:h:1>", "not this kind"),
                          (["a <lora:style:1>", "b"], "different LoRAs")):
        with pytest.raises(FewstepError, match=match):
            pipe(prompt, **kw)
    pipe.lora_dir = None
    with pytest.raises(FewstepError, match="needs a folder of LoRAs"):
        pipe("x <lora:style:1>", **kw)
    assert not pipe.adapters.loras and torch.equal(pipe("a red circle", **kw), plain)


@pytest.mark.parametrize("width,te2,fits", [(768, False, "SD 1.x"), (1024, False, "SD 2.x"), (2048, True, "SDXL")])
def test_inspect_a_lora_file(tmp_path, capsys, width, te2, fits):
    from safetensors.torch import save_file

    from fewstep.cli import main
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd = {f"{k}.lora_down.weight": torch.zeros(8, width), f"{k}.lora_up.weight": torch.zeros(640, 8),
          f"{k}.alpha": torch.tensor(4.0)}
    if te2:
        t = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
        sd.update({f"{t}.lora_down.weight": torch.zeros(8, 1280), f"{t}.lora_up.weight": torch.zeros(1280, 8)})
    save_file(sd, str(tmp_path / "x.safetensors"))
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"fits: {fits} (cross-attention reads {width}-wide text)" in out and "ranks: [8]" in out
    assert f"parameters: {8 * width + 640 * 8 + (2 * 8 * 1280 if te2 else 0)}" in out
    assert f"| unet | {k} | 8 | 4 | {width} -> 640 | {8 * width + 5120:,} |" in out
