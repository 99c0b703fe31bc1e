#!/usr/bin/env bash
# One device call's worth of end-to-end measurements (issue 14), run from the copy of the
# worktree on the GPU machine: the current code with every lever, each lever switched off,
# and the code before the speed work (base/, a copy of its pipeline/) as the baseline.
# Logs and JSON go to $OUT. Usage: bash benchmarks/gpu_session.sh [questions] [full|short]
# (short: the current code only, with the cuDNN levers, Phi-2 and SmolLM2 shapes)
set -u
Q=${1:-256}
A=(--tokenizer .bench_assets/tokenizer --data .bench_assets/TruthfulQA.csv --max-new-tokens 16 --dtype bfloat16 --no-record)
E2E="python3 benchmarks/end_to_end.py"
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T))"
  if [ "${BASE:-0}" = 1 ]; then
    PYTHONPATH=/tmp/site:$PWD/base:$PWD timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"
  else
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"
  fi
  grep -v "Warning\|warn(" "$OUT/$name.log" | grep -A3 "^\[\|^pipeline from\|Error\|error" | tail -40
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
if [ "${2:-full}" = final ]; then
  step phi2_final 115 $E2E --config .bench_assets/phi2 "${A[@]}" --questions "$Q" --json "$OUT/phi2_final.json" \
    --variants all
  step smol_final 75 $E2E --config .bench_assets/smollm2 "${A[@]}" --questions "$Q" --json "$OUT/smol_final.json" \
    --variants all
  exit 0
fi
if [ "${2:-full}" = short ]; then
  step phi2_new 170 $E2E --config .bench_assets/phi2 "${A[@]}" --questions "$Q" --json "$OUT/phi2_new.json" \
    --variants all off:no_cudnn+no_cudnn_attribution
  step smol_new 110 $E2E --config .bench_assets/smollm2 "${A[@]}" --questions "$Q" --json "$OUT/smol_new.json" \
    --variants all off:no_cudnn+no_cudnn_attribution
  exit 0
fi
step phi2_new 140 $E2E --config .bench_assets/phi2 "${A[@]}" --questions "$Q" --json "$OUT/phi2_new.json" \
  --variants all off:dense_graphs off:batch64 off:keep_on_device
step smol_new 70 $E2E --config .bench_assets/smollm2 "${A[@]}" --questions "$Q" --json "$OUT/smol_new.json" --variants all
step phi2_nogroups 70 $E2E --config .bench_assets/phi2 "${A[@]}" --questions "$Q" --json "$OUT/phi2_nogroups.json" \
  --variants off:masked_groups
BASE=1 step phi2_base 110 $E2E --config .bench_assets/phi2 "${A[@]}" --questions "$Q" --json "$OUT/phi2_base.json"
BASE=1 step smol_base 75 $E2E --config .bench_assets/smollm2 "${A[@]}" --questions "$Q" --json "$OUT/smol_base.json"
