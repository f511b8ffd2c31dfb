"""Where the recipe's stages write under a run folder OUT, for the stages that read what others wrote."""

from __future__ import annotations

from pathlib import Path


def teacher_folder(run: Path) -> Path:
    """The final teacher (after the swap stage): the one the student learns from and that ships."""
    return Path(run) / "swap"


def text_encoder_folder(run: Path) -> Path:
    """The text encoder the UNets read: the final teacher's (the CLIP stage's, its layers trained on
    with the UNet in the refine and pairs stages)."""
    return teacher_folder(run) / "text_encoder"


def pool_path(run: Path) -> Path:
    """The student's regression pool: the final teacher's samples that the evaluator reads right."""
    return Path(run) / "pool" / "pool.safetensors"
