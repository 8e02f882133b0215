#!/usr/bin/env bash
# Train a starter pack on a lent GPU (DEVELOPERS.md, "GPU training"): a quick smoke run first (seconds),
# then the real one; the pack comes back under $OUT as pack.tgz.* pieces (the tool returns files of at
# most 16 MiB). Needs the staged faces: carry out/train_faces (scripts/stage_training_faces.py).
# RM trains on fresh degradations made by 10 of the 16 cores: at the GPU's step count it would overfit the
# CPU recipe's fixed pool (dynface.train.fresh_pairs).
#   RES (default 128), BUDGET minutes for all stages together (default 6), STEPS_SCALE (default 20),
#   REUSE_PRIOR (a pack folder, optional).
set -uo pipefail
OUT=${OUT:-out/gpu_train}
RES=${RES:-128}
BUDGET=${BUDGET:-6}
STEPS_SCALE=${STEPS_SCALE:-20}
DATA=${DATA:-out/train_faces}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$(pwd)
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
test -f "$DATA/MANIFEST.csv" || { echo "no staged faces in $DATA (carry it)"; exit 2; }
python3 scripts/train_starter.py /tmp/quick_pack --quick --device cuda --data-dir "$DATA" --no-progress \
  --rm-pairs fresh --pair-workers 2 \
  > "$OUT/quick.log" 2>&1 || { tail -40 "$OUT/quick.log"; exit 1; }
echo "quick run ok"
# How many cores fresh pairs need beside the GPU's RM step (~30 s; for choosing --pair-workers next time).
python3 benchmarks/fresh_pairs.py --workers 0 4 10 --device cuda --threads 4 > "$OUT/fresh_pairs.txt" 2>&1
extra=()
if [ -n "${REUSE_PRIOR:-}" ]; then extra+=(--reuse-prior "$REUSE_PRIOR"); fi
python3 scripts/train_starter.py /tmp/pack --resolution "$RES" --budget-minutes "$BUDGET" \
  --steps-scale "$STEPS_SCALE" --device cuda --threads 4 --data-dir "$DATA" --no-progress \
  --rm-pairs fresh --pair-workers 10 \
  --work-dir /tmp/work "${extra[@]}" \
  --note "Trained on a lent GPU by benchmarks/gpu_train_starter.sh (RES=$RES, BUDGET=$BUDGET min, STEPS_SCALE=$STEPS_SCALE)." \
  2>&1 | tee "$OUT/train.log"
tar -C /tmp -czf - pack | split -b 15M - "$OUT/pack.tgz."
ls -la "$OUT"
