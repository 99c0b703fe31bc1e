#!/usr/bin/env bash
# Gather what the GPU benchmarks need into .bench_assets/ (git-ignored, carried to the
# GPU machine): Phi-2's configuration, a tokenizer, the TruthfulQA CSV, and wheels of
# the packages the GPU image lacks. Run from the repository root after the set-up.
set -euo pipefail
mkdir -p .bench_assets/phi2 .bench_assets/tokenizer .bench_assets/whl
grep -qx '/.bench_assets/' .git/info/exclude 2>/dev/null || echo '/.bench_assets/' >> .git/info/exclude
python - <<'PY'
import transformers as tf
from pipeline.config import ModelConfig
from pipeline.models.loading import load_model
tf.PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
             num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048,
             bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False).save_pretrained(".bench_assets/phi2")
load_model(ModelConfig(name="smollm2-135m")).tokenizer.save_pretrained(".bench_assets/tokenizer")
PY
cp ../shared/data/truthfulqa/TruthfulQA.csv .bench_assets/
for p in captum jsonargparse docstring-parser typeshed-client datasets dill multiprocess; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .bench_assets/whl "$p"
done
