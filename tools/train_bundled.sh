#!/usr/bin/env bash
# Trains the two bundled models from scratch as two parallel chains (one thread each, about 60 minutes of
# wall time on 2 cores): the 5-class model and the binary road model. Tile 8 is held out for validation.
# Usage: tools/train_bundled.sh [DATA] [SCALE]   (SCALE multiplies every time budget; 1 = bundled run)
# IDGBR_DEVICE=cuda trains on a GPU (bfloat16 autocast) with larger batches.
#
# The refiner sees half real coarse maps (the coarse model's own predictions of the training tiles) and half
# synthetic boundary degradations of the truth. `idgbr train refiner --oof MODEL:TILES` takes out-of-fold
# maps instead where fold models exist; with 6-minute fold models on this CPU their maps were mostly
# semantic errors, which taught the refiner to overrule the coarse classes (see docs/MODEL_CARD.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/dubai-aerial}
SCALE=${2:-1}
PY=${PY:-.venv/bin/python}
RUNS=runs
mkdir -p "$RUNS" resources/models
m() { python3 -c "print(round($1 * $SCALE, 2))"; }
DEVICE=${IDGBR_DEVICE:-cpu}
if [ "$DEVICE" = cpu ]; then EXTRA=(--threads 1 --batch 8); else EXTRA=(--batch 32 --lr 3e-3); fi
train() { "$PY" -m idgbr.train "$@" --data "$DATA" --device "$DEVICE" --epochs 1000 "${EXTRA[@]}"; }

(
  train coarse --minutes "$(m 16)" -o $RUNS/dubai5_coarse.safetensors
  train refiner --coarse-model $RUNS/dubai5_coarse.safetensors --minutes "$(m 42)" -o resources/models/dubai5.safetensors
) > $RUNS/dubai5.log 2>&1 &
(
  train coarse --task binary --minutes "$(m 12)" -o $RUNS/roads2_coarse.safetensors
  train refiner --coarse-model $RUNS/roads2_coarse.safetensors --minutes "$(m 42)" -o resources/models/roads2.safetensors
) > $RUNS/roads2.log 2>&1 &
wait
echo "trained: resources/models/dubai5.safetensors resources/models/roads2.safetensors (logs in $RUNS/)"
echo "next: make evaluate (picks the sampler defaults and writes docs/MODEL_CARD.md)"
