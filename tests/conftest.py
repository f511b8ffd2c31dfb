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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: convs this small run faster on one thread, and
    the suite shares the machine. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """The tiny SD 1.x and SDXL pipeline folders of tests/tiny.py, built once for the session."""
    from tiny import make_pipeline
    root = tmp_path_factory.mktemp("tiny-folders")
    return {f: make_pipeline(f, root)[0] for f in ("sd1", "sdxl")}


def randomize_norms(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random affine params on every norm, so a skipped or misnamed norm changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module.eval()
