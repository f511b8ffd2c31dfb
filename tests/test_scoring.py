"""`fewstep eval` on any model's batch run, with a random-weight CLIP (the numbers mean nothing; the
plumbing is what is checked): torchmetrics' CLIP score equals the score computed by hand from the same
CLIP, per category; FID equals the Fréchet distance of the same features computed with scipy; missing
weights are a one-line error; --compare pairs the runs' images."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import fewstep
from fewstep.batch.rows import read_rows
from fewstep.batch.run import run_rows
from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.scoring.clip import load_clip, square
from fewstep.scoring.compare import compare
from fewstep.scoring.run import score_run
from helpers.env import ROOT

TSV = ("Prompt\tCategory\na red circle\tBasic\na blue square on the left\tBasic\na green triangle\tColours\n"
       "a small red square at the top\tColours\na big blue circle\tColours\n")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP in transformers' layout, with the built-in model's CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(ROOT / "fewstep/assets/shapes-turbo/tokenizer")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4, **ids),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs over the same TSV rows: 1 step and 4 steps."""
    pipe = fewstep.load()
    root = tmp_path_factory.mktemp("runs")
    (root / "p.tsv").write_text(TSV)
    for steps in (1, 4):
        rows = [r.__class__(r.index, r.prompt, {"steps": steps}, r.meta) for r in read_rows(root / "p.tsv")]
        run_rows(pipe, rows, root / f"s{steps}", seed=3, progress=False)
    return root


def by_hand(clip_dir, files, prompts) -> np.ndarray:
    """100 x cos(image, text) per image, from transformers' CLIP directly (torchmetrics floors the mean at 0)."""
    from transformers import CLIPModel, CLIPProcessor
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    images = [Image.open(f).convert("RGB") for f in files]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    x = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    t = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    return (100 * (x * t).sum(-1)).numpy()


def test_clip_score_per_category_equals_the_score_by_hand(clip_dir, runs):
    result = score_run(runs / "s1", load_clip(clip_dir), by="Category", progress=False)
    records = [json.loads(line) for line in (runs / "s1" / "manifest.jsonl").read_text().splitlines()]
    scores = by_hand(clip_dir, [runs / "s1" / r["file"] for r in records], [r["prompt"] for r in records])
    cats = np.array([r["meta"]["Category"] for r in records])
    assert result["images"] == 5 and result["images_per_s"] > 0
    assert result["clip_score"]["all"] == pytest.approx(max(scores.mean(), 0), abs=2e-3)
    for cat in ("Basic", "Colours"):
        assert result["clip_score"][cat] == pytest.approx(max(scores[cats == cat].mean(), 0), abs=2e-3)
    assert len(set(result["clip_score"].values())) == 3  # the random CLIP still tells the groups apart
    assert json.loads((runs / "s1" / "scores.json").read_text())["clip_score"] == result["clip_score"]


def test_fid_equals_the_frechet_distance_of_the_same_features(clip_dir, runs):
    clip = load_clip(clip_dir)
    real_dir = runs / "real"
    real_dir.mkdir(exist_ok=True)
    for f in (runs / "s4").glob("*.png"):
        shutil.copy(f, real_dir / f.name)
    result = score_run(runs / "s1", clip, reference=real_dir, progress=False)

    def features(folder):
        files = sorted(folder.glob("*.png"))
        with torch.no_grad():
            return clip(torch.stack([square(Image.open(f), clip.size) for f in files])).numpy()

    a, b = features(real_dir), features(runs / "s1")
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = mu @ mu + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert result["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert score_run(runs / "s4", clip, reference=real_dir, progress=False)["fid"] == pytest.approx(0, abs=1e-3)


def test_missing_weights_and_bad_runs_are_one_line_errors(tmp_path, runs, clip_dir):
    with pytest.raises(FewstepError, match="--clip-model .*none: no such folder; .*nothing is downloaded"):
        load_clip(tmp_path / "none")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FewstepError, match="missing model.safetensors, tokenizer.json or vocab.json"):
        load_clip(tmp_path / "half")
    with pytest.raises(FewstepError, match="no manifest.jsonl"):
        score_run(tmp_path, None)
    with pytest.raises(FewstepError, match="--by Challenge: the manifest's rows have no 'Challenge'"):
        score_run(runs / "s1", load_clip(clip_dir), by="Challenge", progress=False)
    with pytest.raises(FewstepError, match="FID needs a folder of at least 2"):
        score_run(runs / "s1", load_clip(clip_dir), reference=tmp_path / "half", progress=False)


def test_compare_pairs_prompts_and_seeds(clip_dir, runs, tmp_path):
    text = compare(runs / "s1", runs / "s4", tmp_path / "cmp", load_clip(clip_dir), progress=False)
    assert "| pairs (same prompt and seed) | 5 | 5 | +0 |" in text and "CLIP score" in text
    assert "FID (CLIP features) against A" in text
    sheet = Image.open(tmp_path / "cmp" / "compare.png")
    assert sheet.size == (384, 20 + 5 * 208)
    same = compare(runs / "s1", runs / "s1", tmp_path / "same", progress=False)
    assert same.splitlines()[-3] == "| mean abs pixel difference of the pairs | | | 0.0 |"
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "a.png")
    (other / "manifest.jsonl").write_text('{"file": "a.png", "index": 0, "prompt": "x", "seed": 1}\n')
    with pytest.raises(FewstepError, match="no image of one has the prompt and seed of an image of the other"):
        compare(runs / "s1", other, tmp_path / "x")


def test_the_command_line(clip_dir, runs, tmp_path, capsys):
    (tmp_path / "p.tsv").write_text(TSV)
    assert main(["eval", str(tmp_path / "run"), "--from-file", str(tmp_path / "p.tsv"), "--steps", "2",
                 "--seed", "3", "--clip-model", str(clip_dir), "--by", "Category"]) == 0
    out = capsys.readouterr().out
    assert "5 images" in out and "| Colours |" in out and "| Basic |" in out
    assert main(["eval", "--compare", str(runs / "s1"), str(tmp_path / "run"), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "compare.png").is_file() and "| pairs (same prompt and seed) | 5 |" in \
        (tmp_path / "c" / "compare.md").read_text()
    assert main(["eval", str(tmp_path / "run"), "--clip-model", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_inception_fid_says_what_it_needs(runs, tmp_path):
    """The papers' FID comes from torch-fidelity's Inception, which needs torchvision (not installed here):
    a missing weights file, or torch-fidelity missing, is a one-line error."""
    with pytest.raises(FewstepError, match="--inception-weights .*none.pth: no such file"):
        score_run(runs / "s1", None, reference=runs / "s4", inception=tmp_path / "none.pth", progress=False)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(FewstepError, match="Inception FID needs torch-fidelity .* it requires torchvision"):
            score_run(runs / "s1", None, reference=runs / "s4", inception=weights, progress=False)
    with pytest.raises(FewstepError, match="--reference needs --clip-model .* or --inception-weights"):
        score_run(runs / "s1", None, reference=runs / "s4", progress=False)
