#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (DEVELOPERS.md, "GPU checks"): golden vectors on the
# device, device waits per sampler step, our sampler against the plain DifFace-style loop, the full
# method at the paper's settings (s/face, share of the bf16 peak, peak memory), the `train complete`
# stages' step time and peak memory, and the speed options.
# Needs only the repository and the machine's python3 with torch (benchmarks/gpu_requirements.txt);
# every step runs in its own process under its own time limit, a failed step is reported and the
# others still run, and the whole takes at most 8 minutes. Results under $OUT (./out/gpu when unset):
# summary.txt, one <step>.txt per step (a few share one) and results.jsonl (one JSON line per step).
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same script on this CPU at tiny sizes (CI, tests)
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 AWS_EC2_METADATA_DISABLED=true
if (( SMOKE )); then DEVICE=cpu; FLAGS=(--smoke); else DEVICE=cuda; FLAGS=(); fi

# Packages carried as wheels in .whl/ (none are needed today: gpu_requirements.txt) go to a private folder.
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$SITE" || echo "WARNING: installing the carried wheels failed"
fi

# step, time limit in seconds (the sum stays under 8 minutes: 460 s). Never measured on a GPU yet: the
# limits are estimates for an H200 (a cold start and the imports inside each); loops, full, train,
# options and compile watch their budget and skip rows that would not fit, so they shrink gracefully.
STEPS=(env golden syncs loops full train options compile)
LIMITS=(30 40 25 55 95 80 35 100)
SUMMARY="$OUT/summary.txt"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
{
  echo "gpu_check $(date -u +%FT%TZ) on $(hostname), device $DEVICE$( ((SMOKE)) && echo ' (cpu smoke: tiny sizes)')"
  echo "plan (step: time limit):"
  for i in "${!STEPS[@]}"; do echo "  ${STEPS[$i]}: ${LIMITS[$i]} s"; done
  echo "  total at most $(( $(IFS=+; echo "${LIMITS[*]}") )) s"
  (( SMOKE )) || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
} | tee "$SUMMARY"

declare -a STATUS
for i in "${!STEPS[@]}"; do
  step=${STEPS[$i]} limit=${LIMITS[$i]}
  file="$OUT/$step.txt"
  # options and compile share a file, so do full and train; env writes into the summary (at most 8
  # files come back from the device tool: this leaves one spare).
  [[ $step == compile ]] && file="$OUT/options.txt"
  [[ $step == train ]] && file="$OUT/full.txt"
  [[ $step == env ]] && file="$SUMMARY"
  echo "== $step (limit $limit s)" | tee -a "$file"
  start=$SECONDS
  timeout --kill-after=5 "$limit" "$PY" benchmarks/gpu_check.py "$step" "${FLAGS[@]}" --device "$DEVICE" \
    --budget $(( limit - 8 )) --results "$RESULTS" 2>&1 | tee -a "$file"
  rc=${PIPESTATUS[0]}
  took=$(( SECONDS - start ))
  case $rc in
    0) STATUS[$i]="ok       ${took}s" ;;
    124|137) STATUS[$i]="TIMEOUT  ${took}s (limit $limit s)" ;;
    *) STATUS[$i]="FAILED   ${took}s (exit $rc)" ;;
  esac
done

{
  echo
  echo "== summary"
  for i in "${!STEPS[@]}"; do printf '  %-8s %s\n' "${STEPS[$i]}" "${STATUS[$i]}"; done
} | tee -a "$SUMMARY"
for s in "${STATUS[@]}"; do [[ $s == ok* ]] || exit 1; done
exit 0
