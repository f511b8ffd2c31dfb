"""Scores of a batch run's folder (`fewstep generate --from-file` wrote it): CLIP score overall and per
category, FID against a folder of reference images, images/s from the manifest's timings."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..batch.manifest import MANIFEST, merge_parts
from ..errors import FewstepError
from .clip import Clip, square

IMAGES = (".png", ".jpg", ".jpeg", ".webp")


def run_records(folder: str | Path) -> list[dict]:
    """The manifest's records of the images in `folder`, in row order."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() and not any(folder.glob("manifest.part-*.jsonl")):
        raise FewstepError(f"{folder}: no {MANIFEST} (a folder that fewstep generate --from-file wrote)")
    records = merge_parts(folder)
    if not records:
        raise FewstepError(f"{folder}: its manifest lists no image that is there")
    return records


def speed(records: list[dict]) -> dict:
    seconds = sum(r.get("seconds", 0.0) for r in records)
    return {"images": len(records), "s_per_image": round(seconds / len(records), 4),
            "images_per_s": round(len(records) / seconds, 3) if seconds else None}


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def clip_scores(folder: Path, records: list[dict], clip: Clip, by: str | None, progress: bool = True) -> dict:
    """{"all": score, CATEGORY: score, ...}: torchmetrics' CLIPScore of each image with its prompt,
    averaged over the run and over each value of the manifest's meta[`by`] (PartiPrompts' Category)."""
    from torchmetrics.multimodal.clip_score import CLIPScore  # lazy: optional (pip install 'fewstep[eval]')
    groups = defaultdict(list)
    for r in records:
        groups["all"].append(r)
        if by is not None:
            if by not in r.get("meta", {}):
                raise FewstepError(f"--by {by}: the manifest's rows have no {by!r} (a .tsv run records its columns)")
            groups[r["meta"][by]].append(r)
    scores = {}
    bar = tqdm(total=sum(map(len, groups.values())), desc="CLIP score", disable=not progress, mininterval=2.0)
    for name, rows in groups.items():
        metric = CLIPScore(model_name_or_path=lambda: (clip, clip.processor))
        for chunk in batches(rows, 32):
            images = torch.stack([square(Image.open(folder / r["file"]), clip.size) for r in chunk])
            metric.update(images, [r["prompt"] for r in chunk])
            bar.update(len(chunk))
        scores[name] = round(float(metric.compute()), 3)
    bar.close()
    return scores


def fid(clip: Clip | None, real: list[Image.Image | Path], fake: list[Image.Image | Path],
        inception: str | Path | None = None) -> float:
    """torchmetrics' Fréchet distance between two sets of images: on CLIP image features, or with
    `inception` (the weights file pt_inception-2015-12-05-6726825d.pth) on Inception-v3's pool features,
    the FID of papers, which torchmetrics computes through torch-fidelity (not installed by fewstep: it
    requires torchvision)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # lazy: optional (pip install 'fewstep[eval]')
    if len(real) < 2 or len(fake) < 2:
        raise FewstepError(f"FID needs at least 2 images on each side (got {len(real)} and {len(fake)})")
    if inception is not None:
        metric, size = _inception(FrechetInceptionDistance, inception), (299, 299)
    else:
        metric, size = FrechetInceptionDistance(feature=clip, reset_real_features=False), clip.size
    for images, is_real in ((real, True), (fake, False)):
        for chunk in batches(images, 32):
            metric.update(torch.stack([square(_image(x), size) for x in chunk]), real=is_real)
    return round(float(metric.compute()), 3)


def _inception(metric_class, weights: str | Path):
    if not Path(weights).is_file():
        raise FewstepError(f"--inception-weights {weights}: no such file (pt_inception-2015-12-05-6726825d.pth, "
                           "downloaded beforehand)")
    try:
        return metric_class(feature=2048, feature_extractor_weights_path=str(weights), reset_real_features=False)
    except ModuleNotFoundError:
        raise FewstepError("Inception FID needs torch-fidelity (pip install torch-fidelity; it requires "
                           "torchvision, which fewstep does not install); without it, FID is on CLIP features") from None


def _image(x) -> Image.Image:
    return Image.open(x) if isinstance(x, (str, Path)) else x


def reference_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FewstepError(f"--reference {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGES)
    if len(files) < 2:
        raise FewstepError(f"--reference {folder}: {len(files)} images; FID needs a folder of at least 2")
    return files


def score_run(folder: str | Path, clip: Clip | None, reference: str | Path | None = None, by: str | None = None,
              progress: bool = True, inception: str | Path | None = None) -> dict:
    """The run's figures (also written to FOLDER/scores.json): speed, and with a CLIP model its CLIP
    score (per `by` value) and, with `reference`, the FID of the run's images against those (on CLIP
    features, or on Inception-v3's with `inception` weights)."""
    folder = Path(folder)
    records = run_records(folder)
    result = {"run": str(folder), **speed(records)}
    if clip is None and reference is not None and inception is None:
        raise FewstepError("--reference needs --clip-model (FID on CLIP image features) or --inception-weights")
    if clip is not None:
        result["clip_score"] = clip_scores(folder, records, clip, by, progress)
    if reference is not None:
        key = "fid_inception" if inception is not None else "fid"
        result[key] = fid(clip, reference_images(reference), [folder / r["file"] for r in records], inception)
    (folder / "scores.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def markdown(result: dict) -> str:
    lines = [f"{result['run']}: {result['images']} images, {result['images_per_s']} images/s "
             f"({result['s_per_image']} s/image)"]
    if "fid" in result:
        lines.append(f"FID (CLIP features) against the reference: {result['fid']}")
    if "fid_inception" in result:
        lines.append(f"FID (Inception-v3) against the reference: {result['fid_inception']}")
    if "clip_score" in result:
        lines += ["", "| images of | CLIP score |", "| --- | ---: |"]
        lines += [f"| {name} | {value} |" for name, value in result["clip_score"].items()]
    return "\n".join(lines) + "\n"
