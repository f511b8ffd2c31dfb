"""Mistakes at the Python API and odd models, met as a new user would: each is a one-line FewstepError or
a one-line notice that says what fewstep chose, never a stack trace or a silent substitute; and the first
steps (setup, .gitignore) behave."""

import json
import re
import shutil
import subprocess
import warnings

import pytest
import torch

import fewstep
from fewstep.errors import FewstepError
from helpers.env import ROOT, SHARED, requires_shared

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return fewstep.load()


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=None), "prompt must be a string"),
    (dict(prompt=5), "prompt must be a string"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list"),
    (dict(prompt=["a red circle", 3]), "prompt must be a string"),
    (dict(prompt="a red \ud800 circle"), "not text at position 6"),
    (dict(negative_prompt=7), "negative_prompt must be a string"),
    (dict(output_type="jpg"), "output_type='jpg': choose one of pil, pt, latent"),
    (dict(guidance=float("nan")), "guidance=nan must be a finite number"),
    (dict(guidance=float("-inf")), "guidance=-inf"),
    (dict(eta=-0.5), "eta=-0.5 must be a finite number >= 0"),
    (dict(karras="yes"), "karras must be True, False or None"),
    (dict(steps=0), "steps=0"),
    (dict(steps=2.5), "steps=2.5"),
    (dict(num_images=True), "num_images=True"),
    (dict(width=100), "(e.g. 128, this model's size)"),
    (dict(width=12345672, height=128), "GiB of working memory"),
    (dict(num_images=10**9, batch_size=1), "more than 100000 images in one call"),
    (dict(num_images=50_000, width=1024, height=1024, batch_size=1), "GiB of working memory"),
    (dict(original_size=(1, 2, 3)), "original_size=(1, 2, 3) must be two whole numbers"),
    (dict(sampler="dpm_fast"), "unknown sampler 'dpm_fast'"),
    (dict(sigma_schedule="cosine"), "unknown sigma_schedule 'cosine'; choose one of: karras, exponential"),
    (dict(sampler="ddim", sigma_schedule="ays"), "sigma_schedule='ays' applies to euler, euler_a"),
    (dict(karras=False, sigma_schedule="karras"), "karras=False and sigma_schedule='karras' contradict"),
])
def test_api_mistakes_are_one_line(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(FewstepError) as e:
        pipe(kwargs.pop("prompt"), progress=False, **kwargs)
    assert match in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("device,match", [("foo", "unknown device 'foo'"), ("cuda", "no CUDA device"),
                                          ("cuda:3", "no CUDA device"), ("meta", "runs on cpu, cuda or mps")])
def test_devices_this_machine_lacks(device, match):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    for call in (lambda: fewstep.load(device=device), lambda: fewstep.load_autoencoder(ROOT / "fewstep/assets/"
                                                                                       "shapes-turbo", device=device)):
        with pytest.raises(FewstepError, match=match):
            call()
    with pytest.raises(FewstepError, match="dtype torch.int8"):
        fewstep.load(dtype=torch.int8)


@pytest.mark.parametrize("scheduler,sampler", [("DEISMultistepScheduler", "dpmpp_2m"),
                                               ("DPMSolverSinglestepScheduler", "dpmpp_2m"),
                                               ("EDMEulerScheduler", "euler")])
def test_a_scheduler_fewstep_lacks_is_named_with_its_stand_in(tiny_folders, tmp_path, scheduler, sampler):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folders["sd1"], folder)
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": scheduler}))
    with pytest.warns(UserWarning) as caught:
        loaded = fewstep.load(folder)
    assert len(caught) == 1 and f"{scheduler} is not one of fewstep's samplers: sampling with {sampler}" in str(
        caught[0].message)
    assert loaded.defaults.sampler == sampler
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at load: not again at each call
        loaded("a cat", steps=1, width=64, height=64, progress=False)


@requires_shared
@pytest.mark.parametrize("family,stem", [("sdxl", "taesdxl"), ("sd1", "taesd")])
def test_a_folder_with_both_tiny_decoders_takes_the_pipelines(tiny_folders, family, stem):
    """../shared/data/taesd holds taesd_* and taesdxl_*: an SDXL pipeline takes taesdxl and says so."""
    from fewstep.loading.folders import load_taesd
    with pytest.warns(UserWarning, match=f"several tiny autoencoders \\(taesd, taesdxl\\): using {stem}"):
        pipe = fewstep.load(tiny_folders[family], decoder=SHARED / "taesd")
    want, other = (load_taesd(decoder_path=SHARED / "taesd" / f"{s}_decoder.safetensors")
                   for s in (stem, {"taesd": "taesdxl", "taesdxl": "taesd"}[stem]))
    z = torch.randn(1, 4, 8, 8)
    got, want, other = pipe.decode(z), want.decode(z), other.decode(z)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() < (got - other).abs().max()


def test_a_folder_with_several_tiny_decoders_and_no_pipeline_is_refused(tmp_path):
    for stem in ("taesd", "taesdxl"):
        (tmp_path / f"{stem}_decoder.safetensors").write_bytes(b"")
    with pytest.raises(FewstepError, match="holds several tiny autoencoders"):
        fewstep.load_autoencoder(tmp_path)


def test_outputs_are_ignored_by_git():
    assert "/outputs/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").is_file(), reason="no .venv (setup not run)")
def test_setup_says_what_it_does_and_nothing_else():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--test"], capture_output=True, text=True,
                          timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert [re.sub(r"\(\d+ s\)", "(N s)", line) for line in lines[:3]] == [
        "[1/3] virtual environment in .venv (N s)", "[2/3] PyTorch torch==2.13.0 (a minute on a fresh machine) (N s)",
        "[3/3] fewstep[test] and its dependencies (N s)"]
    assert re.fullmatch(r"fewstep \S+ ready \(torch \S+\)", lines[3]) and len(lines) == 4


def shell_lines():
    """Every command line of the README's and the guides' shell blocks."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            yield from ((doc.name, line.strip()) for line in block.splitlines() if line.strip())


def test_the_docs_commands_use_the_projects_environment():
    """A newcomer copies commands: each runs fewstep, pip, python or accelerate from .venv/bin (or a script)."""
    bare = [f"{doc}: {line}" for doc, line in shell_lines()
            if re.match(r"(pip3?|python3?|fewstep|accelerate|pytest)\b", line)]
    assert not bare, bare
    assert sum(".venv/bin/" in line for _, line in shell_lines()) >= 10


def test_the_readme_says_how_long_the_tests_take_and_what_shared_is():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"takes about \d+ minutes", text) and "../shared" in text and "skip cleanly" in text
    assert len(text.split()) <= 900
    training = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert "--tiny" in training and not re.search(r"--tiny[^.\n]*\bseconds\b", training)
