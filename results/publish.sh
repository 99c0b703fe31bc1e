#!/usr/bin/env bash
# The commands that produced results/. Run from the repository root after the README's
# set-up, with ../shared/data present. About 3 hours on a 2-core CPU; a killed run
# resumes where it stopped (records gzipped below are read back as finished samples). The
# published folders predate numbers_version (README.md there): redo them into fresh folders.
set -euo pipefail
sparseact sweep --config configs/paper/slm_sweep.yaml
# IG (20 steps) ran on one H200 with the same code, one run per dataset (batch size 8):
#   sparseact run --config configs/paper/truthfulqa.yaml --model.template auto --run.batch_size 8 \
#       --run.output_dir results/paper_ig/smollm2-135m__truthfulqa_0-100_gpu
#   sparseact run --config configs/paper/gsm8k.yaml --model.template auto --run.batch_size 8 \
#       --run.output_dir results/paper_ig/smollm2-135m__gsm8k_0-100_gpu
# Scores x allocations (results/allocation) ran on one H200 with the same code (fp32, GPU blocks of 64):
#   sparseact sweep --config configs/sweep/allocation.yaml --run.accelerator gpu --root results/allocation
# lm-eval (results/lm_eval) ran on the same H200, cells 14 at a time, with --device cuda --batch_size 32:
#   bash results/lm_eval/run.sh --device cuda --batch_size 32
#   (then: gzip -9 the samples_*.jsonl of each cell; results/lm_eval/summarize.py reads them either way)
shopt -s nullglob  # nothing to compress once every run is published
for f in results/paper_*/*/records.jsonl results/allocation/*/records.jsonl; do gzip -9f "$f"; done
sparseact report --runs '[results/paper_slm, results/paper_ig, results/allocation]' --output results/report
python results/claims.py
