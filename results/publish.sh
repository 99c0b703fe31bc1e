#!/usr/bin/env bash
# The commands that produced results/. Run from the repository root after the README's
# set-up, with ../shared/data present. About 3 hours on a 2-core CPU; a killed run
# resumes where it stopped (records gzipped below are read back as finished samples).
set -euo pipefail
sparseact sweep --config configs/paper/slm_sweep.yaml
# IG (20 steps) ran on one H200 with the same code, one run per dataset (batch size 8):
#   sparseact run --config configs/paper/truthfulqa.yaml --model.template auto --run.batch_size 8 \
#       --run.output_dir results/paper_ig/smollm2-135m__truthfulqa_0-100_gpu
#   sparseact run --config configs/paper/gsm8k.yaml --model.template auto --run.batch_size 8 \
#       --run.output_dir results/paper_ig/smollm2-135m__gsm8k_0-100_gpu
shopt -s nullglob  # nothing to compress once every run is published
for f in results/paper_*/*/records.jsonl; do gzip -9f "$f"; done
sparseact report --runs '[results/paper_slm, results/paper_ig]' --output results/report
python results/claims.py
