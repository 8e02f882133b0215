#!/usr/bin/env bash
# benchmarks/gpu_check.sh --cpu-smoke under the lent GPU machine's versions, on this CPU: Python 3.12,
# torch 2.11.0 (its CUDA build, which runs on a CPU too), numpy 2.5.2, safetensors 0.8.0 (the device
# tool's KINDS.md, read 2026-11). Our own venv has Python 3.11 and torch 2.13, so an API that moved
# between the two would first show on the GPU machine, in its 15 minutes; this shows it here instead.
# Also runs the full-size golden cases and, with COMPILE=1, the compile step (about 5 minutes).
# The venv takes about 2.4 GB and 3 minutes of downloads from the package registry, once.
#
#   bash benchmarks/gpu_image_smoke.sh                 # venv in out/venv-gpu-image, results in out/gpu-image
#   PY312=/path/to/python3.12 COMPILE=1 bash benchmarks/gpu_image_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/out/venv-gpu-image}
OUT=${OUT:-$ROOT/out/gpu-image}
PY312=${PY312:-python3.12}
PINS=(torch==2.11.0 numpy==2.5.2 safetensors==0.8.0 pillow pyyaml fsspec psutil tqdm typing_extensions)

if [[ ! -x $VENV/bin/python ]]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
fi
BARE=$(mktemp -d)
trap 'rm -rf "$BARE"' EXIT
git archive HEAD | tar -x -C "$BARE"  # only what is committed travels, as with the device tool
mkdir -p "$OUT"
# a clean environment: nothing of ours on PYTHONPATH, no ../shared beside the copy
run() { env -i PATH=/usr/bin:/bin HOME="$BARE" PYTHONPATH="$BARE" "$@"; }
cd "$BARE"
status=0
run PYTHON="$VENV/bin/python" OUT="$OUT" bash benchmarks/gpu_check.sh --cpu-smoke || status=1
run "$VENV/bin/python" benchmarks/golden_device.py --device cpu --full | tee "$OUT/golden_full.txt" || status=1
if [[ ${COMPILE:-0} == 1 ]]; then
  run SMOKE_COMPILE=1 "$VENV/bin/python" benchmarks/gpu_check.py compile --smoke --device cpu --budget 500 \
    | tee "$OUT/compile.txt" || status=1
fi
exit $status
