"""DeepCache (fewstep.speed.deepcache) on tiny random UNets: full calls are the plain UNet bit for bit,
cached calls follow the call schedule, reproduce the full output when the input is unchanged, differ
when it changes, and cost a stated fraction of a full call's FLOPs (torch.utils.flop_counter)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fewstep.speed.deepcache import DeepCache, forward, num_branches
from fewstep.errors import FewstepError
from helpers.tiny import UNETS, make_unet, unet_inputs

BRANCHES = {"sd": 9, "sdxs-xl": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def some_branches(unet) -> list[int]:
    """The shallowest, a middle and the deepest branch (each one costs a full forward)."""
    n = num_branches(unet)
    return sorted({0, n // 2, n - 1})


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(UNETS))
def test_branch_count(name):
    assert num_branches(make_unet(name)) == BRANCHES[name]


@torch.no_grad()
@pytest.mark.parametrize("name", list(UNETS))
def test_full_calls_are_the_plain_unet(name):
    unet = make_unet(name)
    x, t, cond = unet_inputs(unet)
    want = unet(x, t, **cond)
    for branch in some_branches(unet):  # the walk DeepCache uses for its full calls
        got, _ = forward(unet, x, t, cond["context"], cond.get("text_embeds"), cond.get("time_ids"), None, branch, None)
        assert torch.equal(got, want), branch
    f = DeepCache(interval=1, branch=0).wrap(unet)
    for scale in (1.0, 0.5, 0.25):
        x, t, cond = unet_inputs(unet, scale)
        assert (f(x, t, **cond) - unet(x, t, **cond)).abs().max().item() <= 1e-6
    assert f.full_calls == 3


@torch.no_grad()
def test_schedule_every_interval_th_call_is_full():
    unet = make_unet("sd")
    f = DeepCache(interval=3, branch=1).wrap(unet)
    for k in range(7):
        x, t, cond = unet_inputs(unet, 1.0 - 0.1 * k)
        diff = (f(x, t, **cond) - unet(x, t, **cond)).abs().max().item()
        if k % 3 == 0:
            assert diff == 0.0, k  # calls 0, 3, 6 run in full
        else:
            assert diff > 1e-3, k  # the others reuse call 0's / 3's deep feature
    assert (f.calls, f.full_calls) == (7, 3)


@torch.no_grad()
@pytest.mark.parametrize("name", list(UNETS))
def test_cached_call_on_the_caching_input_is_exact(name):
    """True for every branch: the shallow path recomputes from the same input, the deep part is the
    very tensor the full call computed."""
    unet = make_unet(name)
    x, t, cond = unet_inputs(unet)
    for branch in some_branches(unet):
        f = DeepCache(interval=2, branch=branch).wrap(unet)
        full = f(x, t, **cond)
        assert (f(x, t, **cond) - full).abs().max().item() <= 1e-6, branch
        assert f.full_calls == 1


@torch.no_grad()
def test_batch_change_forces_a_full_call():
    unet = make_unet("sd")
    f = DeepCache(interval=4).wrap(unet)
    x, t, cond = unet_inputs(unet)
    f(x, t, **cond)
    out = f(x[:1], t[:1], context=cond["context"][:1])
    assert torch.equal(out, unet(x[:1], t[:1], context=cond["context"][:1]))
    assert f.full_calls == 2


@torch.no_grad()
def test_cached_calls_cost_fewer_flops():
    """On this tiny UNet a branch-0 cached call costs 6.7% of a full call, branch 1 16.6%, the
    deepest branch (only the mid block skipped) 97%; cost grows with the branch."""
    unet = make_unet("sd")
    x, t, cond = unet_inputs(unet)
    full = flops(lambda: unet(x, t, **cond))
    costs = []
    for branch in range(num_branches(unet)):
        _, deep = forward(unet, x, t, cond["context"], None, None, None, branch, None)
        costs.append(flops(lambda: forward(unet, x, t, cond["context"], None, None, None, branch, deep)) / full)
    assert costs[0] < 0.08 and costs[1] < 0.18, costs
    assert costs[-1] < 0.98, costs
    assert all(a < b for a, b in zip(costs, costs[1:])), costs


def test_bad_arguments():
    unet = make_unet("sd")
    for kwargs in (dict(interval=0), dict(interval=2.5), dict(branch=-1)):
        with pytest.raises(FewstepError, match="DeepCache"):
            DeepCache(**kwargs)
    with pytest.raises(FewstepError, match=r"branch=9 is out of range: this UNet has 9 skip branches \(0..8\)"):
        DeepCache(3, 9).wrap(unet)
