"""Post-training quantization of the UNet's Linear layers through torchao's `quantize_` API.

Follows torchao's inference recipes (github.com/pytorch/ao, `torchao.quantization`) and the
diffusers "fast diffusion" guide (huggingface/diffusion-fast, which pairs int8 quantization with
torch.compile). Schemes:

- "int8-weight": int8 per-channel weights, activations stay in the model dtype
  (`Int8WeightOnlyConfig`); helps memory-bound matmuls (small batches).
- "int8-dynamic": int8 per-channel weights and per-token int8 activations quantized on the fly
  (`Int8DynamicActivationInt8WeightConfig`); helps compute-bound matmuls. Skips the per-sample
  Linears (time / add embeddings, resnets' `time_emb_proj`): their M is the batch size, where
  quantizing activations costs more than it saves (diffusion-fast's `dynamic_quant_filter_fn`
  likewise drops layers it measured slower).
- "fp8": float8 e4m3 weights and dynamic float8 activations
  (`Float8DynamicActivationFloat8WeightConfig`); needs an NVIDIA GPU of compute capability >= 8.9
  (Ada, Hopper).

Only `nn.Linear` layers are quantized: torchao's int8 configs reject Conv2d weights, so the 1x1
convs of SD 1.x transformers and resnet shortcuts stay in float. Layers with 16 or fewer input or
output features are left alone, as diffusion-fast's filter does (int8 kernels do not pay off there).
Weights become torchao tensor subclasses in place; the model keeps its dtype and device. Best
followed by `fewstep.compile.compile_pipeline`, which fuses the (de)quantization into the matmuls.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import FewstepError

SCHEMES = ("int8-weight", "int8-dynamic", "fp8")
PER_SAMPLE = ("time_embedding.", "add_embedding.", "time_emb_proj")  # Linears whose rows are the batch
MIN_FEATURES = 16


def _torchao():
    """Import torchao lazily; its CPU wheels log a warning per missing CUDA kernel library, hidden here."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as q
    except ImportError:
        raise FewstepError("quantization needs torchao: pip install torchao (or pip install 'fewstep[fast]')") from None
    finally:
        log.setLevel(level)
    return q


def _config(q, scheme: str, device: torch.device):
    if scheme == "int8-weight":
        return q.Int8WeightOnlyConfig()
    if scheme == "int8-dynamic":
        from torchao.utils import should_reduce_range
        return q.Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(device))
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise FewstepError(f"fp8 quantization needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper); "
                           f"the model is on {device}: use int8-weight or int8-dynamic")
    return q.Float8DynamicActivationFloat8WeightConfig()


def is_quantized(linear: nn.Linear) -> bool:
    """Whether a Linear's weight is a torchao quantized tensor rather than a plain float tensor."""
    return type(linear.weight) not in (torch.Tensor, nn.Parameter)


def quantize(target, scheme: str):
    """Quantize, in place, the Linear layers of a Pipeline's UNet (or of any module); returns target.

    scheme: "int8-weight", "int8-dynamic" or "fp8" (see the module docstring)."""
    if scheme not in SCHEMES:
        raise FewstepError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    module = target if isinstance(target, nn.Module) else getattr(target, "unet", None)
    if not isinstance(module, nn.Module):
        raise FewstepError(f"quantize takes a Pipeline or a torch module, not {type(target).__name__}")
    if any(isinstance(m, nn.Linear) and is_quantized(m) for m in module.modules()):
        raise FewstepError("this model is already quantized; load it again to quantize with another scheme")
    q = _torchao()
    device = next(module.parameters()).device
    config = _config(q, scheme, device)

    def wanted(m: nn.Module, name: str) -> bool:
        if not isinstance(m, nn.Linear) or min(m.in_features, m.out_features) <= MIN_FEATURES:
            return False
        return scheme == "int8-weight" or not any(part in name for part in PER_SAMPLE)

    q.quantize_(module, config, filter_fn=wanted)
    return target
