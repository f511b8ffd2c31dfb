"""What a checkpoint holds once built and loaded: its modules, and the data a pipeline reads from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configs import SchedulerConfig, TextConditioning
from ..request import Defaults


@dataclass
class Components:
    """The parts of a text-to-image model, as `fewstep.pipeline.Pipeline` takes them."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: SchedulerConfig
    conditioning: TextConditioning
    defaults: Defaults
    name: str
