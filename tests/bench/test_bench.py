"""`fewstep bench`: the harness on tiny pipelines (every field, sane and consistent values, ratios,
JSON), its summary arithmetic on fixed numbers, random-weight folders that fewstep and diffusers both
load without a missing key, and one-line errors for bad input."""

import json
import math
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fewstep
from fewstep.bench.harness import Job, Options, Settings, brief, notes, parse_cache, psnr, ratios, run_bench, summarize
from fewstep.bench.random_weights import random_folder
from fewstep.cli import main
from fewstep.errors import FewstepError
from helpers.env import CONFIGS, SHARED, requires_shared

pytestmark = requires_shared
SIZE = 64



@pytest.fixture(scope="module")
def compared(tiny_folders):
    """fewstep vs diffusers on the tiny SD 1.x pipeline: 2 timed runs each after 1 warm-up."""
    options = Options(model=str(tiny_folders["sd1"]), compare="diffusers", runs=2, warmup=1, threads=1)
    return run_bench(Settings(resolution=SIZE), options)


def test_every_field_is_sane(compared):
    assert set(compared.results) == {"fewstep", "diffusers"}
    for r in compared.results.values():
        assert len(r.runs_s) == 2
        for name in ("load_s", "encode_s", "step_s", "decode_s", "e2e_s"):  # images/s: exactly 1 / e2e below
            assert 0 < getattr(r, name) < 120, name
        assert r.e2e_min_s <= r.e2e_q1_s <= r.e2e_s <= r.e2e_q3_s <= r.e2e_max_s
        assert r.e2e_s == pytest.approx(sum(r.runs_s) / 2, abs=1e-12)  # median of two runs
        parts = r.encode_s + 1 * r.step_s + r.decode_s  # 1 step
        assert 0.5 * r.e2e_min_s <= parts <= 1.05 * r.e2e_max_s, (parts, r.runs_s)
        assert r.images_per_s == 1 / r.e2e_s  # batch 1, exactly as computed
        assert r.memory == "peak RSS" and 100 < r.peak_memory_mb < 8000
        assert r.compile_cold_s is None and r.compile_warm_s is None
    assert compared.results["fewstep"].psnr_db == math.inf  # fp32 full VAE is the reference itself
    assert compared.results["diffusers"].psnr_db > 35  # same weights, settings and latents: the same image


def test_ratios_are_fewstep_over_diffusers(compared):
    ours, theirs = compared.results["fewstep"], compared.results["diffusers"]
    for name in ("load_s", "encode_s", "step_s", "decode_s", "e2e_s", "images_per_s", "peak_memory_mb"):
        assert compared.ratios[name] == getattr(ours, name) / getattr(theirs, name), name
    assert compared.ratios["compile_cold_s"] is None


def test_report_json(compared):
    d = json.loads(compared.to_json())
    assert d["settings"]["resolution"] == SIZE and d["options"]["compare"] == "diffusers"
    assert d["results"]["fewstep"]["psnr_db"] == "inf"
    assert d["results"]["diffusers"]["e2e_s"] == compared.results["diffusers"].e2e_s
    assert d["environment"]["threads"] == 1 and d["environment"]["diffusers"]
    assert set(d["ratios"]) >= {"e2e_s", "images_per_s", "peak_memory_mb"}


def test_cli_table_json_batch_and_tiny_decoder(tiny_folders, tmp_path, capsys):
    """Batch 2 with the real TAESD decoder: images/s = 2 / e2e, and a PSNR against the fp32 full-VAE image."""
    out = tmp_path / "r.json"
    rc = main(["bench", str(tiny_folders["sd1"]), "--resolution", str(SIZE), "--batch", "2", "--runs", "1", "--warmup", "0",
               "--threads", "1", "--decoder", str(SHARED / "taesd"), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| measure | fewstep |" in text and "| end-to-end s (median) |" in text
    r = json.loads(out.read_text())["results"]["fewstep"]
    assert r["images_per_s"] == 2 / r["e2e_s"]
    assert 0 < r["decode_s"] < r["e2e_s"] and 0 < r["step_s"] < r["e2e_s"]  # hooks found the TAESD decoder
    assert r["settings"] == f"fp32, decoder {SHARED / 'taesd'}"
    assert 3 < r["psnr_db"] < 40  # random full VAE vs real TAESD: different images, still a finite number


def test_summarize_on_fixed_numbers():
    s = Settings(resolution=64, batch=4, compile=True)
    child = dict(load_s=2.0, encode=[0.1, 0.2], step=[1.0, 2.0], decode=[0.3, 0.4], peak_memory_mb=100.0,
                 memory="peak RSS")
    children = [{**child, "e2e": [1.0, 2.0], "compile_s": 30.0},
                {**child, "e2e": [3.0, 4.0], "compile_s": 5.0, "load_s": 4.0, "peak_memory_mb": 150.0}]
    r = summarize("fewstep", s, children)
    assert (r.e2e_s, r.e2e_min_s, r.e2e_max_s, r.e2e_q1_s, r.e2e_q3_s) == (2.5, 1.0, 4.0, 1.75, 3.25)
    assert r.images_per_s == 4 / 2.5 and r.load_s == 3.0 and r.peak_memory_mb == 150.0
    assert (r.encode_s, r.step_s, r.decode_s) == (0.15000000000000002, 1.5, 0.35)
    assert (r.compile_cold_s, r.compile_warm_s) == (30.0, 5.0)
    warm_only = summarize("fewstep", s, children[:1], warm={"compile_s": 7.0})
    assert (warm_only.compile_cold_s, warm_only.compile_warm_s) == (30.0, 7.0)
    half = summarize("diffusers", s, children[1:])
    assert ratios(r, half)["e2e_s"] == 2.5 / 3.5 and ratios(r, half)["load_s"] == 3.0 / 4.0
    # each child's line, logged as it ends (a run cut short still leaves it)
    assert brief(children[0]) == "end-to-end median 1.5 s over 2 runs, load 2 s, compile 30 s"
    assert brief({**child, "e2e": [0.0641, 0.07, 0.06], "compile_s": None}) == \
        "end-to-end median 0.0641 s over 3 runs, load 2 s"


def test_psnr_and_parse_cache():
    a = np.zeros((1, 4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE 1: 48.13 dB
    assert parse_cache(None) is None and parse_cache("3") == (3, None) and parse_cache("3,1") == (3, 1)
    job = Job("fewstep", "/m", Settings(resolution=64, cache=(3, 1), dtype="bf16"), runs=5)
    assert Job.from_json(job.to_json()) == job
    job = Job("fewstep", "/m", Settings(resolution=64, quantize="int8-cpu", quantize_parts=("unet", "decoder")))
    assert Job.from_json(job.to_json()) == job
    assert job.settings.describe() == "fp32, int8-cpu (unet+decoder)"


KEEP_MEMORY = """
import sys
import torch
from fewstep.speed.accel import keep_memory
done = keep_memory() if sys.argv[1] == "1" else None
t = torch.empty(2**24)  # 64 MB: above glibc's mmap threshold, so mmap'ed unless keep_memory
lo, hi = (int(v, 16) for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")
          for v in line.split()[0].split("-"))
print(done, lo <= t.data_ptr() < hi)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_memory tunes glibc's malloc")
def test_keep_memory_serves_large_tensors_from_the_heap():
    def run(flag: str) -> str:
        return subprocess.run([sys.executable, "-c", KEEP_MEMORY, flag], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert run("0") == "None False" and run("1") == "True True"


def test_notes_say_what_diffusers_does_not_do():
    s = Settings(resolution=64, cache=(3, None), quantize="int8-dynamic", quantize_parts=["unet", "text"],
                 token_downsample=2, keep_memory=True)
    assert s.for_diffusers() == Settings(resolution=64)
    assert len(notes(s, Options(compare="diffusers"))) == 4
    assert s.describe() == "fp32, DeepCache 3, ToDo 2x2, keep memory, int8-dynamic (unet+text)"
    assert notes(s, Options()) == []
    assert notes(s, Options(compare="diffusers-default")) == ["diffusers: its defaults (fp32, full VAE, no options)"]


def test_notes_say_where_the_vaes_differ_in_dtype(monkeypatch):
    """On a CPU, --dtype fp16 leaves fewstep's force_upcast VAE in fp32 while diffusers' SD pipeline decodes in
    fp16; bf16 without bf16 hardware leaves it fp32 too. With the tiny decoder, fp32, or a GPU: no note."""
    import fewstep.bench.harness
    fp16 = notes(Settings(dtype="fp16"), Options(compare="diffusers"))
    assert len(fp16) == 1 and fp16[0].startswith("VAE: fewstep decodes a force_upcast VAE in fp32")
    for quiet in (Settings(dtype="fp16", decoder="tiny"), Settings(), Settings(dtype="fp16", device="cuda")):
        assert notes(quiet, Options(compare="diffusers")) == []
    monkeypatch.setattr(fewstep.bench.harness, "native_bf16", lambda device: False)
    assert notes(Settings(dtype="bf16"), Options(compare="diffusers")) == [
        "VAE: fewstep decodes in fp32 on a CPU without bf16 hardware; diffusers in bf16"]
    monkeypatch.setattr(fewstep.bench.harness, "native_bf16", lambda device: True)
    assert notes(Settings(dtype="bf16"), Options(compare="diffusers")) == []


@pytest.mark.parametrize("args,match", [
    (["--random-weights", "sd99"], "unknown architecture 'sd99' for --random-weights: .*available: .*sd-turbo"),
    (["/nonexistent/model"], "no such file or folder: /nonexistent/model"),
    (["M", "--resolution", "100"], "--resolution 100 must be a positive multiple of 8"),
    (["M", "--cache", "0"], "--cache 0: the interval must be at least 1"),
    (["M", "--cache", "x"], "--cache 'x': expected INTERVAL or INTERVAL,BRANCH"),
    (["M", "--random-weights", "sd-turbo"], "pass a MODEL or --random-weights ARCH, not both"),
    (["M", "--decoder", "/nonexistent/taesd"], "--decoder /nonexistent/taesd: no such folder"),
    (["M", "--compile-mode", "max-autotune"], "--compile-mode needs --compile"),
    (["M", "--runs", "0"], "--runs 0 must be at least 1"),
    (["M", "--quantize", "int8-cpu", "--quantize-parts", "unet,vae"], "--quantize-parts unet,vae: name some of unet"),
    (["M", "--quantize", "int8-cpu", "--compile"], "--quantize int8-cpu runs eagerly: drop --compile"),
    (["M", "--token-downsample", "0"], "--token-downsample 0 must be at least 1"),
])
def test_bad_input_is_one_line(tiny_folders, args, match, capsys):
    assert main(["bench", *[str(tiny_folders["sd1"]) if a == "M" else a for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(match, err[0]), err[0]


@pytest.fixture(scope="module")
def tiny_configs(tiny_folders, tmp_path_factory):
    """A configs root like ../shared/data/configs: the tiny pipelines without their weights."""
    root = tmp_path_factory.mktemp("configs")
    for name, folder in tiny_folders.items():
        shutil.copytree(folder, root / f"tiny-{name}", ignore=shutil.ignore_patterns("*.safetensors"))
    return root


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_random_folder_loads_in_both_libraries(tiny_configs, tmp_path, family):
    import diffusers
    import transformers
    folder = random_folder(f"tiny-{family}", tmp_path, tiny_configs)
    assert folder == tmp_path / f"tiny-{family}" and (folder / "fewstep-random.json").is_file()
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert random_folder(f"tiny-{family}", tmp_path, tiny_configs) == folder  # cached, not written again
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    pipe = fewstep.load(folder)
    w = pipe.unet.conv_in.weight
    assert abs(float(w.std()) - 0.02) < 0.004 and float(pipe.unet.conv_norm_out.weight.min()) == 1.0
    classes = [("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
               ("text_encoder", transformers.CLIPTextModel)]
    classes += [("text_encoder_2", transformers.CLIPTextModelWithProjection)] if family == "sdxl" else []
    for name, cls in classes:
        model, info = cls.from_pretrained(folder / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    ours = pipe.text_encoders[-1].text_model.embeddings.token_embedding.weight
    assert torch.equal(model.get_input_embeddings().weight, ours)  # the same numbers, not just the same keys


@pytest.mark.parametrize("arch", ["sd-turbo", "sdxl-turbo"])
def test_random_layout_is_diffusers_layout(arch):
    """fewstep's modules (whose state_dicts the random folders are written from) have exactly the keys and
    shapes of diffusers' / transformers' on the real configs."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights
    from fewstep.bench.random_weights import _module
    src = CONFIGS / arch
    pairs = [("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)]
    for name, cls in pairs:
        with init_empty_weights():
            theirs = cls.from_config(cls.load_config(src / name))
        ours = _module(name, src / name)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape
                                                                      for k, v in theirs.state_dict().items()}
    cls = transformers.CLIPTextModelWithProjection if arch.startswith("sdxl") else transformers.CLIPTextModel
    name = "text_encoder_2" if arch.startswith("sdxl") else "text_encoder"
    with init_empty_weights():
        theirs = cls(transformers.CLIPTextConfig.from_pretrained(src / name))
    # transformers 5's CLIPTextModel has no `text_model.` prefix (WithProjection has); it reads files with it
    want = {k.removeprefix("text_model."): v.shape for k, v in theirs.state_dict().items()
            if not k.endswith("position_ids")}
    ours = {k.removeprefix("text_model."): v.shape for k, v in _module(name, src / name).state_dict().items()}
    assert ours == want


def test_random_folder_errors(tmp_path):
    with pytest.raises(FewstepError, match="needs the real model configs in") as e:
        random_folder("sd-turbo", tmp_path, tmp_path / "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(FewstepError, match=r"unknown architecture 'sd3'.*\(available: sd-turbo, sd15, sd21-base"):
        random_folder("sd3", tmp_path, CONFIGS)


def test_diffusers_tiny_autoencoder_matches_fewstep_taesd():
    """The diffusers side's AutoencoderTiny, built from the original TAESD files, decodes as fewstep's TAESD."""
    from fewstep.bench.reference import tiny_autoencoder
    theirs = tiny_autoencoder(str(SHARED / "taesd"), sdxl=False)
    ours = fewstep.load_autoencoder(SHARED / "taesd", sdxl=False)  # the folder holds taesd and taesdxl
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.decode(z), theirs.decode(z).sample
    assert a.shape == (1, 3, 64, 64) and float(a.std()) > 0.05
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
