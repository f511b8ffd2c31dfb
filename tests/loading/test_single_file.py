"""Original single-file checkpoints (LDM / SGM layout): family detection, config inference and key
conversion (fewstep/detect.py, fewstep/convert.py).

Tiny diffusers pipelines are written back in the original layout (tests/ldm.py). diffusers'
`from_single_file` is the independent oracle that those files are genuine: it must load them to the
folder's exact weights. Then `read_checkpoint` must give the folder's exact state dicts and configs.
Heads, GroupNorm groups and sample size leave no trace in the weights, so against the tiny models
they are checked to follow the documented conventions; the real SD 1.5 / 2.1 / SDXL architectures,
built on the meta device from the shipped configs, check that the conventions give the real values.
"""

import os
from dataclasses import fields

import pytest
import torch

from fewstep.configs import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig, read_json
from fewstep.loading.detect import convert_state_dict, read_checkpoint
from fewstep.errors import FewstepError
from helpers.env import CONFIGS, requires_shared
from helpers.ldm import load_folder, original_state_dict, save_original, text_model_layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# case -> (tiny family, text layout of the file, family fewstep must detect)
CASES = {
    "sd1": ("sd1", "sd1", "sd1"),
    "sd1-inpaint": ("sd1-inpaint", "sd1", "sd1"),
    "sd1-old": ("sd1", "sd1-old", "sd1"),  # CLIP keys without `text_model.` (early SD 1.x files)
    "sd2-v": ("sd2-v", "sd2", "sd2"),
    "sd2-sgm": ("sd2-eps", "sd2-sgm", "sd2"),  # SGM layout, as SD-Turbo ships
    "sdxl": ("sdxl", "sdxl", "sdxl"),
}


class _Callback:  # stands in for the Lightning objects some .ckpt files pickle
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """case -> (diffusers folder, original-layout .safetensors), built once per module."""
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("single_file")
    folders = {}

    def get(case):
        family, layout, _ = CASES[case]
        if family not in folders:
            folders[family] = make_pipeline(family, root)[0]
        path = root / f"{case}.safetensors"
        if not path.exists():
            save_original(folders[family], path, layout)
        return folders[family], path
    return get


def assert_same_tensors(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def assert_same_config(got, want, conventions: dict | None = None):
    """Field by field; `conventions` gives the value expected where the weights cannot tell."""
    conventions = conventions or {}
    for f in fields(want):
        expected = conventions.get(f.name, getattr(want, f.name))
        assert getattr(got, f.name) == expected, f"{type(want).__name__}.{f.name}: {getattr(got, f.name)} != {expected}"


@requires_shared
@pytest.mark.parametrize("case", ["sd1", "sd1-inpaint", "sd2-v", "sd2-sgm", "sdxl"])
def test_original_file_is_genuine(tiny, case):
    """diffusers' own loader reads the written file back to the folder's exact weights."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    folder, path = tiny(case)
    cls = diffusers.StableDiffusionXLPipeline if case == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name, want in load_folder(folder).items():
        got = getattr(pipe, name).state_dict()
        if name == "text_encoder_2":
            # diffusers tells SDXL's towers apart by width, and both tiny ones are 32 wide, so its
            # pipeline loader fills text_encoder_2 from the CLIP-L keys: use its OpenCLIP converter.
            got = convert_open_clip_checkpoint(pipe.text_encoder_2, load_file(path),
                                               prefix="conditioner.embedders.1.model.")
        assert_same_tensors(text_model_layout(got) if name.startswith("text") else got, want, name)


@requires_shared
@pytest.mark.parametrize("case", list(CASES))
def test_read_checkpoint_matches_folder(tiny, case):
    folder, path = tiny(case)
    sf = read_checkpoint(path)
    assert sf.family == CASES[case][2]
    want = load_folder(folder)
    assert sorted(sf.state_dicts) == sorted(want)
    for name in want:
        assert_same_tensors(sf.state_dicts[name], want[name], name)

    n = len(sf.unet.block_out_channels)
    assert_same_config(sf.unet, UNetConfig.from_diffusers(read_json(folder / "unet" / "config.json")), {
        "num_heads": (8,) * n if sf.family == "sd1" else (1,) * n,  # 64-wide heads, at least one
        "norm_num_groups": 32, "sample_size": 128 if sf.family == "sdxl" else 64})
    assert_same_config(sf.vae, VAEConfig.from_diffusers(read_json(folder / "vae" / "config.json")), {
        "norm_num_groups": 32, "scaling_factor": 0.13025 if sf.family == "sdxl" else 0.18215})
    names = ["text_encoder", "text_encoder_2"][:len(sf.text)]
    assert len(sf.text) == len([k for k in want if k.startswith("text")])
    for got, name in zip(sf.text, names):
        assert_same_config(got, CLIPTextConfig.from_transformers(read_json(folder / name / "config.json")),
                           {"num_attention_heads": 1})
    sched = SchedulerConfig.from_diffusers(read_json(folder / "scheduler" / "scheduler_config.json"))
    for field in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        assert getattr(sf.scheduler, field) == getattr(sched, field), field


@requires_shared
def test_prediction_type(tiny):
    """SD 2.x base and 768-v share every shape: unknown (scheduler: epsilon) unless told, or marked
    by a `v_pred` key."""
    from safetensors.torch import load_file, save_file
    folder, path = tiny("sd2-v")
    plain = read_checkpoint(path)
    assert plain.prediction_type is None and plain.scheduler.prediction_type == "epsilon"
    told = read_checkpoint(path, prediction_type="v_prediction")
    assert told.prediction_type == told.scheduler.prediction_type == "v_prediction"
    assert told.unet.upcast_attention is True
    marked = path.with_name("sd2-v-marked.safetensors")
    save_file({**load_file(path), "v_pred": torch.tensor([])}, str(marked))
    sf = read_checkpoint(marked)
    assert sf.prediction_type == sf.scheduler.prediction_type == "v_prediction"


def _meta_models(name: str):
    """The real architecture of configs/<name>, built on the meta device (no memory, no weights)."""
    import diffusers
    import transformers
    folder = CONFIGS / name
    texts = [p for p in ("text_encoder", "text_encoder_2") if (folder / p).is_dir()]
    with torch.device("meta"):
        sds = {"unet": diffusers.UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json")).state_dict(),
               "vae": diffusers.AutoencoderKL.from_config(read_json(folder / "vae" / "config.json")).state_dict()}
        for p in texts:
            cfg = transformers.CLIPTextConfig.from_pretrained(folder / p)
            cls = transformers.CLIPTextModelWithProjection if p == "text_encoder_2" else transformers.CLIPTextModel
            sds[p] = text_model_layout(cls(cfg).state_dict())
    configs = (UNetConfig.from_diffusers(read_json(folder / "unet" / "config.json")),
               VAEConfig.from_diffusers(read_json(folder / "vae" / "config.json")),
               [CLIPTextConfig.from_transformers(read_json(folder / p / "config.json")) for p in texts])
    return sds, configs


@requires_shared
@pytest.mark.parametrize("name,layout", [("sd15", "sd1"), ("sd21-base", "sd2"), ("sdxl-base", "sdxl")])
def test_real_architectures_on_meta(name, layout):
    """Full-size key sets and shapes: every inferred config field equals the shipped config's,
    heads included (the conventions hold for the real models)."""
    sds, (unet, vae, text) = _meta_models(name)
    sf = convert_state_dict(original_state_dict(sds, unet, vae, text, layout))
    # diffusers' single-file loader configures every SD 2.x UNet like SD 2.1 (upcast attention on);
    # 2.1-base's own config leaves it off. Upcasting only changes fp16 rounding.
    assert_same_config(sf.unet, unet, {"upcast_attention": True} if layout == "sd2" else None)
    assert_same_config(sf.vae, vae)
    assert sf.text == text
    for component, want in sds.items():
        got = sf.state_dicts[component]
        assert sorted(got) == sorted(want), component
        assert all(got[k].shape == want[k].shape for k in want), component


@requires_shared
def test_conversion_shares_storage(tiny):
    """Converted tensors are views of the loaded ones, not copies."""
    from safetensors.torch import load_file
    _, path = tiny("sd2-v")
    sd = load_file(path)
    sf = convert_state_dict(sd)
    assert sf.state_dicts["unet"]["conv_in.weight"] is sd["model.diffusion_model.input_blocks.0.0.weight"]
    q = sf.state_dicts["vae"]["decoder.mid_block.attentions.0.to_q.weight"]  # squeezed 1x1 conv
    assert q.ndim == 2 and q.data_ptr() == sd["first_stage_model.decoder.mid.attn_1.q.weight"].data_ptr()
    k = sf.state_dicts["text_encoder"]["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    fused = sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert k.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert len(sf.state_dicts["text_encoder"]) == 4 + 16 * 5  # the 6th (last) resblock is dropped


@requires_shared
def test_pickle_needs_consent(tiny, tmp_path):
    from safetensors.torch import load_file
    _, path = tiny("sd1")
    sd = load_file(path)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 840000}, ckpt)
    with pytest.raises(FewstepError, match="pickle checkpoints can run code; pass allow_pickle=True"):
        read_checkpoint(ckpt)
    got, want = read_checkpoint(ckpt, allow_pickle=True), read_checkpoint(path)
    for name in want.state_dicts:
        assert_same_tensors(got.state_dicts[name], want.state_dicts[name], name)
    assert got.unet == want.unet
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": sd, "callbacks": _Callback()}, unsafe)
    with pytest.raises(FewstepError, match="weights_only=True"):
        read_checkpoint(unsafe, allow_pickle=True)


@requires_shared
def test_unknown_key_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = tiny("sdxl")
    sd = load_file(path)
    for extra in ("model.diffusion_model.input_blocks.1.0.mystery.weight", "lora_unet_down.alpha"):
        bad = tmp_path / "extra.safetensors"
        save_file({**sd, extra: torch.zeros(1)}, str(bad))
        with pytest.raises(FewstepError, match=f"unknown keys in checkpoint: {extra}"):
            read_checkpoint(bad)
    del sd["first_stage_model.decoder.conv_in.weight"]
    with pytest.raises(FewstepError, match="missing first_stage_model.decoder.conv_in.weight"):
        convert_state_dict(sd)


def test_missing_file(tmp_path):
    with pytest.raises(FewstepError, match="not found: .*nowhere.safetensors"):
        read_checkpoint(tmp_path / "nowhere.safetensors")


def test_bad_files(tmp_path):
    from safetensors.torch import save_file
    odd = tmp_path / "model.gguf"
    odd.write_bytes(b"GGUF")
    with pytest.raises(FewstepError, match="unsupported checkpoint format '.gguf'"):
        read_checkpoint(odd)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 5)
    with pytest.raises(FewstepError, match="cannot read .* as safetensors"):
        read_checkpoint(broken)
    random_keys = tmp_path / "random.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2), "head.bias": torch.zeros(2)}, str(random_keys))
    with pytest.raises(FewstepError, match=r"unrecognised checkpoint layout: .*\(expected SD 1.x, SD 2.x or SDXL keys\)"):
        read_checkpoint(random_keys)


def test_unet_without_text_encoder_is_refused():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
          "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}
    with pytest.raises(FewstepError, match="no known text encoder keys"):
        convert_state_dict(sd)
