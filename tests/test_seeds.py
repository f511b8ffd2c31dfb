"""One seed contract for every sampler: image i of a batch is the image made alone with seed + i (its own
generator draws its initial noise, then each step's fresh noise, as diffusers does with a list of
generators), and seed -1 / None draws a random seed that the image records."""

import pytest
import torch

import fewstep
from fewstep.samplers import SAMPLERS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return fewstep.load()  # the built-in model: a real UNet, 128x128, fast


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_image_i_of_a_batch_is_seed_plus_i_alone(pipe, sampler):
    kw = dict(steps=3, sampler=sampler, progress=False, output_type="pt", eta=0.5 if sampler == "ddim" else 0.0)
    batch = pipe("a red circle", seed=40, num_images=3, **kw)
    for i in range(3):
        alone = pipe("a red circle", seed=40 + i, **kw)
        assert (batch[i] - alone[0]).abs().max().item() <= 1e-4, (sampler, i)
    assert (batch[0] - batch[1]).abs().max().item() > 0.1  # the seeds differ


def test_batches_of_a_throughput_run_keep_the_seeds(pipe):
    kw = dict(steps=2, sampler="euler_a", progress=False, output_type="pt")
    whole = pipe("a blue square", seed=7, num_images=5, **kw)
    assert torch.allclose(pipe("a blue square", seed=7, num_images=5, batch_size=2, **kw), whole, atol=1e-4)


@pytest.mark.parametrize("seed", [-1, None])
def test_a_random_seed_is_drawn_and_recorded(pipe, seed):
    images = pipe("a red circle", seed=seed, num_images=2, progress=False)
    seeds = [int(im.info["parameters"].split("Seed: ")[1].split(",")[0]) for im in images]
    assert 0 <= seeds[0] < 2**32 and seeds[1] == seeds[0] + 1
    again = pipe("a red circle", seed=seeds[0], num_images=2, progress=False)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]


@pytest.mark.parametrize("seed", [-2, 2**64, 2**64 - 1, 1.5, "7", True])
def test_seeds_outside_the_generators_range_are_refused(pipe, seed):
    with pytest.raises(fewstep.FewstepError, match="seed=") as e:
        pipe("a red circle", seed=seed, num_images=2, progress=False)
    assert "\n" not in str(e.value)
