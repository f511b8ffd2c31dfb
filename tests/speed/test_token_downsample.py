"""ToDo token downsampling (`UNet(..., token_downsample=F)`, `layers.downsample_tokens`, `speed.accel`).

The exact check: when every 2x2 patch of the token grid holds one token repeated, pooling keys and
values 2x2 changes nothing (each key appears four times in full attention, once after pooling, with
the same softmax weight in total), so the block's output must equal full attention's to fp32 rounding
(1e-5). On varied tokens the output changes (it is an approximation), only at the chosen level."""

import copy

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.speed.accel import checked_factor, fuse_attention
from fewstep.models.layers import downsample_tokens
from fewstep.models.unet import BasicTransformerBlock, Transformer2DModel
from helpers.tiny import make_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_downsample_tokens_means_of_patches():
    grid = torch.arange(5 * 3 * 2, dtype=torch.float32).view(1, 5, 3, 2)  # [B, H, W, C]
    out = downsample_tokens(grid.view(1, 15, 2), (5, 3), 2)
    assert out.shape == (1, 3 * 2, 2)  # ceil(5/2) x ceil(3/2) tokens
    want = torch.stack([grid[0, i:i + 2, j:j + 2].reshape(-1, 2).mean(0) for i in (0, 2, 4) for j in (0, 2)])
    assert torch.equal(out[0], want)  # edge patches average what is left of them (1 or 2 rows / columns)
    assert torch.equal(downsample_tokens(grid.view(1, 15, 2), (5, 3), 1), grid.view(1, 15, 2))


@torch.no_grad()
def test_repeated_patches_give_full_attention_exactly():
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, heads=4, context_dim=24, only_cross=False, upcast=False).eval()
    coarse = torch.randn(2, 32, 3, 4)  # [B, C, H/2, W/2]
    x = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2).transpose(1, 2)  # 6x8 grid, 2x2 repeats
    context = torch.randn(2, 7, 24)
    want = block(x, context, (6, 8))
    assert rel(block(x, context, (6, 8), kv_downsample=2), want) <= 1e-5
    varied = torch.randn(2, 48, 32)
    full = block(varied, context, (6, 8), kv_downsample=1)
    assert rel(block(varied, context, (6, 8), kv_downsample=2), full) > 1e-3  # an approximation on varied tokens


@torch.no_grad()
def test_unet_levels_fusing_and_errors():
    unet = make_unet("sd")  # attention at levels 1 and 2 (and the mid block): ToDo goes to level 1 only
    x, t, cond = unet_inputs(unet)
    want = unet(x, t, **cond)
    pooling = {m.level: m.pools_tokens for m in unet.modules() if isinstance(m, Transformer2DModel)}
    assert pooling == {1: True, 2: False}
    got = unet(x, t, **cond, token_downsample=2)
    assert 0 < rel(got, want) <= 0.5
    assert rel(unet(x, t, **cond, token_downsample=1), want) == 0  # 1: off, the exact model
    fused = fuse_attention(copy.deepcopy(unet), token_downsample=2)  # the pooled self-attention fuses as q + kv
    keys = fused.state_dict().keys()
    assert any(k.endswith("attn1.to_kv.weight") for k in keys) and any(k.endswith("attn1.to_qkv.weight") for k in keys)
    assert rel(fused(x, t, **cond, token_downsample=2), got) <= 1e-5
    assert checked_factor(2, fused) == 2
    qkv = fuse_attention(copy.deepcopy(unet))
    with pytest.raises(FewstepError, match="after the q/k/v projections were fused"):
        checked_factor(2, qkv)
    with pytest.raises(FewstepError, match="separate q and k/v projections"):
        qkv(x, t, **cond, token_downsample=2)
    for bad in (0, 1.5, True):
        with pytest.raises(FewstepError, match="whole number >= 1"):
            checked_factor(bad, unet)


def test_load_option(tiny_folders):
    import fewstep
    gen = dict(steps=2, width=64, height=64, seed=3, progress=False, output_type="pt")
    ref = fewstep.load(tiny_folders["sd1"])("a cat", **gen)
    pipe = fewstep.load(tiny_folders["sd1"], token_downsample=2, fuse_qkv=True)
    assert pipe.token_downsample == 2
    out = pipe("a cat", **gen)
    assert out.shape == ref.shape and 0 < rel(out, ref) <= 0.5
