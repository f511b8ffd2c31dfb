"""`fewstep inspect`: exact parameter counts of the real architectures (published figures), FLOPs
against `torch.utils.flop_counter.FlopCounterMode` on the same modules (meta tensors, within 1%), the
SD-Turbo structure answers at 512 (resamplers, skips, attention lengths), every output format, the
SVG diagram, --compare, and the path route (configs folders, single files, TAESD files).

Everything runs on the meta device: no weights, no memory; a full-size report takes a few seconds.
"""

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fewstep.inspect.families import BUILTINS, SDXS_UNET, family
from fewstep.cli import main
from fewstep.configs import CLIPTextConfig, UNetConfig, VAEConfig, read_json
from fewstep.errors import FewstepError
from fewstep.inspect.measure import inspect_model
from fewstep.inspect.compare import compare, render_compare
from fewstep.inspect.report import render, rows
from fewstep.inspect.svg import unet_html, unet_svg
from helpers.env import CONFIGS, ROOT, SHARED, requires_shared

DOCS = ROOT / "docs"
_cache = {}


def report(name: str, resolution: int | None = None):
    key = (name, resolution)
    if key not in _cache:
        _cache[key] = inspect_model(name, resolution)
    return _cache[key]


def block_params(component, prefix: str) -> int:
    return sum(b.params for b in component.blocks if b.name == prefix or b.name.startswith(prefix + "."))


# ---- exact parameter counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("model,component,prefix,expected", [
    ("sd15", "unet", "", 859_520_964),
    ("sd21-base", "unet", "", 865_910_724),
    ("sd-turbo", "unet", "", 865_910_724),
    ("sdxl-base", "unet", "", 2_567_463_684),
    ("sdxs-512", "unet", "", 315_746_244),
    ("sd-turbo", "vae_encoder", "encoder", 34_163_592),
    ("sd-turbo", "vae_encoder", "quant_conv", 72),
    ("sd-turbo", "vae_decoder", "decoder", 49_490_179),
    ("sd-turbo", "vae_decoder", "post_quant_conv", 20),
    ("taesd", "taesd_encoder", "", 1_222_532),
    ("taesd", "taesd_decoder", "", 1_222_531),
    ("sdxs-512", "taesd_decoder", "", 1_222_531),
    ("sd15", "text_encoder", "", 123_060_480),  # CLIP ViT-L/14 text model
    ("sd-turbo", "text_encoder", "", 340_387_840),  # OpenCLIP-H, 23 of 24 layers as SD 2.x runs it
    ("sdxl-base", "text_encoder_2", "", 694_659_840),  # OpenCLIP-bigG with text_projection
])
def test_parameter_counts(model, component, prefix, expected):
    c = report(model).component(component)
    assert (block_params(c, prefix) if prefix else c.params) == expected
    assert sum(layer.params for layer in c.layers) == c.params


def test_sd_autoencoder_total():
    r = report("sd-turbo")
    assert r.component("vae_encoder").params + r.component("vae_decoder").params == 83_653_863


def test_sdxs_keeps_self_attention():
    """Only the published layout (attn1 = self-attention) gives 315,746,244; attn1 over the text does not."""
    from fewstep.models.unet import UNet
    from fewstep.loading.weights import no_init

    def count(cfg):
        with torch.device("meta"), no_init():
            return sum(p.numel() for p in UNet(cfg).parameters())
    assert count(SDXS_UNET) == 315_746_244
    assert count(replace(SDXS_UNET, only_cross_attention=(False, True, True))) == 312_305_604


# ---- FLOPs against FlopCounterMode ----------------------------------------------------------------------

def counted(run) -> int:
    """FLOPs of the model's math: upsampling convs unfolded, as inspect reports them."""
    from fewstep.models.layers import unfolded
    with FlopCounterMode(display=False) as fc, torch.no_grad(), unfolded():
        run()
    return fc.get_total_flops()


def meta_unet(cfg: UNetConfig, res: int, dtype=torch.float16):
    from fewstep.models.unet import UNet
    from fewstep.loading.weights import no_init
    with torch.device("meta"), no_init():
        m = UNet(cfg).to(dtype)
    h = res // 8
    kw = dict(x=torch.empty(1, 4, h, h, device="meta", dtype=dtype), t=torch.empty(1, device="meta"),
              context=torch.empty(1, 77, cfg.cross_attention_dim, device="meta", dtype=dtype))
    if cfg.addition_time_embed_dim:
        kw.update(text_embeds=torch.empty(1, 1280, device="meta", dtype=dtype),
                  time_ids=torch.empty(1, 6, device="meta"))
    return lambda: m(**kw)


@pytest.mark.parametrize("model,res,published", [("sd-turbo", 512, 804.26e9), ("sdxs-512", 512, None),
                                                 ("sdxl-base", 1024, 6761.2e9)])
def test_unet_flops_match_flop_counter(model, res, published):
    ours = report(model, res).component("unet").flops
    reference = counted(meta_unet(BUILTINS[model].unet, res))
    print(f"{model} UNet at {res}: inspect {ours / 1e9:.3f} GFLOPs, FlopCounterMode {reference / 1e9:.3f}")
    assert abs(ours - reference) <= 0.01 * reference
    if published:
        assert abs(ours - published) <= 0.001 * published


def test_autoencoder_and_text_flops_match_flop_counter():
    from fewstep.models.clip import CLIPTextModel
    from fewstep.models.tae import TinyAutoencoder
    from fewstep.models.vae import AutoencoderKL
    with torch.device("meta"):
        vae, tae = AutoencoderKL(VAEConfig()), TinyAutoencoder(BUILTINS["taesd"].tae)
        clip = CLIPTextModel(BUILTINS["sd-turbo"].text[0])
        z, x = torch.empty(1, 4, 64, 64), torch.empty(1, 3, 512, 512)
        ids = torch.zeros(1, 77, dtype=torch.long)
        checks = [("sd-turbo", "vae_decoder", lambda: vae.decode(z)),
                  ("sd-turbo", "vae_encoder", lambda: vae.encode(x)),
                  ("sd-turbo", "text_encoder", lambda: clip(ids)),
                  ("taesd", "taesd_decoder", lambda: tae.decode(z)),
                  ("taesd", "taesd_encoder", lambda: tae.encode(x))]
        for model, component, run in checks:
            ours, reference = report(model).component(component).flops, counted(run)
            print(f"{model} {component} at 512: inspect {ours / 1e9:.3f} GFLOPs, FlopCounterMode {reference / 1e9:.3f}")
            assert abs(ours - reference) <= 0.01 * reference, component
    assert abs(report("sd-turbo").component("vae_decoder").flops - 2515e9) < 0.001 * 2515e9


def test_batch_and_dtype_scale():
    one, two = inspect_model("taesd", 256, batch=2, dtype="fp32"), report("taesd", 256)
    d1, d2 = one.component("taesd_decoder"), two.component("taesd_decoder")
    assert d1.flops == 2 * d2.flops and one.totals.decoder_flops == two.totals.decoder_flops
    assert d1.layers[0].activation_bytes == 2 * 2 * d2.layers[0].activation_bytes  # batch 2, 4 bytes vs 2
    assert d1.layers[0].output_shape == (2, 64, 32, 32)


def test_totals_per_step_and_image():
    t = report("sd-turbo").totals
    assert t.unet_step_flops_cfg == 2 * t.unet_step_flops
    assert t.image_flops == t.text_flops + t.unet_step_flops + t.decoder_flops
    assert t.image_flops_cfg == 2 * t.text_flops + 2 * t.unet_step_flops + t.decoder_flops
    four = inspect_model("sdxs-512", steps=4).totals
    assert four.image_flops == four.text_flops + 4 * four.unet_step_flops + four.decoder_flops


# ---- the SD-Turbo answers at 512 ---------------------------------------------------------------------------

def test_sd_turbo_resamplers():
    u = report("sd-turbo").unet
    down = [r for r in u.resamplers if r.kind == "down"]
    assert [(r.kernel, r.stride, r.padding) for r in down] == [((3, 3), (2, 2), (1, 1))] * 3
    assert [r.input_shape[-1] for r in down] == [64, 32, 16] and [r.output_shape[-1] for r in down] == [32, 16, 8]
    assert [r.output_shape[1] for r in down] == [320, 640, 1280]
    up = [r for r in u.resamplers if r.kind == "up"]
    assert [r.name for r in up] == [f"up_blocks.{i}.upsamplers.0" for i in range(3)]
    assert all(r.method.startswith("nearest x2") and (r.kernel, r.stride, r.padding) == ((3, 3), (1, 1), (1, 1))
               for r in up)
    assert [r.output_shape for r in up] == [(1, 1280, 16, 16), (1, 1280, 32, 32), (1, 640, 64, 64)]


def test_sd_turbo_skips():
    skips = report("sd-turbo").unet.skips
    assert [s.target for s in skips] == [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]
    assert [s.skip_channels for s in skips] == [1280] * 5 + [640] * 3 + [320] * 4
    assert [s.total_channels for s in skips] == [2560] * 5 + [1920, 1920, 1280, 960, 960, 640, 640]
    assert skips[0].source == "down_blocks.3.resnets.1" and skips[-1].source == "conv_in"
    assert skips[2].source == "down_blocks.2.downsamplers.0"
    assert all(s.x_channels + s.skip_channels == s.total_channels for s in skips)


def test_sd_turbo_attention_lengths():
    sites = report("sd-turbo").unet.attention
    self_len = {a.block: a.q_len for a in sites if a.kind == "self" and a.kv_len == a.q_len}
    assert self_len == {"down_blocks.0": 4096, "down_blocks.1": 1024, "down_blocks.2": 256, "mid_block": 64,
                        "up_blocks.1": 256, "up_blocks.2": 1024, "up_blocks.3": 4096}
    cross = [a for a in sites if a.kind == "cross"]
    assert {a.kv_len for a in cross} == {77} and sorted({a.q_len for a in cross}) == [64, 256, 1024, 4096]
    assert {(a.block, a.heads, a.head_dim) for a in cross} >= {("down_blocks.0", 5, 64), ("mid_block", 20, 64)}


def test_sd_turbo_answers_in_the_table():
    text = render(report("sd-turbo"), "table", depth=2)
    assert re.search(r"down_blocks\.2\.downsamplers\.0\s+3x3 conv, stride 2\s+3x3\s+2\s+1\s+"
                     r"1x1280x16x16\s+1x1280x8x8", text)
    assert re.search(r"up_blocks\.2\.upsamplers\.0\s+nearest x2, then 3x3 conv\s+3x3\s+1\s+1\s+"
                     r"1x640x32x32\s+1x640x64x64", text)
    assert re.search(r"conv_in\s+up_blocks\.3\.resnets\.2\s+1x320x64x64\s+320\s+320\s+640", text)
    assert re.search(r"up_blocks\.3\s+cross\s+5\s+64\s+4096\s+77\s+3", text)


# ---- formats and --depth -------------------------------------------------------------------------------------

def test_depth_collapses_the_name_hierarchy():
    unet = report("sd-turbo").component("unet")
    top = rows(unet, 1)
    assert [r.name for r in top] == ["time_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks",
                                     "conv_norm_out", "conv_out"]
    assert sum(r.params for r in top) == unet.params and sum(r.flops for r in top) == unet.flops
    assert top[2].input_shape == (1, 320, 64, 64) and top[2].output_shape == (1, 1280, 8, 8)
    two = rows(unet, 2)
    assert max(r.depth for r in two) == 2 and "down_blocks.0" in [r.name for r in two]
    full = rows(unet)
    assert len(full) == sum(m.type != "ModuleList" for m in unet.layers) > len(two) > len(top)
    assert sum(r.own_params for r in full) == unet.params


@pytest.mark.parametrize("fmt", ["table", "md", "json", "csv"])
def test_every_format_renders(fmt):
    r = report("sdxs-512")
    text, short = render(r, fmt), render(r, fmt, depth=2)
    assert len(short) < len(text)
    if fmt == "json":
        d = json.loads(text)
        assert [c["params"] for c in d["components"]][0] == 315_746_244
        assert d["unet"]["skips"][0]["target"] == "up_blocks.0.resnets.0"
        assert all(row["depth"] <= 2 for c in json.loads(short)["components"] for row in c["layers"])
    elif fmt == "csv":
        table = list(csv.DictReader(io.StringIO(text)))
        unet = [row for row in table if row["component"] == "unet"]
        assert sum(int(row["own_params"]) for row in unet) == 315_746_244
        attn = next(row for row in unet if row["name"] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2")
        assert (attn["attention"], attn["heads"], attn["q_len"], attn["kv_len"]) == ("cross", "8", "1024", "77")
    else:
        assert "315,746,244" in text and "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in text
        assert ("| name | type |" in text) == (fmt == "md")


# ---- the diagram -------------------------------------------------------------------------------------------

def svg_texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]


@pytest.mark.parametrize("model", ["sd-turbo", "sdxs-512", "sdxl-base"])
def test_svg_names_every_block(model):
    r = report(model)
    texts = svg_texts(unet_svg(r))
    for b in r.component("unet").blocks:
        assert any(re.search(rf"(^|[\s+→]){re.escape(b.name)}($|[\s:+→])", t) for t in texts), b.name
    assert sum("self-attention" == t for t in texts) == sum("self" in b.attention for b in r.unet.blocks)
    assert ("no mid block" in texts) == (model == "sdxs-512")
    assert "<svg" in unet_html(r) and unet_html(r).startswith("<!doctype html>")


def test_docs_example_is_current():
    """docs/inspect-sd-turbo.svg is `fewstep inspect sd-turbo --diagram docs/inspect-sd-turbo.svg`."""
    assert (DOCS / "inspect-sd-turbo.svg").read_text() == unet_svg(report("sd-turbo"))


# ---- --compare -----------------------------------------------------------------------------------------------

def test_compare_sd_turbo_with_sdxs():
    c = compare(report("sd-turbo"), report("sdxs-512"))
    unet = next(x for x in c.components if x.role == "unet")
    removed = [b.a for b in unet.blocks if b.change == "removed"]
    assert removed == ["down_blocks.3", "mid_block", "up_blocks.0"]
    moved = {b.a: b.b for b in unet.blocks if b.change == "changed"}
    assert moved["up_blocks.1"] == "up_blocks.0" and moved["down_blocks.0"] == "down_blocks.0"
    assert "resnets 2, attentions 2" in next(b.detail for b in unet.blocks if b.a == "down_blocks.0")
    assert unet.params_a - unet.params_b == 865_910_724 - 315_746_244
    assert c.step_flops_saved == report("sd-turbo").totals.unet_step_flops - report("sdxs-512").totals.unet_step_flops
    assert next(x.change for x in c.components if x.role == "decoder") == "replaced"
    text = render_compare(c)
    assert "mid_block" in text and "removed" in text and "550,164,480" in text
    for fmt in ("md", "json", "csv"):
        assert "down_blocks.3" in render_compare(c, fmt)


# ---- the command line and the path route ------------------------------------------------------------------

def test_cli(tmp_path, capsys):
    assert main(["inspect", "sdxs-512", "--format", "json", "--depth", "1", "--diagram", str(tmp_path / "u.html")]) == 0
    assert json.loads(capsys.readouterr().out)["components"][0]["name"] == "unet"
    assert "<svg" in (tmp_path / "u.html").read_text()
    out = tmp_path / "t.csv"
    assert main(["inspect", "taesd", "--resolution", "256", "--format", "csv", "--output", str(out)]) == 0
    assert "decoder.layers.0" in out.read_text()
    for argv, words in [(["inspect", "sd3"], ["sd15", "sdxs-512", "taesd"]),
                        (["inspect", "taesd", "--diagram", "x.svg"], ["no UNet"]),
                        (["inspect", "taesd", "--resolution", "500"], ["multiple of 8"]),
                        (["inspect", "taesd", "--depth", "0"], ["--depth"])]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err


@requires_shared
@pytest.mark.parametrize("name", ["sd15", "sd21-base", "sd-turbo", "sdxl-base", "sdxl-turbo"])
def test_builtins_match_the_public_configs(name):
    f, folder = BUILTINS[name], CONFIGS / name
    assert f.unet == UNetConfig.from_diffusers(read_json(folder / "unet" / "config.json"))
    assert f.vae == VAEConfig.from_diffusers(read_json(folder / "vae" / "config.json"))
    texts = [p for p in ("text_encoder", "text_encoder_2") if (folder / p).is_dir()]
    assert f.text == tuple(CLIPTextConfig.from_transformers(read_json(folder / p / "config.json")) for p in texts)
    fam = family(folder)  # the path route reads the same configs
    assert (fam.unet, fam.text, fam.vae) == (f.unet, f.text, f.vae)


@requires_shared
def test_shipped_models_are_found_by_name(tmp_path, monkeypatch, capsys):
    import shutil
    shutil.copytree(CONFIGS / "sd-turbo", tmp_path / "shapes-turbo")  # configs only, as a shipped folder
    monkeypatch.setattr("fewstep.inspect.families.ASSETS", tmp_path)
    assert family("shapes-turbo").unet == BUILTINS["sd-turbo"].unet
    assert main(["inspect", "no-such-model"]) == 2
    assert "shipped model (shapes-turbo)" in capsys.readouterr().err


def test_context_length_follows_the_text_encoder():
    """A text encoder with fewer positions than CLIP's 77 (shapes-turbo's 32) sets the text input and
    every cross-attention's key/value length; the SD families keep 77."""
    fam = replace(BUILTINS["sd-turbo"], name="short", text=(replace(BUILTINS["sd-turbo"].text[0],
                                                                     max_position_embeddings=32),))
    r = inspect_model(fam, 256)
    assert {a.kv_len for a in r.unet.attention if a.kind == "cross"} == {32}
    embeddings = r.component("text_encoder").layers[0]
    assert (embeddings.name, embeddings.input_shape, embeddings.output_shape) == \
        ("text_model.embeddings", (1, 32), (1, 32, 1024))
    assert {a.kv_len for a in report("sd-turbo").unet.attention if a.kind == "cross"} == {77}


@requires_shared
def test_taesd_files_are_counted_from_their_headers():
    from safetensors import safe_open
    path = SHARED / "taesd" / "taesd_decoder.safetensors"
    with safe_open(str(path), "pt") as f:
        in_file = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    r = inspect_model(path, 256)
    assert [c.name for c in r.components] == ["taesd_decoder"] and r.components[0].params == in_file == 1_222_531
    with pytest.raises(FewstepError, match="several TAESD models"):
        family(SHARED / "taesd")


def test_single_file_checkpoint_route(tmp_path):
    """A small SD 1.x-layout original single file (random weights, 32 norm groups as every real SD
    model): the inspected parameter counts equal the tensors in the file (read from its header)."""
    from helpers.ldm import original_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fewstep.models.clip import CLIPTextModel
    from fewstep.models.unet import UNet
    from fewstep.models.vae import AutoencoderKL
    unet = UNetConfig(block_out_channels=(32, 64), down_attention=(True, False), up_attention=(False, True),
                      layers_per_block=(1, 1), transformer_depth=(1, 1), num_heads=(8, 8), cross_attention_dim=64,
                      only_cross_attention=(False, False))
    vae = VAEConfig(block_out_channels=(32, 64), layers_per_block=1)
    text = CLIPTextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                          bos_token_id=0, eos_token_id=2)
    sds = {"unet": UNet(unet).state_dict(), "vae": AutoencoderKL(vae).state_dict(),
           "text_encoder": CLIPTextModel(text).state_dict()}
    path = tmp_path / "small-sd1.safetensors"
    save_file(original_state_dict(sds, unet, vae, [text], "sd1", with_extras=False), str(path))
    with safe_open(str(path), "pt") as f:
        in_file = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    r = inspect_model(path, 64)
    assert [c.name for c in r.components] == ["unet", "text_encoder", "vae_decoder", "vae_encoder"]
    assert r.totals.params == in_file == sum(v.numel() for sd in sds.values() for v in sd.values())
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"")
    with pytest.raises(FewstepError, match="never unpickles"):
        inspect_model(pickle)


def test_shape_only_stand_ins_change_nothing(monkeypatch):
    """The fast shape-only norms / linear / attention give the shapes the real meta kernels give."""
    import torch.nn.functional as F
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm", "linear", "gelu")}
    fast = inspect_model("sdxs-512", 256)
    assert all(getattr(F, name) is fn for name, fn in originals.items())
    monkeypatch.setattr("fewstep.inspect.measure.SHAPE_ONLY", {})
    slow = inspect_model("sdxs-512", 256)

    def facts(r):
        return [(m.name, m.input_shape, m.output_shape, m.flops, m.attention) for c in r.components for m in c.layers]
    assert facts(fast) == facts(slow)
