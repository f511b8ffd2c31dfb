"""Where the tests find things: the repository, the reference data beside it, and the marks that skip
what this machine lacks (the data, or the time for slow tests)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FEWSTEP_SHARED_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = SHARED / "configs"

requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
slow = pytest.mark.skipif(os.environ.get("FEWSTEP_SLOW") != "1", reason="slow test: set FEWSTEP_SLOW=1")
