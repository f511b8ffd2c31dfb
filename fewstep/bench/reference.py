"""The diffusers side of `fewstep bench --compare diffusers`: the reference pipeline with the same settings.

`AutoPipelineForText2Image.from_pretrained` (StableDiffusionPipeline / StableDiffusionXLPipeline, no
safety checker) in the same dtype; channels_last as diffusers' docs do it (`unet.to(memory_format=...)`,
here the VAE too); `fuse_qkv_projections()`; AutoencoderTiny for a tiny decoder; `torch.compile` of the
UNet and the VAE decoder. What diffusers has no built-in equivalent for (DeepCache, fewstep's
quantization schemes) is left off and said in the report's notes. diffusers is imported only here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import FewstepError
from ..loading.weights import read_state_dict
from ..models.tae import taesd_to_diffusers
from .harness import Job, Settings
from .runner import DTYPES, Runner, initial_latents


def diffusers_runner(job: Job) -> Runner:
    """The diffusers pipeline with the job's settings; generate() calls it with the shared latents."""
    s = job.settings
    diffusers = _import()
    index = json.loads((Path(job.folder) / "model_index.json").read_text())
    sdxl = "text_encoder_2" in index
    t = time.perf_counter()
    pipe = _load(diffusers, job.folder, s, sdxl, "safety_checker" in index)
    load_s = time.perf_counter() - t
    compile_s = 0.0
    if s.compile:
        t = time.perf_counter()
        pipe.unet = torch.compile(pipe.unet, mode=s.compile_mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=s.compile_mode)
        compile_s = time.perf_counter() - t
    side = s.resolution // pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    latents = initial_latents(job.seed, (s.batch, channels, side, side)).to(s.device, DTYPES[s.dtype])
    prompts = [job.prompt] * s.batch

    def generate() -> torch.Tensor:
        return pipe(prompt=prompts, num_inference_steps=s.steps, guidance_scale=s.guidance, latents=latents.clone(),
                    height=s.resolution, width=s.resolution, output_type="pt").images

    def to_uint8(x: torch.Tensor):  # x in [0, 1], as diffusers' own numpy conversion rounds it
        return (x.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    return Runner(generate, to_uint8, encoders, pipe.vae.decoder, load_s, compile_s)


def _import():
    """diffusers, with the lazy imports that from_pretrained would do done now, before the clock starts
    (fewstep's modules are imported before its clock too)."""
    try:  # lazy: diffusers is the test-only reference, imported in its own benchmark process only
        import diffusers
        import transformers
        from diffusers import AutoencoderKL, AutoencoderTiny, AutoPipelineForText2Image  # noqa: F401
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401
    except ImportError:
        raise FewstepError("--compare diffusers needs diffusers and transformers: "
                           "pip install diffusers transformers") from None
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return diffusers


def _load(diffusers, folder: str, s: Settings, sdxl: bool, has_safety_checker: bool):
    dtype = DTYPES[s.dtype]
    if has_safety_checker:
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
    else:
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=dtype)
    if s.decoder != "full":
        pipe.vae = tiny_autoencoder(s.decoder, sdxl).to(dtype)
    pipe.to(s.device)
    if s.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if s.fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=isinstance(pipe.vae, diffusers.AutoencoderKL))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_autoencoder(decoder: str, sdxl: bool):
    """diffusers' AutoencoderTiny from the hub ("tiny"), a diffusers folder, or original TAESD files."""
    from diffusers import AutoencoderTiny  # lazy: the test-only reference, as above
    if decoder == "tiny":
        repo = "madebyollin/taesdxl" if sdxl else "madebyollin/taesd"
        try:
            return AutoencoderTiny.from_pretrained(repo)
        except Exception as e:  # noqa: BLE001 - offline or unknown repo: one message
            raise FewstepError(f"--decoder tiny: cannot get {repo} ({type(e).__name__}); pass a TAESD folder") from None
    folder = Path(decoder).expanduser()
    if (folder / "config.json").is_file():
        return AutoencoderTiny.from_pretrained(folder)
    ae = AutoencoderTiny()
    stem = "taesdxl" if sdxl else "taesd"
    for side in ("encoder", "decoder"):
        files = sorted(folder.glob(f"*_{side}.safetensors"), key=lambda p: p.name.rsplit("_", 1)[0] != stem)
        if not files:
            raise FewstepError(f"--decoder {decoder}: no config.json and no TAESD *_{side}.safetensors")
        sd = taesd_to_diffusers(read_state_dict(files[0]), side)
        getattr(ae, side).load_state_dict({k[len(side) + 1:]: v for k, v in sd.items()}, strict=True)
    return ae.eval()
