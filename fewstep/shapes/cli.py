"""`fewstep dataset`: the shapes world's scenes and captions written to a folder (docs/shapes.md)."""

from __future__ import annotations

import argparse

from ..errors import FewstepError
from .data import batch, concept_batch, write_folder
from .render import NEW_SHAPES


def add_dataset_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dataset", help="a folder of rendered shapes scenes and their captions (LoRA "
                              "training data)")
    p.add_argument("out", help="a new folder: NNNNN.png + NNNNN.txt (its caption) per image")
    p.add_argument("--n", type=int, default=2000, help="images")
    p.add_argument("--new-shape", default=None, choices=NEW_SHAPES, help="make a share of the scenes hold this "
                   "new shape (training data for a LoRA that teaches it)")
    p.add_argument("--share", type=float, default=0.5, help="--new-shape: the share of scenes that hold it")
    p.add_argument("--drop", type=float, default=0.3, help="probability each optional caption part is left out")
    p.add_argument("--two-objects", type=float, default=0.5, metavar="P", help="share of scenes with two objects")
    p.add_argument("--seed", type=int, default=0)
    return p


def cmd_dataset(a: argparse.Namespace) -> None:
    if a.n < 1:
        raise FewstepError(f"--n is 1 or more, not {a.n}")
    if a.new_shape:
        images, captions, _ = concept_batch(a.seed, a.n, a.new_shape, a.share, drop=a.drop, two=a.two_objects)
    else:
        images, captions, _ = batch(a.seed, a.n, drop=a.drop, two=a.two_objects)
    print(write_folder(a.out, images, captions))
