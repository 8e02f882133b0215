#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see DEVELOPERS.md): everything GPU-related at once,
# results under $OUT (or ./out/gpu when OUT is unset). Assumes torch with CUDA is importable there.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$(pwd)
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
# 1. The sampler benchmark at 512² in fp32 and bf16 (dps and closed_form, batch 1 and the largest batch).
python benchmarks/sampler_step.py --device cuda --steps 5 --max-batch 32 2>&1 | tee "$OUT/sampler_step_cuda_fp32.txt"
python benchmarks/sampler_step.py --device cuda --steps 5 --max-batch 32 --precision bf16 2>&1 \
  | tee "$OUT/sampler_step_cuda_bf16.txt"
# 2. Golden forward tests of both networks on CUDA with TF32 off (the golden README's tier B).
python benchmarks/golden_device.py --device cuda 2>&1 \
  | tee "$OUT/golden_cuda.txt"
