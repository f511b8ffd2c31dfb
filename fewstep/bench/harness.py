"""`fewstep bench`: load time, text encode, time per step, decode, end-to-end latency, images/s, peak memory
and compile time of one model and one set of runtime options, optionally against diffusers in the same run.

Each measurement runs in a fresh Python process (`bench.child`), so peak memory (CPU: the
process's peak RSS; CUDA: `torch.cuda.max_memory_allocated`) belongs to one library only. With
`compare`, fewstep and diffusers processes alternate round by round, with the same torch thread count,
prompt, settings and initial latents. Inside a process: load, `warmup` untimed images, then `runs` timed
ones; text encode and decode are timed by hooks on the text encoders and the VAE decoder inside those
same runs, and the time per step is what lies between them divided by the steps (so it holds the UNet,
the sampler and any caching). Compile time is the compile call plus the first image minus a normal
image: cold in a process with an empty compile cache, warm in a later one sharing that cache.
Image quality is reported as PSNR against fewstep's fp32 full-VAE image from the same latents.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..configs import read_json
from ..errors import FewstepError
from ..loading.dtypes import native_bf16
from ..loading.hub import resolve
from .random_weights import CACHE, random_folder
from .report import environment

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
DTYPES = ("fp32", "fp16", "bf16")
SCHEMES = ("int8-weight", "int8-dynamic", "fp8", "int8-cpu")
PARTS = ("unet", "text", "decoder")  # what --quantize-parts may name
COMPARE = ("diffusers", "diffusers-default")  # same settings / diffusers' default (fp32, full VAE, no options)


@dataclass(frozen=True)
class Settings:
    """What one library is asked to run; the same object goes to both (diffusers applies what it has)."""

    resolution: int | None = None  # None: the model's own size (set by run_bench)
    steps: int = 1
    batch: int = 1
    guidance: float = 0.0  # few-step models run without classifier-free guidance
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    fuse_qkv: bool = False
    decoder: str = "full"  # "full", "tiny" (TAESD from the hub) or a TAESD folder
    compile: bool = False
    compile_mode: str | None = None
    cache: tuple[int, int | None] | None = None  # DeepCache (interval, branch)
    quantize: str | None = None
    quantize_parts: tuple[str, ...] = ("unet",)
    token_downsample: int = 1  # ToDo's factor (fewstep only)
    keep_memory: bool = False  # accel.keep_memory in fewstep's process (glibc malloc keeps freed memory)

    def __post_init__(self):
        r = self.resolution
        if r is not None and (not isinstance(r, int) or r < 8 or r % 8):
            raise FewstepError(f"--resolution {self.resolution} must be a positive multiple of 8 (e.g. 512)")
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise FewstepError(f"--{name} {getattr(self, name)} must be at least 1")
        if self.dtype not in DTYPES:
            raise FewstepError(f"unknown dtype '{self.dtype}' (choose {', '.join(DTYPES)})")
        if self.quantize is not None and self.quantize not in SCHEMES:
            raise FewstepError(f"unknown quantization '{self.quantize}' (choose {', '.join(SCHEMES)})")
        object.__setattr__(self, "quantize_parts", tuple(self.quantize_parts))
        if not self.quantize_parts or any(p not in PARTS for p in self.quantize_parts):
            raise FewstepError(f"--quantize-parts {','.join(self.quantize_parts)}: name some of {', '.join(PARTS)}")
        if self.cache is not None:
            object.__setattr__(self, "cache", tuple(self.cache))
            if self.cache[0] < 1 or (self.cache[1] is not None and self.cache[1] < 0):
                raise FewstepError(f"--cache {self.cache[0]}: the interval must be at least 1 and the branch "
                                   "at least 0 (e.g. --cache 3 or --cache 3,0)")
        if not self.device.startswith(("cpu", "cuda")):
            raise FewstepError(f"--device {self.device}: use cpu or cuda")
        if self.decoder not in ("full", "tiny") and not Path(self.decoder).expanduser().is_dir():
            raise FewstepError(f"--decoder {self.decoder}: no such folder (use full, tiny or a TAESD folder)")
        if self.quantize == "int8-cpu" and self.compile:
            raise FewstepError("--quantize int8-cpu runs eagerly: drop --compile (or use another scheme)")
        if self.token_downsample < 1:
            raise FewstepError(f"--token-downsample {self.token_downsample} must be at least 1 (2 pools 2x2 tokens)")
        if self.compile_mode and not self.compile:
            raise FewstepError("--compile-mode needs --compile")

    def reference(self) -> Settings:
        """The image quality reference: fp32, full VAE, none of the speed options."""
        return Settings(self.resolution, self.steps, self.batch, self.guidance, self.device)

    def for_diffusers(self) -> Settings:
        """What diffusers can run of these settings: no DeepCache, no fewstep quantization, no ToDo, its
        process's allocator as it comes."""
        return replace(self, cache=None, quantize=None, quantize_parts=("unet",), token_downsample=1,
                       keep_memory=False)

    def describe(self) -> str:
        opts = [self.dtype] + [n for n in ("channels_last", "fuse_qkv") if getattr(self, n)]
        opts += [f"decoder {self.decoder}"] if self.decoder != "full" else []
        opts += [f"compile{' ' + self.compile_mode if self.compile_mode else ''}"] if self.compile else []
        opts += [f"DeepCache {','.join(str(c) for c in self.cache if c is not None)}"] if self.cache else []
        opts += [f"ToDo {self.token_downsample}x{self.token_downsample}"] if self.token_downsample > 1 else []
        opts += ["keep memory"] if self.keep_memory else []
        parts = "" if self.quantize_parts == ("unet",) else f" ({'+'.join(self.quantize_parts)})"
        opts += [self.quantize + parts] if self.quantize else []
        return ", ".join(opts)


def parse_cache(text: str | None) -> tuple[int, int | None] | None:
    """`--cache INTERVAL[,BRANCH]` -> (interval, branch or None)."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) > 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise FewstepError(f"--cache {text!r}: expected INTERVAL or INTERVAL,BRANCH (e.g. 3 or 3,0)")
    return int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)


@dataclass(frozen=True)
class Job:
    """One child process's work: which library, which folder, what to run, how often."""

    library: str  # "fewstep" or "diffusers"
    folder: str
    settings: Settings
    runs: int = 3
    warmup: int = 1
    threads: int = 1
    seed: int = 0
    prompt: str = PROMPT
    compile_dir: str | None = None
    image: str | None = None  # where to np.save the first timed image (uint8 [N, H, W, 3])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        return cls(**{**d, "settings": Settings(**d["settings"])})


@dataclass(frozen=True)
class Options:
    """How the benchmark is run (not what is measured)."""

    model: str | None = None
    random_weights: str | None = None
    work_dir: str | None = None  # where random-weight folders are cached
    compare: str | None = None
    runs: int = 3
    warmup: int = 1
    rounds: int = 1  # processes per library, alternating fewstep / diffusers
    threads: int | None = None  # torch threads in every process (default: this process's)
    seed: int = 0
    prompt: str = PROMPT

    def __post_init__(self):
        if self.model and self.random_weights:
            raise FewstepError("pass a MODEL or --random-weights ARCH, not both")
        if self.compare is not None and self.compare not in COMPARE:
            raise FewstepError(f"--compare {self.compare}: choose {' or '.join(COMPARE)}")
        for name, low in (("runs", 1), ("warmup", 0), ("rounds", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise FewstepError(f"--{name} {value} must be at least {low}")


@dataclass
class Result:
    """One library's numbers; times in seconds (medians over all timed runs), memory in MiB."""

    library: str
    settings: str
    load_s: float
    encode_s: float | None
    step_s: float | None
    decode_s: float | None
    e2e_s: float
    e2e_min_s: float
    e2e_max_s: float
    e2e_q1_s: float
    e2e_q3_s: float
    images_per_s: float
    peak_memory_mb: float
    memory: str  # what peak_memory_mb is: "peak RSS" or "CUDA max allocated"
    runs_s: list[float]
    compile_cold_s: float | None = None
    compile_warm_s: float | None = None
    psnr_db: float | None = None  # against fewstep's fp32 full-VAE image; inf: identical


RATIO_FIELDS = ("load_s", "encode_s", "step_s", "decode_s", "e2e_s", "images_per_s", "peak_memory_mb",
                "compile_cold_s", "compile_warm_s")


@dataclass
class Report:
    model: str
    settings: Settings
    options: Options
    environment: dict
    results: dict[str, Result]
    ratios: dict[str, float | None]  # fewstep / diffusers per field
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        def clean(x):  # JSON has no inf / nan
            if isinstance(x, float) and not math.isfinite(x):
                return None if math.isnan(x) else "inf"
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
        return json.dumps(clean(dataclasses.asdict(self)), indent=2)


def model_folder(options: Options, log=None) -> tuple[Path, str]:
    """(the diffusers folder to load, its display name); writes a random-weight folder on first use."""
    if options.random_weights:
        root = Path(options.work_dir) if options.work_dir else CACHE
        return random_folder(options.random_weights, root, log=log), f"{options.random_weights} (random weights)"
    folder = resolve(options.model)
    if not (folder / "model_index.json").is_file():
        raise FewstepError(f"{folder}: bench needs a diffusers pipeline folder (with model_index.json)")
    return folder, folder.name


def default_resolution(folder: Path) -> int:
    """The model's own image side: fewstep.json's size, else the UNet's sample size x 8."""
    if (folder / "fewstep.json").is_file() and read_json(folder / "fewstep.json").get("size"):
        return int(read_json(folder / "fewstep.json")["size"])
    return 8 * int(read_json(folder / "unet" / "config.json").get("sample_size", 64))


def run_child(job: Job) -> dict:
    """Run one Job in a fresh interpreter; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, "-m", "fewstep.bench.child", job.to_json()],
                         capture_output=True, text=True, env=_child_env(job))
    last = (out.stderr.strip().splitlines() or [""])[-1]
    if out.returncode == 2 and last.startswith("error: "):
        raise FewstepError(f"{job.library}: {last[len('error: '):]}")
    if out.returncode:
        raise RuntimeError(f"the {job.library} benchmark process failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_env(job: Job) -> dict:
    """Same thread count everywhere; compiler caches in the job's folder (empty at first: a cold compile)."""
    root = str(Path(__file__).resolve().parents[2])
    cache = Path(job.compile_dir or tempfile.gettempdir())
    return {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads),
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
            "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 images of the same shape (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def summarize(library: str, settings: Settings, children: list[dict], warm: dict | None = None) -> Result:
    """One Result from a library's child outputs (rounds in order; `warm` is an extra compile-warm child)."""
    runs = [t for c in children for t in c["e2e"]]
    med = statistics.median(runs)
    q1, _, q3 = statistics.quantiles(runs, n=4, method="inclusive") if len(runs) > 1 else (runs[0],) * 3

    def part(name: str) -> float | None:
        values = [t for c in children for t in c[name] if t is not None]
        return statistics.median(values) if values else None
    compile_cold = compile_warm = None
    if settings.compile:
        compile_cold = children[0]["compile_s"]
        later = [c["compile_s"] for c in children[1:]] + ([warm["compile_s"]] if warm else [])
        compile_warm = statistics.median(later) if later else None
    return Result(library, settings.describe(), statistics.median(c["load_s"] for c in children),
                  part("encode"), part("step"), part("decode"), med, min(runs), max(runs), q1, q3,
                  settings.batch / med, max(c["peak_memory_mb"] for c in children), children[0]["memory"],
                  runs, compile_cold, compile_warm)


def ratios(ours: Result, theirs: Result) -> dict[str, float | None]:
    """fewstep / diffusers for every field both have."""
    out = {}
    for name in RATIO_FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        out[name] = a / b if a is not None and b else None
    return out


def run_bench(settings: Settings, options: Options, log=None) -> Report:
    """Measure fewstep (and diffusers with options.compare) in child processes; see the module docstring."""
    if options.compare and importlib.util.find_spec("diffusers") is None:
        raise FewstepError("--compare diffusers needs diffusers and transformers: pip install diffusers transformers")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise FewstepError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    log = log or (lambda msg: None)
    folder, name = model_folder(options, log)
    if settings.resolution is None:
        settings = replace(settings, resolution=default_resolution(folder))
    threads = options.threads or torch.get_num_threads()
    libraries = {"fewstep": settings}
    if options.compare:
        libraries["diffusers"] = settings.for_diffusers() if options.compare == "diffusers" else settings.reference()
    base = Job("fewstep", str(folder), settings, options.runs, options.warmup, threads, options.seed, options.prompt)
    warm_page_cache(folder, log)
    results, children = _measure(base, libraries, options.rounds, log)
    env = environment(settings.device, threads)
    if options.compare:
        env["diffusers"] = children["diffusers"][0]["versions"].get("diffusers")
    return Report(name, settings, options, env, results,
                  ratios(results["fewstep"], results["diffusers"]) if options.compare else {}, notes(settings, options))


def warm_page_cache(folder: Path, log) -> None:
    """Read every file of the model folder once, so the first library's load does not pay for the
    cold disk reads the second one then skips: both load times are warm-cache times."""
    log(f"reading {folder} once (warm page cache for both libraries) ...")
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def brief(child: dict) -> str:
    """One child's numbers in a line, logged as soon as it ends: a run stopped before the report (a
    time limit, a later process failing) still leaves them in the log."""
    e2e = child["e2e"]
    out = f"end-to-end median {statistics.median(e2e):.4g} s over {len(e2e)} runs, load {child['load_s']:.3g} s"
    return out + (f", compile {child['compile_s']:.3g} s" if child.get("compile_s") is not None else "")


def _measure(base: Job, libraries: dict[str, Settings], rounds: int, log) -> tuple[dict[str, Result], dict]:
    """Alternate the libraries' processes round by round, add a warm-compile process where there is only
    one round, and the PSNR of each library's image against fewstep's fp32 full-VAE image."""
    with tempfile.TemporaryDirectory(prefix="fewstep-bench-") as tmp:
        jobs = {lib: replace(base, library=lib, settings=s, compile_dir=str(Path(tmp) / f"compile-{lib}"))
                for lib, s in libraries.items()}
        children = {lib: [] for lib in libraries}
        for r in range(rounds):
            for lib, job in jobs.items():
                log(f"{lib}: round {r + 1}/{rounds} ({job.settings.describe()}) ...")
                image = str(Path(tmp) / f"{lib}.npy") if r == 0 else None
                children[lib].append(run_child(replace(job, image=image)))
                log(f"{lib}: {brief(children[lib][-1])}")
        warm = {}
        for lib, job in jobs.items():
            if job.settings.compile and rounds == 1:
                log(f"{lib}: compile again with the warm cache ...")
                warm[lib] = run_child(replace(job, runs=1, warmup=0))
                log(f"{lib}: {brief(warm[lib])}")
        results = {lib: summarize(lib, s, children[lib], warm.get(lib)) for lib, s in libraries.items()}
        reference = Path(tmp) / "fewstep.npy"
        if base.settings != base.settings.reference():
            log("fewstep: reference image (fp32, full VAE) ...")
            reference = Path(tmp) / "reference.npy"
            run_child(replace(base, settings=base.settings.reference(), runs=1, warmup=0, image=str(reference)))
        for lib in libraries:
            results[lib].psnr_db = psnr(np.load(Path(tmp) / f"{lib}.npy"), np.load(reference))
    return results, children


def notes(settings: Settings, options: Options) -> list[str]:
    """What the diffusers side does differently, so a ratio is read for what it is."""
    if options.compare != "diffusers":
        return ["diffusers: its defaults (fp32, full VAE, no options)"] if options.compare else []
    out = ["diffusers: no DeepCache (none built in): every step runs the whole UNet"] if settings.cache else []
    out += [f"diffusers: not quantized (no built-in {settings.quantize})"] if settings.quantize else []
    out += ["diffusers: torch.compile of the whole UNet and VAE decoder"] if settings.compile else []
    out += ["diffusers: full self-attention (no token downsampling built in)"] if settings.token_downsample > 1 else []
    out += ["diffusers: its process's allocator as it comes (--keep-memory is fewstep's)"] if settings.keep_memory else []
    out += vae_note(settings)
    return out


def vae_note(settings: Settings) -> list[str]:
    """Where the two VAEs run in different dtypes (`loading.dtypes.vae_dtype`): on a CPU fewstep keeps a force_upcast
    VAE (SD 1.x / 2.x / XL configs) in fp32 under --dtype fp16, and any full VAE in fp32 under bf16 without bf16
    hardware; diffusers' SD pipeline decodes in the dtype it is given (its SDXL pipeline upcasts as fewstep)."""
    if settings.decoder != "full" or settings.device.split(":")[0] != "cpu":
        return []
    if settings.dtype == "fp16":
        return ["VAE: fewstep decodes a force_upcast VAE in fp32 on a CPU (no fast fp16 convolutions); diffusers' "
                "SD pipeline decodes in fp16 (its SDXL pipeline upcasts too)"]
    if settings.dtype == "bf16" and not native_bf16(settings.device):
        return ["VAE: fewstep decodes in fp32 on a CPU without bf16 hardware; diffusers in bf16"]
    return []
