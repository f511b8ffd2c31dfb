"""fewstep.speed.quantize on a tiny random UNet (CPU, fp32): which Linears become int8 torchao tensors, and
how far the output moves. Tolerances (measured 0.18% and 0.33% of max |output|):
max |quantized - fp32| <= 1% of max |fp32 output| for int8-weight, 2% for int8-dynamic."""

import copy
import sys
from types import SimpleNamespace

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.speed.quantize import is_quantized, quantize
from helpers.tiny import make_unet, unet_inputs

TOLERANCE = {"int8-weight": 0.01, "int8-dynamic": 0.02}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    return make_unet("sd")


def linears(module) -> dict:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["int8-weight", "int8-dynamic"])
def test_int8_close_to_fp32(unet, scheme):
    pytest.importorskip("torchao")
    x, t, cond = unet_inputs(unet)
    want = unet(x, t, **cond)
    q = copy.deepcopy(unet)
    assert quantize(SimpleNamespace(unet=q), scheme).unet is q  # a Pipeline: its UNet, in place
    layers = linears(q)
    done = {n for n, m in layers.items() if is_quantized(m)}
    per_sample = {n for n in layers
                  if n.startswith(("time_embedding.", "add_embedding.")) or n.endswith("time_emb_proj")}
    assert len(layers) == 129 and len(per_sample) == 19
    assert done == (set(layers) if scheme == "int8-weight" else set(layers) - per_sample)
    assert all(layers[n].weight.qdata.dtype == torch.int8 for n in done)
    assert not any(is_quantized(m) for m in linears(unet).values())  # the copy only
    diff = (q(x, t, **cond) - want).abs().max().item()
    assert 0 < diff <= TOLERANCE[scheme] * want.abs().max().item(), diff


def test_errors(unet, monkeypatch):
    with pytest.raises(FewstepError, match="unknown quantization scheme 'int4'; choose one of int8-weight"):
        quantize(unet, "int4")
    with pytest.raises(FewstepError, match="takes a Pipeline or a torch module"):
        quantize("unet", "int8-weight")
    if not torch.cuda.is_available():
        pytest.importorskip("torchao")
        with pytest.raises(FewstepError, match=r"fp8 quantization needs an NVIDIA GPU .* the model is on cpu"):
            quantize(copy.deepcopy(unet), "fp8")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(FewstepError, match=r"pip install torchao"):
        quantize(copy.deepcopy(unet), "int8-weight")


def test_twice_is_an_error(unet):
    pytest.importorskip("torchao")
    q = quantize(copy.deepcopy(unet), "int8-weight")
    with pytest.raises(FewstepError, match="already quantized"):
        quantize(q, "int8-dynamic")
