"""The student's regression pool: teacher samples from known noise, kept only where the shapes
evaluator reads them as their captions.

DMD (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", sec. 3.3) adds to
its one-step generator's loss a regression onto pairs (noise z, the teacher's deterministic ODE sample
from z), so that the generator keeps the teacher's large-scale structure per noise instead of
collapsing onto a few modes. The shapes student's commonest one-step faults are large-scale ones (an
object drawn twice, two objects at each other's places; docs/log/2026-12-03-pairs-stage.md) that its per-step losses
judge poorly (the ADD discriminator sits at chance). Here the pairs are also filtered: a teacher
sample enters the pool only when the evaluator scores it right for its caption, so the student
regresses onto the teacher's correct layouts only.

`make_pool` writes OUT/pool/pool.safetensors: z [N, 4, h, w] (unit noise, the pipeline's initial
latents), x0 [N, 4, h, w] (the teacher's final latents) and ids [N, L] (the captions' tokens); the
student's `LatentData` adds POOL_ROWS of them to each batch (`pool_rows`) and `distill.ADD` regresses
its one-step prediction from z onto x0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..imaging import to_uint8
from ..shapes.data import batch
from ..shapes.evaluate import score
from .common import generator, seed_for
from .evaluate import run_pipeline
from .export import TEACHER_SCHEDULER
from .runs import pool_path, teacher_folder

POOL_SAMPLER, POOL_STEPS = "dpmpp_2m", 8  # deterministic: the target is a function of z; 8 steps keep as many
# samples right as 15 (the student no worse: docs/log/2026-12-05-two-process-recipe.md) in 55% of the time
POOL_GUIDANCE = 4.0  # the shipped student's pool; the teacher's own default moved to 5 after it was chosen
# (recipe.TEACHER_DEFAULTS); a pool drawn at 5 kept as many (5,065 of 6,144 against 5,086) and was not distilled from
POOL_ROWS = 8  # pool rows a student step (of its 32 batch rows), split over processes like the batch
POOL_SIZE = {"full": 6144, "tiny": 8}  # teacher samples drawn (the pool keeps the right ones)
POOL_MIX = (0.7, 0.3)  # fraction of two-object captions (what the one-step student gets wrong most), part drop


def rows_per_process(per_process: int, batch: int) -> int:
    """A process's share of a step's POOL_ROWS, as of its share of the batch (at least one): the regression sums
    over its pool rows over its batch rows, as the distillation does, so its weight does not grow with processes
    (two processes each drawing all 8 doubled it)."""
    return max(1, POOL_ROWS * per_process // batch)


@torch.no_grad()
def make_pool(run: Path, n: int, seed: int, mix: tuple[float, float] = POOL_MIX, chunk: int = 64,
              progress: bool = True) -> dict:
    """n teacher samples (the final teacher, OUT/swap; POOL_GUIDANCE) from seeded noise for captions
    drawn with `mix` (the renderer's `two`, `drop`); keeps the ones the evaluator scores right (all of them below 128x128,
    where it cannot read), writes them to `pool_path(run)` and returns the counts."""
    run = Path(run)
    pipe = run_pipeline(run, teacher_folder(run) / "unet", TEACHER_SCHEDULER, POOL_STEPS, POOL_GUIDANCE)
    seed = seed_for(seed, "pool", 0, 0)
    captions = batch(seed, n, size=32, drop=mix[1], two=mix[0])[1]
    side = pipe.unet.cfg.sample_size
    g = generator(seed)
    keep = {"z": [], "x0": [], "ids": []}
    for j in tqdm(range(0, n, chunk), desc="pool", disable=not progress):
        part = captions[j:j + chunk]
        z = torch.randn((len(part), pipe.unet.cfg.in_channels, side, side), generator=g)
        x0 = pipe(part, latents=z, sampler=POOL_SAMPLER, progress=False, output_type="latent")
        images = to_uint8(pipe.decode(x0))
        right = [score(c, im) for c, im in zip(part, images)] if images.shape[1] >= 128 else [True] * len(part)
        rows = torch.tensor(np.flatnonzero(right), dtype=torch.long)
        keep["z"].append(z[rows])
        keep["x0"].append(x0[rows].float())
        keep["ids"].append(pipe.tokenizers[0]([part[i] for i in rows.tolist()]).to(torch.int32))
    tensors = {k: torch.cat(v).contiguous() for k, v in keep.items()}
    if not len(tensors["z"]):
        raise FewstepError(f"pool: none of the teacher's {n} samples was right; train the teacher further")
    path = pool_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"sampler": POOL_SAMPLER, "steps": str(POOL_STEPS), "generated": str(n)})
    return {"generated": n, "kept": len(tensors["z"])}


class Pool:
    """The pool, and each batch's rows of it: `rows(seed, stage, step, rank)` draws `k` indices (with
    replacement) from that step's own seed, so a resumed run draws what the straight run drew."""

    def __init__(self, run: Path, k: int = POOL_ROWS):
        path = pool_path(run)
        if not path.is_file():
            raise FewstepError(f"no regression pool at {path}: run `fewstep train pool --out {run}` first")
        t = load_file(str(path))
        self.z, self.x0, self.ids = t["z"], t["x0"], t["ids"].long()
        self.k = k

    def rows(self, seed: int, stage: str, step: int, rank: int) -> torch.Tensor:
        g = generator(seed_for(seed, stage, step, rank) + 2)
        return torch.randint(0, len(self.z), (self.k,), generator=g)
