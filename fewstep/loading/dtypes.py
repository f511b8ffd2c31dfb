"""The device and dtype rules of loading: which devices and dtypes a pipeline can be asked for, and
which precision each part is kept in on which device.

The precision rules are diffusers' (fp16 VAEs that overflow are upcast in SDXL pipelines) plus two of a
CPU's: no fast fp16 convolutions, and bf16 that is only fast with bf16 hardware (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from ..errors import FewstepError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device(device, dtype: torch.dtype = torch.float32) -> torch.device:
    """`device` as a torch.device that exists on this machine, or a one-line error; likewise the dtype."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FewstepError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FewstepError(f"device {device!r}: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FewstepError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise FewstepError(f"device {device!r}: torch sees no Apple GPU here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise FewstepError(f"device {device!r}: fewstep runs on cpu, cuda or mps")
    if dtype not in DTYPES:
        raise FewstepError(f"dtype {dtype!r}: use torch.float32, torch.float16 or torch.bfloat16")
    return dev


def native_bf16(device) -> bool:
    """Whether `device` multiplies bf16 in hardware: any GPU, or a CPU with AVX512-BF16 or AMX. On
    other CPUs oneDNN emulates bf16 through fp32, slower than fp32 itself (4x for the SD VAE decoder
    on this project's development CPU, docs/BENCHMARKS.md)."""
    if torch.device(device).type != "cpu":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's CPU feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def vae_dtype(cfg, dtype: torch.dtype, device, sdxl: bool = False) -> torch.dtype:
    """The dtype to keep an autoencoder in when the rest of a pipeline on `device` runs in `dtype`.

    fp16 on a GPU, as diffusers' pipelines do: an SDXL pipeline (`sdxl`) whose VAE config says
    `force_upcast` (the SDXL VAE's decoder activations overflow fp16) keeps that VAE in fp32, decided
    once at load time (diffusers converts it there and back around every call); SD 1.x / 2.x pipelines
    decode in fp16, as diffusers' StableDiffusionPipeline and A1111 do (their configs carry
    AutoencoderKL's default force_upcast=True, which diffusers' SD pipeline does not read). A decode
    that overflows anyway is caught by `imaging.safe_decode` and run again in fp32 (A1111's "revert
    VAE to 32-bit"). fp16 on a CPU: a force_upcast VAE stays fp32, as CPUs have no fast fp16
    convolutions (docs/BENCHMARKS.md). bf16 has fp32's range and is kept, except on a CPU without bf16
    hardware (`native_bf16`), where the autoencoder stays fp32: faster there, and exact. TAESD
    configs have no force_upcast flag."""
    cpu = torch.device(device).type == "cpu"
    if dtype == torch.float16 and (sdxl or cpu) and getattr(cfg, "force_upcast", False):
        return torch.float32
    if dtype == torch.bfloat16 and not native_bf16(device):
        return torch.float32
    return dtype
