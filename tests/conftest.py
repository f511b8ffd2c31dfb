"""Shared test fixtures: the reference data beside the repo, and deterministic CPU settings."""

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("FEWSTEP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CONFIGS = SHARED / "configs"

requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
slow = pytest.mark.skipif(os.environ.get("FEWSTEP_SLOW") != "1", reason="slow test: set FEWSTEP_SLOW=1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
