#!/usr/bin/env bash
# Trains the bundled models from scratch on the CPU: the coarse segmenters first (minutes), then the two
# refiners for hours, one thread each, in parallel. Tile 8 and Accra val/ are held out for validation.
# Usage: tools/train_bundled.sh DATA ACCRA [SCALE]   (SCALE multiplies every budget; 1 = the bundled run)
#
# The refiners checkpoint every 5 minutes and resume: run it again with RESUME=1 to continue a run (from
# runs/*.state.pt, or where that is gone from the shipped model files). Their schedules span ITERATIONS
# iterations in all; HOURS ends this run's part (default 2.5).
#   - dubai5: the 5-class refiner, on the coarse CNN's and a pixel classifier's maps of tiles 1-6 and on
#     synthetic errors of the truth;
#   - binary2: one binary refiner for roads2 and buildings2, on road and building scenes of Dubai and the
#     Accra drone tiles at ~0.1 and ~0.2 m; real maps from the 5-class CNN's road and building classes.
# IDGBR_DEVICE=cuda trains on a GPU with larger batches.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/dubai-aerial}
ACCRA=${2:-../shared/datasets/accra-buildings}
SCALE=${3:-1}
PY=${PY:-.venv/bin/python}
RUNS=runs
MODELS=resources/models
ITERATIONS=${ITERATIONS:-6000}
HOURS=${HOURS:-2.5}
mkdir -p "$RUNS" "$MODELS"
m() { python3 -c "print(round($1 * $SCALE, 2))"; }
DEVICE=${IDGBR_DEVICE:-cpu}
if [ "$DEVICE" = cpu ]; then EXTRA=(--threads 1 --batch 8); else EXTRA=(--batch 32); fi
coarse() { "$PY" -m idgbr.train coarse --data "$DATA" --device "$DEVICE" --epochs 1000 "${EXTRA[@]}" "$@"; }
refiner() {
  local name=$1; shift
  local resume=()
  if [ "${RESUME:-0}" = 1 ]; then resume=(--resume --warm-start "$MODELS/$name.safetensors"); fi
  "$PY" -m idgbr.train refiner --data "$DATA" --device "$DEVICE" --iterations "$ITERATIONS" \
    --minutes "$(m "$HOURS * 60")" "${EXTRA[@]}" "${resume[@]}" "$@"
}

if [ "${RESUME:-0}" != 1 ]; then
  coarse --minutes "$(m 16)" -o $RUNS/dubai5_coarse.safetensors > $RUNS/dubai5_coarse.log 2>&1 &
  coarse --task binary --minutes "$(m 12)" -o $RUNS/roads2_coarse.safetensors > $RUNS/roads2_coarse.log 2>&1 &
  wait
  coarse --task buildings --accra "$ACCRA" --minutes "$(m 30)" --seed 2 -o $RUNS/buildings2_coarse.safetensors \
    > $RUNS/buildings2_coarse.log 2>&1
else
  # The coarse parts live on in the shipped model files.
  cp "$MODELS/dubai5.safetensors" $RUNS/dubai5_coarse.safetensors
  cp "$MODELS/roads2.safetensors" $RUNS/roads2_coarse.safetensors
  cp "$MODELS/buildings2.safetensors" $RUNS/buildings2_coarse.safetensors
fi
refiner dubai5 --coarse-model $RUNS/dubai5_coarse.safetensors --pixel-classifier \
  -o $RUNS/dubai5_refiner.safetensors > $RUNS/dubai5_refiner.log 2>&1 &
refiner roads2 --coarse-model $RUNS/roads2_coarse.safetensors --coarse-source $RUNS/dubai5_coarse.safetensors \
  --accra "$ACCRA" -o $RUNS/binary2_refiner.safetensors > $RUNS/binary2_refiner.log 2>&1 &
wait
"$PY" tools/assemble_model.py $RUNS/dubai5_refiner.safetensors -o $MODELS/dubai5.safetensors
"$PY" tools/assemble_model.py $RUNS/binary2_refiner.safetensors -o $MODELS/roads2.safetensors
"$PY" tools/assemble_model.py $RUNS/binary2_refiner.safetensors --coarse $RUNS/buildings2_coarse.safetensors \
  -o $MODELS/buildings2.safetensors
echo "trained: $MODELS/dubai5, roads2, buildings2 (logs in $RUNS/); next: make evaluate"
