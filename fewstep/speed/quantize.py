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
- "int8-cpu": int8 weights and dynamic uint8 activations for the convolutions *and* Linears, run by
  oneDNN's int8 kernels on x86 CPUs (`fewstep.speed.int8`: not torchao, whose int8 configs take Linears
  only); the one int8 scheme that is faster in eager mode on a CPU (VNNI: 3-5x per conv).

`parts` picks what is quantized in a Pipeline: "unet" (the default, as diffusion-fast does), "text"
(the text encoders) and "decoder" (the decoder of the autoencoder that decodes: TAESD when set).

For the torchao schemes only `nn.Linear` layers are quantized: their int8 configs reject Conv2d weights, so the 1x1
convs of SD 1.x transformers and resnet shortcuts stay in float. Layers with 16 or fewer input or
output features are left alone, as diffusion-fast's filter does (int8 kernels do not pay off there).
Weights become torchao tensor subclasses in place; the model keeps its dtype and device. Best
followed by `fewstep.speed.compile.compile_pipeline`, which fuses the (de)quantization into the matmuls.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import FewstepError
from .int8 import MIN_CHANNELS as MIN_FEATURES  # layers this narrow stay float in every scheme
from .int8 import SKIP as PER_SAMPLE  # Linears whose rows are the batch
from .int8 import Int8Conv2d, Int8Linear, convert

SCHEMES = ("int8-weight", "int8-dynamic", "fp8", "int8-cpu")
PARTS = ("unet", "text", "decoder")


def _torchao():
    """Import torchao lazily; its CPU wheels log a warning per missing CUDA kernel library, hidden here."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as q  # lazy: optional (pip install 'fewstep[fast]')
    except ImportError:
        raise FewstepError("quantization needs torchao: pip install torchao (or pip install 'fewstep[fast]')") from None
    finally:
        log.setLevel(level)
    return q


def _config(q, scheme: str, device: torch.device):
    if scheme == "int8-weight":
        return q.Int8WeightOnlyConfig()
    if scheme == "int8-dynamic":
        from torchao.utils import should_reduce_range  # lazy: optional, as above
        return q.Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(device))
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise FewstepError(f"fp8 quantization needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper); "
                           f"the model is on {device}: use int8-weight or int8-dynamic")
    return q.Float8DynamicActivationFloat8WeightConfig()


def is_quantized(linear: nn.Linear) -> bool:
    """Whether a Linear's weight is a torchao quantized tensor rather than a plain float tensor."""
    return type(linear.weight) not in (torch.Tensor, nn.Parameter)


def _modules(target, parts) -> list[nn.Module]:
    """The modules of `parts` in a Pipeline, or [target] for a module."""
    if isinstance(target, nn.Module):
        return [target]
    if not hasattr(target, "unet"):
        raise FewstepError(f"quantize takes a Pipeline or a torch module, not {type(target).__name__}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise FewstepError(f"unknown part(s) {', '.join(unknown) or '(none)'} to quantize; choose from {', '.join(PARTS)}")
    found = {"unet": lambda: [target.unet], "text": lambda: list(target.text_encoders),
             "decoder": lambda: [(target.vae if target.decoder is None else target.decoder).decoder]}
    return [m for p in PARTS if p in parts for m in found[p]()]


def quantize(target, scheme: str, parts: tuple[str, ...] = ("unet",)):
    """Quantize, in place, the layers of a Pipeline's `parts` (default its UNet) or of any module;
    returns target.

    scheme: "int8-weight", "int8-dynamic", "fp8" or "int8-cpu" (see the module docstring)."""
    if scheme not in SCHEMES:
        raise FewstepError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    modules = _modules(target, parts)
    if any((isinstance(m, nn.Linear) and is_quantized(m)) or isinstance(m, (Int8Conv2d, Int8Linear))
           for module in modules for m in module.modules()):
        raise FewstepError("this model is already quantized; load it again to quantize with another scheme")
    device = next(modules[0].parameters()).device
    if scheme == "int8-cpu":
        if device.type != "cpu":
            raise FewstepError(f"int8-cpu runs on the CPU (oneDNN); the model is on {device}: use int8-dynamic or fp8")
        for module in modules:
            convert(module)
        return target
    q = _torchao()
    config = _config(q, scheme, device)

    def wanted(m: nn.Module, name: str) -> bool:
        if not isinstance(m, nn.Linear) or min(m.in_features, m.out_features) <= MIN_FEATURES:
            return False
        return scheme == "int8-weight" or not any(part in name for part in PER_SAMPLE)

    for module in modules:
        q.quantize_(module, config, filter_fn=wanted)
    return target
