"""`fewstep train STAGE --out DIR ...`: the shapes-turbo training recipe from the command line.

    fewstep train all --out runs/shapes                 # the whole recipe (about 2 h on 2 CPU cores)
    fewstep train teacher --out runs/shapes --resume    # one stage, continued from its checkpoint
    fewstep train refine --out runs/shapes --processes 1  # one process (the UNet stages' default: 2 on the CPU)
    accelerate launch --multi_gpu --num_processes 2 -m fewstep.train.cli vae --out runs/shapes  # 2 GPUs

Training runs on the GPU when there is one (`--cpu`: on the CPU anyway), one GPU per process under
`accelerate launch --multi_gpu`. (`accelerate launch --cpu` starts one process whatever --num_processes
says; `--multi_gpu` on a machine without GPUs starts N CPU processes through torchrun, which train
data-parallel over gloo.)

`fewstep.cli` wires `add_train_parser` / `cmd_train` in as the `train` subcommand; this module also
runs on its own (`python -m fewstep.train.cli`), which is what `accelerate launch` needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import FewstepError
from .controlnet import train_controlnet
from .lora import train_lora
from .recipe import ONE_PROCESS, STAGES, TEACHER_STAGES, run_all, run_stage


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=(*STAGES, "all", "lora", "controlnet"), help="one stage, or all of them in "
                   "order; lora: a LoRA for --base from the images and captions in --data (docs/lora.md); controlnet: "
                   "a ControlNet for --base on --condition maps of shapes scenes (docs/controlnet.md)")
    p.add_argument("--out", required=True, help="run folder: every stage reads and writes here (lora: the "
                   ".safetensors file to write; its checkpoints and logs go to OUT.train/ beside it)")
    p.add_argument("--base", default=None, help="lora, controlnet: the model to adapt (default: the built-in model)")
    p.add_argument("--condition", default=None, help="controlnet: the control map, layout (silhouettes) or canny "
                   "(edges)")
    p.add_argument("--data", default=None, help="lora: a folder of images, each with a same-named .txt caption")
    p.add_argument("--rank", type=int, default=8, help="lora: the rank of each adapter (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="lora: its alpha (default: the rank, a scale of 1)")
    p.add_argument("--text-encoder", action="store_true", help="lora: adapt the text encoder too (new words)")
    p.add_argument("--new-token", default=None, metavar="WORD", help="lora: also learn a one-vector "
                   "textual-inversion embedding for this new word (pivotal tuning), written as WORD.safetensors "
                   "beside --out")
    p.add_argument("--init-word", default=None, metavar="WORD", help="lora, --new-token: start its vector at this "
                   "word's (one token; default: the mean of the vocabulary's)")
    p.add_argument("--prior-preservation", nargs="?", const="", default=None, metavar="WORD", help="lora: "
                   "captions without WORD (default: --new-token's) regress the base model's own prediction (it "
                   "keeps what it drew)")
    p.add_argument("--caption-dropout", type=float, default=None, metavar="P", help="lora: probability a caption "
                   "is replaced by the empty prompt (kohya's caption_dropout_rate; default 0; 0.1 keeps a guided "
                   "model's unconditional branch, as its own training did)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of the stage (default: the recipe's)")
    p.add_argument("--batch", type=int, default=None, help="global batch size of the stage")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the stage")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (e.g. 0.1 for a trial)")
    p.add_argument("--workers", type=int, default=None, choices=(0, 1),
                   help="data worker processes (rendering and frozen encoders); default: per stage")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="training stages on the CPU: data-parallel processes to run the stage as (default: per stage; "
                   "all: the UNet stages)")
    p.add_argument("--stop-at", type=int, default=None, help="end after this step, checkpointed (continue "
                   "later with --resume): to train a stage in time slices")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint (all: skip finished stages)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where there is a GPU (default: "
                   "the GPU when there is one, one per process under accelerate launch)")
    p.add_argument("--tiny", action="store_true", help="tiny models and a few steps: a smoke test of "
                   "every stage (about 3 minutes for all on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-layers", type=int, default=None,
                   help="teacher: train the text encoder's last N layers with the UNet (default 0: frozen CLIP)")
    p.add_argument("--offset-noise", type=float, default=None,
                   help="teacher, lora: offset-noise std, a per-image per-channel constant added to the noise (default "
                   "0; diffusers' --noise_offset)")
    p.add_argument("--snr-gamma", type=float, default=None, metavar="G",
                   help="lora: weight the loss by min-SNR-G (Hang et al. 2023; diffusers' --snr_gamma; default: off). "
                   "The built-in teacher's own objective is --snr-gamma 5 --offset-noise 0.1")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="teacher, refine, pairs, swap: fine-tune the trained teacher in DIR (its unet/ and "
                   "text_encoder/, e.g. runs/shapes/teacher) instead of starting from random weights")
    p.add_argument("--two-objects", type=float, default=None, metavar="P",
                   help="teacher, refine, pairs, swap, student: fraction of training scenes with two objects "
                   "(default 0.5; pairs, swap: 0.8)")
    p.add_argument("--caption-drop", type=float, default=None, metavar="P",
                   help="teacher, refine, pairs, swap, student: probability each optional caption part is left out "
                   "(default 0.3; pairs, swap: 0.15)")
    p.add_argument("--swap", type=float, default=None, metavar="W",
                   help="teacher, refine, pairs, swap: weight of the swap contrast, which asks the denoising error "
                   "under a caption with the two objects' positions exchanged to exceed the true caption's (default 0; "
                   "swap: 1)")
    p.add_argument("--backward-sim", type=float, default=None, metavar="P", dest="backward",
                   help="student: share of the multi-step rows (t < 999) fed the student's own sampling chain instead "
                   "of a noised real latent (DMD2's backward simulation; default 1, the recipe's; 0: off)")
    p.add_argument("--one-step", type=float, default=None, metavar="P", dest="one_step",
                   help="student, controlnet on a few-step base: share of the batch rows trained at t = 999 (the "
                   "1-step case), the rest evenly at 749 / 499 / 249 (student default: the recipe's 0.7; controlnet: "
                   "even)")
    p.add_argument("--eval", type=int, default=200, dest="evaluate_n",
                   help="prompts to score the exported models on (0: skip)")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train the built-in shapes-turbo model (tokenizer, CLIP, VAE, "
                              "teacher, refine, pairs, swap, pool, ADD student) from scratch")
    _args(p)
    return p


def cmd_train(a: argparse.Namespace) -> None:
    if a.cpu:  # accelerate's own switch (`accelerate launch --cpu` sets it too), read by common.on_cpu
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if a.stage == "lora":
        return _lora(a)
    if (a.caption_dropout is not None or a.new_token or a.init_word or a.prior_preservation is not None
            or a.snr_gamma is not None):
        raise FewstepError("--caption-dropout, --new-token, --init-word, --prior-preservation and --snr-gamma are "
                           "options of the lora stage")
    if a.stage == "controlnet":
        return _controlnet(a)
    if a.condition is not None:
        raise FewstepError("--condition is an option of the controlnet stage")
    if a.base is not None or a.data is not None or a.text_encoder:
        raise FewstepError("--base, --data and --text-encoder are options of the lora stage")
    if a.processes is not None and a.processes < 1:
        raise FewstepError(f"--processes is 1 or more, not {a.processes}")
    if a.stage == "all":
        if any(v is not None for v in (a.steps, a.batch, a.lr, a.stop_at, a.text_layers, a.offset_noise, a.init,
                                       a.two_objects, a.caption_drop, a.swap, a.backward, a.one_step)):
            raise FewstepError("--steps/--batch/--lr/--stop-at/--text-layers/--offset-noise/--init/--two-objects/"
                               "--caption-drop/--swap/--backward-sim/--one-step apply to one stage; with 'all' use "
                               "--scale")
        report = run_all(a.out, a.tiny, a.seed, a.resume, a.scale, a.workers, a.evaluate_n, a.processes)
    else:
        over = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "workers": a.workers, "scale": a.scale,
                "stop_at": a.stop_at, "two_objects": a.two_objects, "caption_drop": a.caption_drop,
                "backward": a.backward, "one_step": a.one_step, "processes": a.processes}
        for flag, value in (("--two-objects", a.two_objects), ("--caption-drop", a.caption_drop),
                            ("--backward-sim", a.backward), ("--one-step", a.one_step)):
            if value is not None and not 0 <= value <= 1:
                raise FewstepError(f"{flag} is a probability between 0 and 1, not {value}")
        for flag, value in (("--two-objects", a.two_objects), ("--caption-drop", a.caption_drop)):
            if value is not None and a.stage not in (*TEACHER_STAGES, "student"):
                raise FewstepError(f"{flag} is an option of the teacher, refine, pairs, swap and student stages")
        teacher_only = {"text_layers": a.text_layers, "offset_noise": a.offset_noise, "init": a.init, "swap": a.swap}
        if a.stage not in TEACHER_STAGES and any(v is not None for v in teacher_only.values()):
            raise FewstepError("--text-layers, --offset-noise, --init and --swap are options of the teacher, refine, "
                               "pairs and swap stages")
        if a.swap is not None and a.swap < 0:
            raise FewstepError(f"--swap is a weight, 0 or more, not {a.swap}")
        for flag, value in (("--backward-sim", a.backward), ("--one-step", a.one_step)):
            if value is not None and a.stage != "student":
                raise FewstepError(f"{flag} is an option of the student stage")
        over.update(teacher_only)
        if a.stage in ONE_PROCESS:
            over = {}
        report = {a.stage: run_stage(a.stage, a.out, a.tiny, a.seed, a.resume, a.evaluate_n, **over)}
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("FEWSTEP_LAUNCHED"):  # one report, also
        # under `accelerate launch`; none from the processes recipe.launch starts (their caller reports)
        print(json.dumps(report, indent=2))


# options of the recipe's stages (teacher ... student, all) that lora and controlnet do not take
RECIPE_FLAGS = (("--workers", "workers"), ("--processes", "processes"), ("--tiny", "tiny"),
                ("--text-layers", "text_layers"), ("--offset-noise", "offset_noise"), ("--init", "init"),
                ("--two-objects", "two_objects"), ("--caption-drop", "caption_drop"), ("--swap", "swap"),
                ("--backward-sim", "backward"))


def _recipe_flags_refused(a: argparse.Namespace, takes: tuple[str, ...] = ()) -> None:
    """A one-line error for recipe options given to lora or controlnet (but those it `takes`), which would
    otherwise do nothing."""
    given = [flag for flag, dest in RECIPE_FLAGS
             if dest not in takes and getattr(a, dest) is not None and getattr(a, dest) is not False]
    given += ["--scale"] * (a.scale != 1.0)
    if given:
        several = (" (several processes: `accelerate launch --multi_gpu --num_processes N -m fewstep.train.cli "
                   f"{a.stage} ...`, docs/training.md)") if "--processes" in given else ""
        raise FewstepError(f"{', '.join(given)}: options of the recipe's stages, not of {a.stage}{several}")


def _lora(a: argparse.Namespace) -> None:
    _recipe_flags_refused(a, takes=("offset_noise",))
    if a.data is None:
        raise FewstepError("train lora needs --data FOLDER (images with same-named .txt captions)")
    if a.one_step is not None:
        raise FewstepError("--one-step is an option of the student and controlnet stages")
    if a.caption_dropout is not None and not 0 <= a.caption_dropout <= 1:
        raise FewstepError(f"--caption-dropout is a probability between 0 and 1, not {a.caption_dropout}")
    if a.snr_gamma is not None and not a.snr_gamma > 0:
        raise FewstepError(f"--snr-gamma is a number above 0, not {a.snr_gamma}")
    if a.offset_noise is not None and not a.offset_noise >= 0:
        raise FewstepError(f"--offset-noise is a standard deviation, 0 or more, not {a.offset_noise}")
    report = train_lora(a.base, a.data, a.out, rank=a.rank, alpha=a.alpha, text_encoder=a.text_encoder,
                        steps=a.steps or 1000, batch=a.batch or 16, lr=a.lr or 1e-3, seed=a.seed, resume=a.resume,
                        stop_at=a.stop_at, caption_dropout=a.caption_dropout or 0.0, new_token=a.new_token,
                        init_word=a.init_word, prior=_prior_word(a), snr_gamma=a.snr_gamma,
                        noise_offset=a.offset_noise or 0.0)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, indent=2))


def _prior_word(a: argparse.Namespace) -> str | None:
    """--prior-preservation's word: the one given, or --new-token's."""
    if a.prior_preservation == "" and not a.new_token:
        raise FewstepError("--prior-preservation needs the concept's word: --prior-preservation WORD, or --new-token")
    if a.prior_preservation is None:
        return None
    return a.prior_preservation or a.new_token


def _controlnet(a: argparse.Namespace) -> None:
    _recipe_flags_refused(a)
    if a.condition is None:
        raise FewstepError("train controlnet needs --condition layout or --condition canny")
    if a.data is not None or a.text_encoder:
        raise FewstepError("--data and --text-encoder are options of the lora stage")
    if a.one_step is not None and not 0 <= a.one_step <= 1:
        raise FewstepError(f"--one-step is a probability between 0 and 1, not {a.one_step}")
    report = train_controlnet(a.base, a.condition, a.out, steps=a.steps or 2000, batch=a.batch or 16,
                              lr=a.lr or 1e-4, seed=a.seed, resume=a.resume, stop_at=a.stop_at,
                              one_step=a.one_step)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewstep train", description="train shapes-turbo from scratch")
    _args(parser)
    try:
        cmd_train(parser.parse_args(argv))
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
