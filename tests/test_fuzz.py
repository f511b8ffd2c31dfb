"""Property-based checks (hypothesis) that every input a user can give ends in an image or a one-line
error, with nothing left behind and no long wait before a refusal.

Random and adversarial values for sizes, steps, seeds, guidance, counts, samplers, strings with odd code
points (lone surrogates, NUL, emoji, 2,500-word prompts), dtypes, devices and output paths drive (a) the
command line, `fewstep generate`, and (b) the Python API, `fewstep.load` and `pipe(...)`, on the built-in
model. Accepted work is kept small by the strategies (valid sizes up to 136, steps up to 3, 6 images at
most); too-large sizes are far too large, so the memory check must refuse them. Each outcome must be:
images of the asked number and size (CLI: files in the output place and nothing else), or a FewstepError
whose message is one line (CLI: exit status 2, one `error:` line last on stderr, nothing written),
raised within REFUSE_S seconds. Derandomized, so CI runs the same examples every time.
"""

import math
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fewstep
import fewstep.cli
from fewstep.errors import FewstepError
from fewstep.loading.dtypes import check_device
from fewstep.samplers import SAMPLERS

REFUSE_S = 5.0  # the longest a refusal may take (the model is loaded once, outside the timed part)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

ODD = ["", " ", "\x00", "a\x00b", "\ud800", "a red \udcff circle", "🦄" * 100, "word " * 2500, "a red circle\n\r\t",
       "((a:1.2)) [b] <lora:x:1>", "\u202e\u0301", "a" * 10_000]
TEXT = st.one_of(st.sampled_from(ODD), st.text(max_size=40), st.just("a red circle on the left"))
SIDE = st.one_of(st.sampled_from([8, 64, 136]), st.integers(max_value=7), st.sampled_from([12, 100, 129]),
                 st.integers(min_value=10**8, max_value=2**70))  # valid and cheap, too small, not x8, far too large
STEPS = st.one_of(st.integers(1, 3), st.integers(max_value=0), st.integers(min_value=1001, max_value=10**12))
SEED = st.one_of(st.integers(-3, 3), st.integers(-2**70, 2**70), st.sampled_from([-1, 2**64 - 1, 2**64, 2**32]))
GUIDANCE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 12))
COUNT = st.one_of(st.integers(1, 2), st.integers(max_value=0), st.sampled_from([10**9, 2**63]))
SAMPLER = st.one_of(st.sampled_from(sorted(SAMPLERS)), st.text(max_size=8))


@pytest.fixture(scope="module")
def pipes():
    return {}


def cached_load(pipes):
    """`fewstep.load` for the CLI, checking the device and dtype as the real one does, the model loaded once."""
    def load(model, *, device, dtype, **kw):
        check_device(device, dtype)
        if dtype not in pipes:
            pipes[dtype] = fewstep.load(model, device=device, dtype=dtype)
        return pipes[dtype]
    return load


def one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines[:-1]), err
    assert lines[-1].startswith("error: ") and len(lines[-1]) > len("error: "), err
    return lines[-1]


CLI_OPTIONS = st.fixed_dictionaries({}, optional={
    "--width": SIDE, "--height": SIDE, "--steps": STEPS, "--seed": SEED, "--guidance": GUIDANCE,
    "--num-images": COUNT, "--batch-size": COUNT, "--sampler": SAMPLER, "--negative-prompt": TEXT,
    "--dtype": st.sampled_from(["fp32", "fp32", "bf16", "fp64", ""]),
    "--device": st.sampled_from(["cpu", "cuda", "cuda:9", "foo", "", "mps", "meta"]),
    "--karras": st.just(None), "--eta-typo": st.just("1"),
    "--output": st.sampled_from(["out", "out/x.png", "x.jpg", "x.webp", "x.gif", "FILE/x.png", "/proc/x.png",
                                 "deep/er/dir", "FILE"]),
})


@FUZZ
@given(prompt=TEXT, options=CLI_OPTIONS, raw=st.lists(st.sampled_from(["--steps", "abc", "--width", "1e3", "-"]),
                                                       max_size=2))
def test_the_command_line_gives_images_or_one_line(pipes, monkeypatch, capsys, prompt, options, raw):
    monkeypatch.setattr(fewstep.cli, "load", cached_load(pipes))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "FILE").write_text("")
        before = sorted(Path(tmp).rglob("*"))
        output = options.pop("--output", "out")
        argv = ["generate", prompt, "--quiet", "--output", output if output.startswith("/") else f"{tmp}/{output}"]
        for flag, value in options.items():
            argv += [flag] if value is None else [flag, str(value)]
        start = time.perf_counter()
        code = fewstep.cli.main(argv + raw)
        seconds = time.perf_counter() - start
        out, err = capsys.readouterr()
        after = sorted(Path(tmp).rglob("*"))
        if code == 2:
            one_line_error(err)
            assert after == before and seconds < REFUSE_S, (argv, seconds)
            return
        assert code == 0 and all(line.startswith("warning: ") for line in err.splitlines()), err
        written = [Path(p) for p in out.splitlines()]
        assert len(written) == int(options.get("--num-images", 1)) and not list(Path(tmp).rglob("*.part"))
        for path in written:
            with Image.open(path) as im:
                assert im.size == (int(options.get("--width", 128)), int(options.get("--height", 128)))


API_ARGS = st.fixed_dictionaries({}, optional={
    "negative_prompt": st.one_of(TEXT, st.none(), st.just(5)), "steps": st.one_of(STEPS, st.sampled_from([2.5, "2"])),
    "guidance": st.one_of(GUIDANCE, st.just("7")), "sampler": st.one_of(SAMPLER, st.none(), st.just(3)),
    "seed": st.one_of(SEED, st.none(), st.sampled_from([1.5, "7", True])),
    "width": st.one_of(SIDE, st.sampled_from([64.0, "64", None])), "height": SIDE,
    "num_images": st.one_of(COUNT, st.just(2.0)), "batch_size": st.one_of(COUNT, st.none()),
    "output_type": st.sampled_from(["pil", "pt", "latent", "jpg", None]), "karras": st.sampled_from([None, True, 1, "y"]),
    "eta": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.5)),
    "original_size": st.sampled_from([None, (64, 64), (1, 2, 3), (-1, 5)]),
})


@FUZZ
@given(prompt=st.one_of(TEXT, st.lists(TEXT, min_size=0, max_size=3), st.sampled_from([None, 5, ["a", 3]])),
       kwargs=API_ARGS)
def test_the_python_api_gives_images_or_one_line(pipes, prompt, kwargs):
    pipe = pipes.setdefault(torch.float32, fewstep.load())
    start = time.perf_counter()
    try:
        out = pipe(prompt, progress=False, **kwargs)
    except FewstepError as e:
        assert str(e) and "\n" not in str(e)
        assert time.perf_counter() - start < REFUSE_S, (kwargs, time.perf_counter() - start)
        return
    n = (1 if isinstance(prompt, str) else len(prompt)) * kwargs.get("num_images", 1)
    w, h = kwargs.get("width") or 128, kwargs.get("height") or 128
    kind = kwargs.get("output_type", "pil")
    if kind == "pil":
        assert len(out) == n and all(im.size == (w, h) and "Seed: " in im.info["parameters"] for im in out)
    else:
        side = 1 if kind == "pt" else 8
        assert out.shape == (n, 3 if kind == "pt" else 4, h // side, w // side) and torch.isfinite(out).all()


@FUZZ
@given(device=st.one_of(st.sampled_from(["cpu", "cuda", "cuda:1", "mps", "xla", "cpu:0", "", "meta"]), st.text(max_size=6)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.float64, "fp16", None]))
def test_loading_takes_a_device_and_dtype_it_can_run_or_says_why(device, dtype):
    try:
        pipe = fewstep.load(device=device, dtype=dtype)
    except FewstepError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert pipe.device.type == "cpu" and pipe.dtype == dtype and not math.isnan(pipe.defaults.guidance)
