#!/usr/bin/env bash
# The GPU rows of docs/BENCHMARKS.md: SD-Turbo and SDXL-Turbo architectures with
# random weights, 512x512, 1 step, batch 1, end to end (text encode + UNet + decode, no load), fewstep
# against diffusers fp16 + SDPA eager in the same run, then fewstep's compiled paths (cold and warm
# compile). Each row is one `fewstep bench ... --json` (each library in fresh processes); rows run in
# order of importance, each under its own time limit, so a short lease still returns the first ones.
#
#     bash scripts/measure/gpu.sh OUTDIR        (env: DEVICE=cuda RES=512 RUNS=10 WARMUP=3 ROW_LIMIT=150 ROWS="g1 g2 ...")
#
# Rows t1 and t2 (not in the default ROWS) train the shapes recipe on the GPU instead: ROWS="t1 t2".
#
# Needs diffusers (the comparison) and the real configs: FEWSTEP_SHARED_DATA=DIR holding configs/<arch>/
# and taesd/ (default ../shared/data). Writes OUTDIR/<row>.json and OUTDIR/gpu.log.
set -uo pipefail
out=${1:?usage: bash scripts/measure/gpu.sh OUTDIR}
mkdir -p "$out"
DEVICE=${DEVICE:-cuda} RES=${RES:-512} RUNS=${RUNS:-10} WARMUP=${WARMUP:-3} ROW_LIMIT=${ROW_LIMIT:-150}
ROWS=${ROWS:-"g1 g2 g4 g7 g5 g3 g6"}
data=${FEWSTEP_SHARED_DATA:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data}
py=${PYTHON:-python3}
log="$out/gpu.log"
common=(--resolution "$RES" --steps 1 --batch 1 --device "$DEVICE" --dtype fp16 --runs "$RUNS" --warmup "$WARMUP")
{
  date -u +"%F %T UTC"
  $py -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version());
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} 2>&1 | tee -a "$log"

row() {  # row NAME ARGS...: one `fewstep bench` under the time limit
  local name=$1; shift
  echo "== $name: fewstep bench $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$ROW_LIMIT" $py -m fewstep.cli bench "$@" --json "$out/$name.json" 2>&1 | tee -a "$log"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$log"
}

train_row() {  # train_row NAME ARGS...: `fewstep train all` under the time limit, then each stage's s/step
  local name=$1; shift
  echo "== $name: fewstep train all $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$ROW_LIMIT" $py -m fewstep.cli train all --out "$out/$name" --eval 0 "$@" 2>&1 | tail -n 40 | tee -a "$log"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$log"
  $py - "$out/$name" <<'PY' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path
for log in sorted(Path(sys.argv[1], "logs").glob("*.jsonl")):
    last = json.loads(log.read_text().splitlines()[-1])
    print(f"{log.stem}: {last['step']} steps in {last['time']} s = {last['time'] / last['step']:.4f} s/step")
PY
}

for r in $ROWS; do
  case $r in
    # (g1) both stacks fp16, full VAE, eager (on a GPU both decode SD 1.x/2.x VAEs in fp16 since 8fb9521; the
    # 2026-12-04 rows predate it: fewstep decoded in fp32 there)
    g1) row g1 --random-weights sd-turbo "${common[@]}" --compare diffusers ;;
    # (g2) both with the tiny decoder (TAESD; diffusers' AutoencoderTiny)
    g2) row g2 --random-weights sd-turbo "${common[@]}" --decoder "$data/taesd" --compare diffusers ;;
    # (g3) fewstep compiled (regional, default mode) + channels_last + fused q/k/v, tiny decoder: cold and warm compile
    g3) row g3 --random-weights sd-turbo "${common[@]}" --decoder "$data/taesd" --channels-last --fuse-qkv --compile ;;
    # (g4) the same with CUDA graphs (reduce-overhead)
    g4) row g4 --random-weights sd-turbo "${common[@]}" --decoder "$data/taesd" --channels-last --fuse-qkv --compile \
          --compile-mode reduce-overhead ;;
    # (g5) SDXL-Turbo, both fp16, full VAE, eager
    g5) row g5 --random-weights sdxl-turbo "${common[@]}" --compare diffusers ;;
    # (g6) fewstep compiled, full VAE (the 15 ms point)
    g6) row g6 --random-weights sd-turbo "${common[@]}" --channels-last --fuse-qkv --compile ;;
    # (g7) the same with CUDA graphs
    g7) row g7 --random-weights sd-turbo "${common[@]}" --channels-last --fuse-qkv --compile \
          --compile-mode reduce-overhead ;;
    # (t1) the training recipe on the GPU, tiny sizes: every stage's GPU path runs (seconds)
    t1) train_row t1 --tiny ;;
    # (t2) the real sizes for 2% of each stage's steps: seconds per step of each stage on the GPU, from which the
    # whole recipe's GPU time is estimated (the pool and the closing checks run on the CPU)
    t2) train_row t2 --scale 0.02 ;;
    *) echo "unknown row $r" | tee -a "$log" ;;
  esac
done
