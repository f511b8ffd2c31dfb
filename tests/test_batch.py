"""`fewstep generate --from-file`: rows from .txt / .jsonl / .tsv, images named by row and seed, a manifest
with hashes, resumable (a re-run makes only what is missing or does not verify), the same images as
one-at-a-time generation, and one-line errors for bad files."""

import json

import numpy as np
import pytest
from PIL import Image

import fewstep
from fewstep.batch.rows import read_rows
from fewstep.batch.run import run_rows
from fewstep.cli import main
from fewstep.errors import FewstepError

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle at the top"]


@pytest.fixture(scope="module")
def pipe():
    return fewstep.load()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


def test_a_text_file_runs_resumes_and_verifies(pipe, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    out = tmp_path / "out"
    first = run_rows(pipe, read_rows(src), out, seed=10, batch_size=2, progress=False)
    assert first["images"] == 3 and first["skipped"] == 0
    assert first["images_per_s"] > 0 and first["s_per_image"] > 0 and first["peak_memory_mib"] > 100
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000-10.png", "00001-11.png", "00002-12.png"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in sorted(records, key=lambda r: r["index"])] == PROMPTS
    assert all(len(r["sha256"]) == 64 and r["steps"] == 4 and r["sampler"] == "lcm" for r in records)
    assert "00002-12.png" in (out / "index.html").read_text() and not list(out.glob("*.part"))
    for i, prompt in enumerate(PROMPTS):  # image i is the image made alone with seed + i
        alone = np.asarray(pipe(prompt, seed=10 + i, progress=False)[0], np.int16)
        assert np.abs(pixels(out / names[i]) - alone).max() <= 1
    again = run_rows(pipe, read_rows(src), out, seed=10, progress=False)
    assert again["images"] == 0 and again["skipped"] == 3
    (out / names[1]).unlink()
    (out / names[2]).write_bytes((out / names[2]).read_bytes()[:-10])  # a damaged file does not verify
    fixed = run_rows(pipe, read_rows(src), out, seed=10, progress=False)
    assert fixed["images"] == 2 and fixed["skipped"] == 1
    assert np.abs(pixels(out / names[2]) - np.asarray(pipe(PROMPTS[2], seed=12, progress=False)[0])).max() <= 1


def test_jsonl_rows_carry_their_own_settings(pipe, tmp_path):
    src = tmp_path / "p.jsonl"
    rows = [{"prompt": PROMPTS[0], "seed": 7, "steps": 2}, {"prompt": PROMPTS[1], "negative": "a circle",
                                                            "cfg_scale": 0.0}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    run_rows(pipe, read_rows(src), out, seed=3, progress=False)
    records = {r["index"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert records[0]["seed"] == 7 and records[0]["steps"] == 2 and records[1]["seed"] == 4
    assert records[1]["negative_prompt"] == "a circle" and records[1]["steps"] == 4
    alone = np.asarray(pipe(PROMPTS[0], seed=7, steps=2, progress=False)[0], np.int16)
    assert np.abs(pixels(out / "00000-7.png") - alone).max() <= 1
    assert "Steps: 2" in Image.open(out / "00000-7.png").info["parameters"]


def test_a_tsv_column_and_filters(tmp_path):
    src = tmp_path / "parti.tsv"
    src.write_text("Prompt\tCategory\tChallenge\na red circle\tShapes\tBasic\na cat\tAnimals\tBasic\n"
                   "a dog\tAnimals\tFine\n")
    assert [r.prompt for r in read_rows(src, filters=["Category=Animals"])] == ["a cat", "a dog"]
    assert [r.prompt for r in read_rows(src, filters=["Category=Animals", "Challenge=Fine"])] == ["a dog"]
    assert [r.prompt for r in read_rows(src, column="Category")] == ["Shapes", "Animals", "Animals"]
    with pytest.raises(FewstepError, match="no column 'Cat' \\(columns: Prompt, Category, Challenge\\)"):
        read_rows(src, filters=["Cat=Animals"])


@pytest.mark.parametrize("name,text,match", [
    ("p.csv", "a\n", "a .txt, .jsonl or .tsv file, not .csv"),
    ("p.txt", "\n\n", "no prompts in it"),
    ("p.tsv", "Prompt\tCategory\na\tb\n", None),
])
def test_bad_files_are_one_line_errors(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    if match is None:
        with pytest.raises(FewstepError, match="no column 'Cat' \\(columns: Prompt, Category\\)"):
            read_rows(tmp_path / name, column="Cat")
        return
    with pytest.raises(FewstepError, match=match):
        read_rows(tmp_path / name)


MALFORMED = ('{"prompt": "a red circle"}\n{oops\n\n["a"]\n{"prompt": "a blue square", "colour": 1}\n'
             '{"prompt": "a green circle", "steps": "many"}\n{"prompt": "a blue circle", "meta": {"Category": "x"}}\n')


def test_malformed_rows_are_skipped_with_their_line_or_stop_the_run(pipe, tmp_path, recwarn):
    """Each malformed row is a one-line warning naming its line (the file's, blank lines counted) and is
    counted; the other rows keep their names and seeds. --strict refuses the file before any image."""
    src = tmp_path / "p.jsonl"
    src.write_text(MALFORMED)
    rows = read_rows(src)
    assert [r.problem is None for r in rows] == [True, False, False, False, True, True]
    report = run_rows(pipe, rows, tmp_path / "out", seed=0, progress=False)
    assert report["images"] == 2 and report["bad_rows"] == 4
    warned = [str(w.message) for w in recwarn]
    assert [m.split(": ")[0] for m in warned] == [f"{src} line 2", f"{src} line 4", f"{src} line 5",
                                                  "row 4 ('a green circle')"]
    assert "not JSON" in warned[0] and "unknown key 'colour'" in warned[2] and "steps" in warned[3]
    assert all(m.endswith("; skipped") and "\n" not in m for m in warned)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000-0.png", "00005-5.png"]
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[1])
    assert record["meta"] == {"Category": "x"}
    with pytest.raises(FewstepError, match=f"{src} line 2: not JSON .* \\(--strict\\)"):
        run_rows(pipe, rows, tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict").exists()


def test_tsv_rows_keep_their_other_columns_and_short_lines_are_malformed(tmp_path):
    src = tmp_path / "parti.tsv"
    src.write_text("Prompt\tCategory\tChallenge\na cat\tAnimals\tBasic\nbroken line\na dog\tAnimals\tFine\n")
    rows = read_rows(src)
    assert rows[0].meta == {"Category": "Animals", "Challenge": "Basic"} and rows[2].prompt == "a dog"
    assert rows[1].problem == f"{src} line 3: 1 cells for 3 columns"


@pytest.mark.parametrize("args,match", [
    ([], "give a prompt or --from-file FILE"),
    (["a red circle", "--from-file", "{tmp}/p.txt"], "give a prompt or --from-file FILE"),
    (["--from-file", "{tmp}/p.txt", "--output", "{tmp}/x.png"], "writes a folder of images, not one file"),
    (["--from-file", "{tmp}/none.txt"], "no such file"),
    (["--from-file", "{tmp}/p.txt", "--column", "Prompt"], "--column and --filter apply to .tsv files"),
])
def test_command_line_mistakes(tmp_path, capsys, args, match):
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["generate", *[a.format(tmp=tmp_path) for a in args], "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err, err
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "outputs").exists()


def test_the_command_line_run(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    assert main(["generate", "--from-file", str(tmp_path / "p.txt"), "--output", str(out), "--seed", "5",
                 "--steps", "1", "--batch-size", "3", "--quiet"]) == 0
    assert "3 images made, 0 already there" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-5.png", "00001-6.png", "00002-7.png"]
    assert main(["generate", "--from-file", str(tmp_path / "p.txt"), "--output", str(out), "--seed", "5",
                 "--steps", "1", "--quiet"]) == 0
    assert "0 images made, 3 already there" in capsys.readouterr().out


def test_jsonl_rows_edit_their_own_images(pipe, tmp_path):
    """A row's image (and mask), relative to the file's folder, makes the row image to image (or inpainting)
    as the Python API does; the manifest records them."""
    source = pipe("a red circle", seed=1, progress=False)[0]
    source.save(tmp_path / "src.png")
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (0, 0, 64, 128))
    mask.save(tmp_path / "mask.png")
    rows = [{"prompt": "a blue circle", "image": "src.png", "strength": 0.6, "seed": 2},
            {"prompt": "a green square", "image": "src.png", "mask": "mask.png", "seed": 3},
            {"prompt": "a red square", "image": "missing.png"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(UserWarning, match="row 2 .*missing.png"):
        report = run_rows(pipe, read_rows(tmp_path / "p.jsonl"), tmp_path / "out", progress=False)
    assert report["images"] == 2 and report["bad_rows"] == 1
    want = pipe("a blue circle", image=source, strength=0.6, seed=2, progress=False)[0]
    assert np.abs(pixels(tmp_path / "out" / "00000-2.png") - np.asarray(want, np.int16)).max() <= 1
    want = pipe("a green square", image=source, mask_image=mask, seed=3, progress=False)[0]
    assert np.abs(pixels(tmp_path / "out" / "00001-3.png") - np.asarray(want, np.int16)).max() <= 1
    records = {r["index"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert records[0]["image"] == str(tmp_path / "src.png") and records[0]["strength"] == 0.6
    assert records[1]["mask_image"] == str(tmp_path / "mask.png")
