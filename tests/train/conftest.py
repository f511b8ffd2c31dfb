"""The tiny training recipe, run once for all the tests under tests/train that read its outputs."""

import pytest


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The whole tiny recipe, once: tokenizer, CLIP, VAE, teacher, refine, pairs, swap, pool, student, export.
    Tests read its folder and copy what they change."""
    from fewstep.train.recipe import run_all
    out = tmp_path_factory.mktemp("train") / "run"
    report = run_all(out, tiny=True, seed=0)
    return out, report
