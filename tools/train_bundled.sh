#!/usr/bin/env bash
# Trains the two bundled models on the CPU in about 90 minutes of compute, as two parallel chains
# (one thread each): the 5-class model and the binary road model. Tile 8 is held out for validation.
# Usage: tools/train_bundled.sh [DATA] [SCALE]   (SCALE multiplies every time budget; 1 = bundled run)
# IDGBR_DEVICE=cuda trains on a GPU (bfloat16 autocast) with larger batches.
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
train() { "$PY" -m idgbr.train "$@" --data "$DATA" --device "$DEVICE" "${EXTRA[@]}"; }

# Out-of-fold coarse models: each sees half of the training tiles and predicts the other half.
train coarse --tiles tile1,tile2,tile3 --minutes "$(m 6)" --seed 1 -o $RUNS/fold_a.safetensors > $RUNS/fold_a.log 2>&1 &
train coarse --tiles tile4,tile5,tile6 --minutes "$(m 6)" --seed 2 -o $RUNS/fold_b.safetensors > $RUNS/fold_b.log 2>&1 &
wait
OOF=(--oof $RUNS/fold_a.safetensors:tile4,tile5,tile6 --oof $RUNS/fold_b.safetensors:tile1,tile2,tile3)
(
  train coarse --minutes "$(m 16)" -o $RUNS/dubai5_coarse.safetensors
  train refiner --coarse-model $RUNS/dubai5_coarse.safetensors "${OOF[@]}" --minutes "$(m 38)" \
    -o resources/models/dubai5.safetensors
) > $RUNS/dubai5.log 2>&1 &
(
  train coarse --task binary --minutes "$(m 12)" -o $RUNS/roads2_coarse.safetensors
  train refiner --coarse-model $RUNS/roads2_coarse.safetensors "${OOF[@]}" --minutes "$(m 30)" \
    -o resources/models/roads2.safetensors
) > $RUNS/roads2.log 2>&1 &
wait
echo "trained: resources/models/dubai5.safetensors resources/models/roads2.safetensors (logs in $RUNS/)"
