"""`fewstep generate` as a new user meets it: every ordinary mistake is one line on stderr and exit status 2,
refused before any work where it can be (no model load, nothing written), and what it writes is what was
asked for (a JPEG for x.jpg, the seed it really used)."""

import subprocess
import sys
import time
import warnings

import pytest
import torch

import fewstep.cli
from fewstep.cli import main
from fewstep.outputs import read_parameters

PROMPT = "a red circle"


@pytest.fixture
def run(capsys):
    def run(*args):
        code = main(["generate", *args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model is loaded: the mistake must be caught before any work."""
    monkeypatch.setattr(fewstep.cli, "load", lambda *a, **kw: pytest.fail("the model was loaded"))


def one_line_error(code, err, match):
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and match in err, err


@pytest.mark.parametrize("args,match", [
    (["--output", "/proc/x.png"], "cannot write to /proc"),
    (["--output", "x.gif"], ".gif images are not written"),
    (["--seed", str(2**64)], "seed=18446744073709551616 must be a whole number"),
    (["--seed", "-5"], "seed=-5"),
    (["--num-images", "0"], "num_images=0"),
])
def test_refused_before_loading(run, no_load, tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(PROMPT, *args)
    one_line_error(code, err, match)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,match", [
    (["--device", "foo"], "unknown device 'foo'"),
    (["--device", "cuda:0"], "no CUDA device"),
    (["--guidance", "nan"], "guidance=nan must be a finite number"),
    (["--guidance", "inf"], "guidance=inf"),
    (["--steps", "0"], "steps=0"),
    (["--steps", "5000"], "more than the model's 1000"),
    (["--sampler", "dpm_fast"], "unknown sampler 'dpm_fast'"),
    (["--width", "100"], "multiple of 8 (e.g. 128, this model's size)"),
    (["--batch-size", "0"], "--batch-size '0': a whole number of at least 1, or auto"),
])
def test_one_line_errors_and_nothing_written(run, tmp_path, args, match):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run(PROMPT, "--output", str(tmp_path / "out"), "--quiet", *args)
    one_line_error(code, err, match)
    assert not (tmp_path / "out").exists()


def test_a_size_that_cannot_fit_is_refused_at_once(run, tmp_path):
    start = time.perf_counter()
    code, out, err = run(PROMPT, "--width", "12345672", "--output", str(tmp_path / "o"), "--quiet")
    one_line_error(code, err, "GiB of working memory")
    assert "ask for at most about" in err and time.perf_counter() - start < 20  # the load is most of it


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fewstep.cli", "generate", b"a red \xff circle",
                           "--output", str(tmp_path / "o"), "--quiet"], capture_output=True)
    err = done.stderr.decode()
    assert done.returncode == 2 and err.count("\n") == 1 and "not text at position 6" in err, err
    assert not (tmp_path / "o").exists()


def test_random_seed_is_recorded_in_name_and_parameters(run, tmp_path):
    code, out, err = run(PROMPT, "--seed", "-1", "--num-images", "2", "--output", str(tmp_path), "--quiet")
    assert code == 0 and err == ""
    files = sorted(tmp_path.iterdir())
    seeds = [int(f.stem.split("-")[1]) for f in files]
    assert seeds[1] == seeds[0] + 1 and 0 <= seeds[0] < 2**32
    assert [f"Seed: {s}," in read_parameters(f) for f, s in zip(files, seeds)] == [True, True]


@pytest.mark.parametrize("name,fmt", [("x.jpg", "JPEG"), ("x.webp", "WEBP"), ("x.png", "PNG")])
def test_the_output_suffix_is_the_format(run, tmp_path, name, fmt):
    from PIL import Image
    code, out, err = run(PROMPT, "--output", str(tmp_path / name), "--quiet", "--seed", "3")
    assert code == 0 and out.strip() == str(tmp_path / name)
    with Image.open(tmp_path / name) as im:
        assert im.format == fmt and im.size == (128, 128)
    text = read_parameters(tmp_path / name)
    assert text.startswith(PROMPT + "\nSteps: 4, Sampler: LCM, CFG scale: 0, Seed: 3, Size: 128x128, Model: shapes-turbo")


@pytest.mark.parametrize("prompt,match", [
    ("a photo of a cat", "unknown word 'photo'"),
    ("a purple circle on a purple background", "background colour must differ"),
    ("a red circle on the left and a blue square on the left", "cannot both be 'on the left'"),
])
def test_the_built_in_models_grammar_is_a_warning(run, tmp_path, prompt, match):
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as a fresh process shows them, whatever this one has seen
        code, out, err = run(prompt, "--output", str(tmp_path / "x.png"), "--quiet")
    assert code == 0 and (tmp_path / "x.png").is_file()
    assert err.count("\n") == 1 and err.startswith("warning: ") and match in err, err
