#!/usr/bin/env bash
# Copy a finished `fewstep train all --out RUN` into the package as the built-in models:
# fewstep/assets/shapes-turbo (the default), shapes-teacher, and the tiny-CLIP scorer used by `fewstep eval`.
set -euo pipefail
run=${1:?usage: scripts/ship_model.sh RUN_FOLDER}
cd "$(dirname "$0")/.."
for f in shapes-turbo/model_index.json shapes-teacher/model_index.json clip/image_tower.safetensors tokenizer/vocab.json; do
  [ -f "$run/$f" ] || { echo "error: $run/$f is missing (has the recipe finished?)" >&2; exit 2; }
done
rm -rf fewstep/assets.part && mkdir -p fewstep/assets.part/shapes-clip/clip
cp -rL "$run/shapes-turbo" "$run/shapes-teacher" fewstep/assets.part/
cp -rL "$run/clip/text_encoder" "$run/clip/image_tower.safetensors" "$run/clip/image_tower.json" fewstep/assets.part/shapes-clip/clip/
cp -rL "$run/tokenizer" fewstep/assets.part/shapes-clip/tokenizer
rm -rf fewstep/assets && mv fewstep/assets.part fewstep/assets
du -sh fewstep/assets/*
