"""Shared test fixtures: deterministic CPU settings and the tiny pipeline folders. Constants, marks and
model builders the tests import live in tests/helpers/ (a conftest.py is not a module to import from)."""

import pytest
import torch


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
    """The tiny SD 1.x and SDXL pipeline folders of tests/helpers/tiny.py, built once per test run."""
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("tiny-folders")
    return {f: make_pipeline(f, root)[0] for f in ("sd1", "sdxl")}
