#!/usr/bin/env bash
# Issue 13's table: SmolLM2-135M and Gemma-3-270M on TruthfulQA MC1/MC2 (first 200
# questions) and GSM8K (first 50), levels 0 / 0.3 / 0.5 / 0.7 for magnitude, wina and
# cor_gxo, per_layer allocation; then summary.md with 95% bootstrap intervals and
# fidelity to the dense model next to task accuracy.
#
#   bash results/lm_eval/run.sh                       # the full grid
#   TQA=5 GSM=2 MODELS=smollm2-135m bash results/lm_eval/run.sh   # a few documents, to try it
#
# A killed run rerun with the same command redoes no finished request (each cell's
# run directory holds lm-eval's request cache). Extra arguments go to every cell
# (e.g. --device cuda --model.dtype bfloat16 --batch_size 16).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-results/lm_eval/runs}
TQA=${TQA:-200}
GSM=${GSM:-50}
MODELS=${MODELS:-"smollm2-135m gemma3-270m"}
SCORES=${SCORES:-"magnitude wina cor_gxo"}
LEVELS=${LEVELS:-"0.3 0.5 0.7"}
PY=${PY:-python}

cell() {  # model score level tasks limit name
  $PY -m pipeline lmeval --model.name "$1" --score "$2" --level "$3" --tasks "$4" --limit "$5" \
      --output_dir "$ROOT/$1/$6/$2-$3-per_layer" "${@:7}"
}
for model in $MODELS; do
  # level 0 is the dense model whatever the score: one run per task set
  cell "$model" wina 0.0 "[truthfulqa_mc1_local, truthfulqa_mc2_local]" "$TQA" truthfulqa "$@"
  cell "$model" wina 0.0 "[gsm8k_local]" "$GSM" gsm8k "$@"
  for score in $SCORES; do
    for level in $LEVELS; do
      cell "$model" "$score" "$level" "[truthfulqa_mc1_local, truthfulqa_mc2_local]" "$TQA" truthfulqa "$@"
      cell "$model" "$score" "$level" "[gsm8k_local]" "$GSM" gsm8k "$@"
    done
  done
done
$PY results/lm_eval/summarize.py "$ROOT" > results/lm_eval/summary.md
cat results/lm_eval/summary.md
