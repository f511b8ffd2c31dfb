"""The pool and student stages (fewstep.train.pool, fewstep.train.distill): the regression pool and its rows
per process, the discriminator's whole-map head, x0 from the student's output, backward simulation, the
one-step share, and the student's missing pool."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fewstep.errors import FewstepError
from helpers.train import bare_add


def test_pool_and_the_student_regression(run):
    """The pool stage: teacher samples from seeded noise with their captions' tokens (tiny: all kept, the
    evaluator reads only 128x128); the student draws POOL_ROWS rows a step, the same on a replay, and
    logs the regression onto them."""
    from fewstep.train.pool import POOL_ROWS, POOL_SIZE, Pool
    out, report = run
    assert report["pool"]["generated"] == report["pool"]["kept"] == POOL_SIZE["tiny"]
    pool = Pool(out)
    side = json.loads((out / "swap" / "unet" / "config.json").read_text())["sample_size"]
    assert pool.z.shape == pool.x0.shape == (POOL_SIZE["tiny"], 4, side, side)
    assert pool.ids.shape[0] == POOL_SIZE["tiny"]
    assert torch.isfinite(pool.x0).all() and not torch.equal(pool.x0, pool.z)
    rows = pool.rows(0, "student", 3, 0)
    assert rows.shape == (POOL_ROWS,) and torch.equal(rows, pool.rows(0, "student", 3, 0))
    assert not torch.equal(rows, pool.rows(0, "student", 4, 0))
    assert len(Pool(out, k=3).rows(0, "student", 3, 0)) == 3
    logged = [json.loads(line) for line in (out / "logs" / "student.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["regression"]) and r["regression"] > 0 for r in logged)


def test_pool_rows_split_over_processes_like_the_batch(run, monkeypatch):
    """Each process draws its share of a step's POOL_ROWS, as of its batch rows: one process of batch 32 all 8, each
    of two 4; the student stage's data stream gets that share (a stage of 2 rows a process of a batch of 4: 4)."""
    from types import SimpleNamespace

    from fewstep.train import distill
    from fewstep.train.pool import POOL_ROWS, rows_per_process
    from fewstep.train.recipe import hyper
    from fewstep.train.sizes import sizes
    assert [rows_per_process(n, 32) for n in (32, 16, 8, 1)] == [POOL_ROWS, POOL_ROWS // 2, POOL_ROWS // 4, 1]
    assert rows_per_process(2, 4) == POOL_ROWS // 2
    monkeypatch.setattr(distill, "ADD", lambda *a: None)  # the parts only; no optimiser
    stage = SimpleNamespace(hyper=hyper("student", tiny=True, batch=4), per_process=2, rank=1)
    _, data, _ = distill.student_setup(stage, run[0], sizes(True), seed=0)
    assert data.pool.k == POOL_ROWS // 2 and len(data(3)["pool_z"]) == POOL_ROWS // 2


def test_discriminator_has_a_whole_map_head(run):
    """Besides one per-position head per feature map, one head judges the whole lowest map at once: it
    gives one logit per image, it trains in the student stage (the checkpointed discriminator's whole-map
    weights moved from their seeded init), and its logit depends on where things are on the map."""
    from fewstep.loading.folders import load_unet
    from fewstep.train.distill import Discriminator, feature_channels, feature_side
    teacher = load_unet(run[0] / "swap" / "unet")
    channels, side = feature_channels(teacher), feature_side(teacher)
    torch.manual_seed(0)  # the stage's seed, drawn just before its discriminator
    disc = Discriminator(channels, 32, side)
    trained = load_file(run[0] / "checkpoints" / "student" / "model_1.safetensors")
    assert trained.keys() == disc.state_dict().keys()
    assert not torch.equal(trained["whole.fc.weight"], disc.state_dict()["whole.fc.weight"])
    feats = [torch.randn(2, c, 2 * side if i == 0 else side, 2 * side if i == 0 else side)
             for i, c in enumerate(channels)]
    with torch.no_grad():
        logits = disc(feats, torch.randn(2, 32))
        assert [x.shape[1] for x in logits] == [f.shape[2] * f.shape[3] for f in feats] + [1]
        perm = torch.randperm(side * side, generator=torch.Generator().manual_seed(1))
        shuffled = feats[-1].flatten(2)[:, :, perm].view_as(feats[-1])
        assert not torch.allclose(disc.whole(shuffled, torch.zeros(2, 32)), disc.whole(feats[-1], torch.zeros(2, 32)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_to_x0_inverts_the_forward_process(prediction_type):
    """The student's x0 from its output: x_t = sqrt(a) x0 + sqrt(1 - a) eps, the UNet's target eps or
    v = sqrt(a) eps - sqrt(1 - a) x0; to_x0 gives x0 back at every timestep, t = 999 included."""
    from fewstep.schedules import alphas_cumprod
    from fewstep.train.distill import to_x0
    from fewstep.train.export import TRAIN_SCHEDULE
    from fewstep.train.teacher import diffuse
    ac = alphas_cumprod(TRAIN_SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, ac = torch.tensor([0, 249, 499, 749, 999]), ac.double()
    a = ac[t].view(-1, 1, 1, 1)
    out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(to_x0(diffuse(x0, eps, t, ac), out, t, ac, prediction_type), x0, rtol=0, atol=1e-9)


def test_own_inputs_are_the_students_own_chain(run):
    """Backward simulation (Hyper.backward): a row at s gets the 4-step chain the sampler would run, unrolled here
    by hand from the same draws: x0 at pure noise (t = 999), re-noised to 749, x0 there, ..., down to s."""
    from fewstep.loading.folders import load_unet
    from fewstep.schedules import alphas_cumprod
    from fewstep.train.distill import STUDENT_TIMESTEPS, to_x0
    from fewstep.train.export import STUDENT_PREDICTION, TRAIN_SCHEDULE
    from fewstep.train.teacher import diffuse
    student = load_unet(run[0] / "student" / "unet").eval()
    add = bare_add(student, student, torch.device("cpu"))
    shape, context = (4, 8, 8), torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([749, 249, 499])
    got = add.own_inputs(s, context, torch.Generator().manual_seed(7), shape)
    g, ac = torch.Generator().manual_seed(7), alphas_cumprod(TRAIN_SCHEDULE)
    x = torch.randn((3, *shape), generator=g)
    want = torch.empty_like(x)
    with torch.no_grad():
        for t, nxt in zip(STUDENT_TIMESTEPS, STUDENT_TIMESTEPS[1:]):
            tt = torch.full((3,), t)
            x0 = to_x0(x, student(x, tt, context), tt, ac, STUDENT_PREDICTION)
            x = diffuse(x0, torch.randn(x.shape, generator=g), torch.full((3,), nxt), ac)
            want[s == nxt] = x[s == nxt]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got[0], got[1])


def test_the_students_one_step_share():
    """--one-step P (Hyper.one_step): P of the rows at t = 999, the rest evenly over 749 / 499 / 249; unset, the
    recipe's STUDENT_WEIGHTS."""
    from fewstep.train.common import generator
    from fewstep.train.distill import STUDENT_TIMESTEPS, STUDENT_WEIGHTS, student_timesteps, student_weights
    assert student_weights() is STUDENT_WEIGHTS == (0.7, 0.1, 0.1, 0.1)
    assert student_weights(0.85) == pytest.approx((0.85, 0.05, 0.05, 0.05))
    for share, weights in ((0.7, STUDENT_WEIGHTS), (0.85, (0.85, 0.05, 0.05, 0.05))):  # a share gives the same draws
        # as its weights written out: 0.7 is the recipe's student, 0.85 the one-process recipe's (docs/log/)
        idx = torch.multinomial(torch.tensor(weights), 64, replacement=True, generator=generator(3))
        assert torch.equal(student_timesteps(64, generator(3), share), torch.tensor(STUDENT_TIMESTEPS)[idx])
    assert student_timesteps(64, generator(3), 1.0).tolist() == [999] * 64
    drawn = student_timesteps(20000, generator(3), 0.4)
    shares = [(drawn == t).float().mean().item() for t in STUDENT_TIMESTEPS]
    assert shares == pytest.approx([0.4, 0.2, 0.2, 0.2], abs=0.015)


def test_student_stage_without_backward_simulation(run, tmp_path):
    """--backward-sim 0: the tiny student stage trains and its weights differ from the recipe's run (backward
    simulation on), whose draws it otherwise shares (there the multi-step rows got the student's own chain)."""
    from safetensors.torch import load_file
    from fewstep.train.recipe import run_stage
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("checkpoints", "logs", "student"))
    run_stage("student", copy, tiny=True, backward=0.0)
    name = "student/unet/diffusion_pytorch_model.safetensors"
    new, old = load_file(copy / name), load_file(run[0] / name)
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)


def test_student_without_its_pool_names_the_stage(run, tmp_path):
    from fewstep.train.recipe import run_stage
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("checkpoints", "logs", "pool", "student"))
    with pytest.raises(FewstepError, match=r"needs .*pool/pool\.safetensors: run `fewstep train pool"):
        run_stage("student", copy, tiny=True)
