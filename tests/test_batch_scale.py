"""Batch runs at scale: two processes under `accelerate launch` make the same files as one, a killed run
finishes on a re-run with nothing duplicated or corrupt, a full disk is a clear error that loses nothing,
and --batch-size auto chooses a size and makes every row."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import fewstep
from fewstep.batch import run as batch_run
from fewstep.batch.rows import read_rows
from fewstep.batch.run import plan, run_rows
from fewstep.errors import FewstepError
from fewstep.train.recipe import accelerate_launch
from helpers.env import ROOT

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")


def prompts(n: int) -> str:
    return "\n".join(f"a {COLOURS[i % 3]} {SHAPES[i // 3 % 3]}" for i in range(n)) + "\n"


def hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def fewstep_cli(*args, env=None, **kw):
    return [sys.executable, "-m", "fewstep.cli", "generate", *map(str, args), "--quiet"]


@pytest.fixture(scope="module")
def pipe():
    return fewstep.load()


def test_two_processes_make_the_files_of_one(tmp_path):
    """`accelerate launch --num_processes 2` (torchrun's CPU processes over gloo) splits whole batches: the
    files are bit for bit those of one process with the same torch threads per process (1 here: CPU sums
    depend on the thread count), one manifest, no parts left, one summary line."""
    src = tmp_path / "p.txt"
    src.write_text(prompts(10))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [*accelerate_launch(2), "-m", "fewstep.cli",
              "generate", "--from-file", str(src), "--output", str(tmp_path / "two"), "--batch-size", "2", "--quiet"]
    two = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("images made") == 1 and "10 images made, 0 already there" in two.stdout
    assert "on 2 processes" in two.stdout
    one = subprocess.run(fewstep_cli("--from-file", src, "--output", tmp_path / "one", "--batch-size", "2"),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert len(hashes(tmp_path / "one")) == 10 and hashes(tmp_path / "two") == hashes(tmp_path / "one")
    records = manifest(tmp_path / "two")
    assert sorted(r["index"] for r in records) == list(range(10))
    assert not list((tmp_path / "two").glob("manifest.part-*")) and not list((tmp_path / "two").glob("*.part"))


def test_a_killed_run_finishes_on_a_rerun(tmp_path):
    """SIGKILL in the middle of a run (a process cannot clean up after that), then the same command: every
    row once in the manifest, every file verifying, the same files as a run never interrupted."""
    src = tmp_path / "p.txt"
    src.write_text(prompts(60))
    out = tmp_path / "run"
    cmd = fewstep_cli("--from-file", src, "--output", out)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = len(list(out.glob("*.png")))
    assert 5 <= made < 60, made  # killed in the middle
    assert list(out.glob("manifest.part-*.jsonl")) and not (out / "manifest.jsonl").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    done_before = int(again.stdout.split(" already there")[0].rsplit(", ", 1)[1])
    assert done_before >= made - 1  # at most the image in flight was lost
    records = manifest(out)
    assert sorted(r["index"] for r in records) == list(range(60))
    assert all(hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() == r["sha256"] for r in records)
    clean = subprocess.run(fewstep_cli("--from-file", src, "--output", tmp_path / "clean"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0 and hashes(out) == hashes(tmp_path / "clean")
    assert not list(out.glob("*.part")) and not list(out.glob("manifest.part-*"))


def test_a_full_disk_is_a_clear_error_and_the_rerun_finishes(pipe, tmp_path, monkeypatch):
    src = tmp_path / "p.txt"
    src.write_text(prompts(4))
    out = tmp_path / "run"
    real, calls = batch_run.save_image, []

    def full_after_two(image, path, parameters=None):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(image, path, parameters)

    monkeypatch.setattr(batch_run, "save_image", full_after_two)
    with pytest.raises(FewstepError, match="cannot write .*00002-2.png: No space left on device; the images "
                                           "already written are kept, run the same command again to finish"):
        run_rows(pipe, read_rows(src), out, progress=False)
    assert sorted(hashes(out)) == ["00000-0.png", "00001-1.png"]
    monkeypatch.setattr(batch_run, "save_image", real)
    report = run_rows(pipe, read_rows(src), out, progress=False)
    assert report["images"] == 2 and report["skipped"] == 2 and len(manifest(out)) == 4


def test_auto_batch_size_measures_then_makes_every_row(pipe, tmp_path, monkeypatch):
    """auto doubles from 1 while a batch is >5% faster per image: with a clock that makes batches of 4
    the fastest per image, it settles on 4; every row is made once, each close to its one-at-a-time image."""
    per_image = {1: 1.0, 2: 0.6, 4: 0.4, 8: 0.39}
    clock = {"t": 0.0}
    generate = pipe.generate

    def timed(request, progress=True):
        clock["t"] += per_image[len(request.prompts)] * len(request.prompts)
        return generate(request, progress=progress)

    monkeypatch.setattr(pipe, "generate", timed)
    monkeypatch.setattr("fewstep.batch.sizes.time.perf_counter", lambda: clock["t"])
    sizes = []
    monkeypatch.setattr(batch_run, "plan", lambda todo, size: sizes.append(size) or plan(todo, size))
    src = tmp_path / "p.txt"
    src.write_text(prompts(24))
    report = run_rows(pipe, read_rows(src), tmp_path / "out", batch_size="auto", progress=False)
    monkeypatch.undo()
    assert report["images"] == 24 and sorted(r["index"] for r in manifest(tmp_path / "out")) == list(range(24))
    assert sizes[-1] == 4  # measured: 1 (warm-up), 1, 2, 4, 8 (only 1.5% faster than 4), then the rest by 4
    row = read_rows(src)[23]
    alone = np.asarray(pipe(row.prompt, seed=23, progress=False)[0], np.int16)
    assert np.abs(np.asarray(Image.open(tmp_path / "out" / "00023-23.png"), np.int16) - alone).max() <= 1
