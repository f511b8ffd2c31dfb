"""The folded upsampling conv (fewstep.models.layers.upsample_conv) against its definition,
nearest x2 then a 3x3 conv: values, gradients, dtypes, layouts, the kernel cache, and FLOPs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fewstep.models.layers import Upsample2D, fold_upsample_weight, unfolded, upsample_conv


def reference(m: Upsample2D, x: torch.Tensor, size=None) -> torch.Tensor:
    up = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size)
    return m.conv(up)


@pytest.mark.parametrize("hw", [(32, 32), (33, 40), (48, 32)])
def test_folded_equals_upsample_then_conv(hw):
    torch.manual_seed(0)
    m = Upsample2D(16)
    x = torch.randn(2, 16, *hw)
    with torch.no_grad():
        ours, ref = m(x), reference(m, x)
    assert ours.shape == ref.shape == (2, 16, 2 * hw[0], 2 * hw[1])
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_small_inputs_and_odd_sizes_take_the_plain_path():
    torch.manual_seed(0)
    m = Upsample2D(8)
    with torch.no_grad():
        small = torch.randn(1, 8, 16, 16)
        assert torch.equal(m(small), reference(m, small))  # below fold_min_pixels: bit-identical
        x = torch.randn(1, 8, 32, 32)
        assert torch.equal(m(x, size=(65, 64)), reference(m, x, (65, 64)))  # UNet's odd skip size
    assert "_folded" not in m.conv.__dict__
    with torch.no_grad(), unfolded():
        assert torch.equal(m(x), reference(m, x))


def test_gradients_match():
    torch.manual_seed(0)
    m = Upsample2D(4)
    x = torch.randn(1, 4, 32, 32, requires_grad=True)
    m(x).square().sum().backward()
    gx, gw = x.grad.clone(), m.conv.weight.grad.clone()
    x.grad = None
    m.conv.weight.grad = None
    reference(m, x).square().sum().backward()
    assert torch.allclose(gx, x.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(gw, m.conv.weight.grad, rtol=1e-4, atol=1e-3)


def test_kernel_cache_follows_weight_changes_and_dtype():
    torch.manual_seed(0)
    m = Upsample2D(8)
    x = torch.randn(1, 8, 32, 32)
    with torch.no_grad():
        m(x)
        first = m.conv._folded[1]
        m(x)
        assert m.conv._folded[1] is first  # reused
        m.conv.weight.mul_(2)  # in-place edit (a LoRA merge, say) bumps the version
        assert torch.allclose(m(x), reference(m, x), atol=1e-5)
        m.to(torch.bfloat16)
        y = m(x.bfloat16())
        assert y.dtype == torch.bfloat16 and m.conv._folded[1].dtype == torch.bfloat16
        assert (y.float() - reference(m, x.bfloat16()).float()).abs().max() < 0.1


def test_channels_last_in_channels_last_out():
    torch.manual_seed(0)
    m = Upsample2D(8)
    x = torch.randn(1, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, reference(m, x), atol=1e-5)


def test_fold_layout_and_flops():
    w = torch.arange(9.0).view(1, 1, 3, 3)  # rows (0 1 2) (3 4 5) (6 7 8)
    f = fold_upsample_weight(w)
    assert f.shape == (4, 1, 2, 2)
    # even rows, even columns: rows (w0, w1 + w2), then columns (c0, c1 + c2)
    assert f[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # odd rows, odd columns: rows (w0 + w1, w2), columns (c0 + c1, c2)
    assert f[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8.0]]
    x = torch.randn(1, 64, 32, 32)
    m = Upsample2D(64)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        upsample_conv(x, fold_upsample_weight(m.conv.weight), m.conv.bias)
    nominal = 2 * 64 * 64 * 9 * 64 * 64  # 3x3 conv at 64x64 outputs
    assert fc.get_total_flops() == 2 * 4 * 64 * 64 * 4 * 33 * 33  # 2x2, 4 phases, on the 33x33 padded windows
    assert fc.get_total_flops() < nominal / 2.1


def test_tiny_decoder_runs_its_upsampling_folded():
    from fewstep.configs import TAEConfig
    from fewstep.models.tae import TinyAutoencoder
    torch.manual_seed(0)
    tae = TinyAutoencoder(TAEConfig(channels=8))
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        ours = tae.decode(z)
        with unfolded():
            ref = tae.decode(z)
    folded = [m for m in tae.decoder.layers if "_folded" in m.__dict__]
    assert len(folded) == 3  # its three upsamplers, at 32x32, 64x64 and 128x128 inputs
    assert ours.shape == (1, 3, 256, 256)
    assert (ours - ref).abs().max() <= 1e-5
