#!/usr/bin/env bash
# Issue 13's table: SmolLM2-135M and Gemma-3-270M on TruthfulQA MC1/MC2 (first 200
# questions) and GSM8K (first 50), levels 0 / 0.3 / 0.5 / 0.7 for magnitude, wina and
# cor_gxo, per_layer allocation; then summary.md with 95% bootstrap intervals and
# fidelity to the dense model next to task accuracy.
#
# The grid is the sweep file configs/sweep/lm_eval.yaml (one `sparseact lmeval` run per
# model x task set x score x level, under $ROOT); this script runs that sweep and summarises it.
#
#   bash results/lm_eval/run.sh                                        # the full grid
#   ROOT=/tmp/try bash results/lm_eval/run.sh --models '[{name: smollm2-135m}]'   # one model
#   bash results/lm_eval/run.sh --slurm true                           # write the cells for slurm/array.sbatch
#
# A rerun skips finished cells (results.json) and a killed cell redoes no finished request
# (each cell's run directory holds lm-eval's request cache). The published cells predate
# numbers_version (results/README.md): the sweep refuses them, so redo the grid under another ROOT. Extra arguments go to
# `sparseact sweep` (e.g. --models '[{name: smollm2-135m, dtype: bfloat16}]'); device and
# batch size are per task set in the sweep file (copy it and pass --config yours.yaml).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-results/lm_eval/runs}
PY=${PY:-python}
$PY -m pipeline sweep --config configs/sweep/lm_eval.yaml --root "$ROOT" "$@"
case " $* " in *" --slurm true "*|*" --slurm=true "*) exit 0 ;; esac
$PY results/lm_eval/summarize.py "$ROOT" > results/lm_eval/summary.md
cat results/lm_eval/summary.md
