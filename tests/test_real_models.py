"""The bundled real SLMs, end to end on a couple of questions (skipped when not installed)."""

import importlib.metadata as metadata
import json

import pytest

from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig
from pipeline.models.loading import BUNDLED
from pipeline.results.record import Record
from pipeline.runner.run import evaluate


def _installed(name):
    try:
        metadata.distribution(BUNDLED[name].package)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_bundled_model_end_to_end(name, tmp_path):
    if not _installed(name):
        pytest.skip(f"{BUNDLED[name].package} not installed")
    out = evaluate(
        ModelConfig(name=name),
        DataConfig(limit=2),
        ProtocolConfig(metrics=["magnitude", "cor_gxo"], levels=[0.0, 0.5], max_new_tokens=12),
        RunConfig(output_dir=str(tmp_path / "run"), progress=False),
    )
    records = [Record.from_json(json.loads(line)) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2
    for r in records:
        assert r.dense_output  # the model says something
        if r.level == 0.0:
            assert r.bleu == 100.0 and r.token_agreement == 1.0
        else:
            assert 0.3 < r.sparsity < 0.6


def test_character_level_gguf_tokenizer_is_refused():
    """transformers 5.17 converts Gemma-3's GGUF tokenizer letter by letter; that must stop the load."""
    from pipeline.errors import UserError
    from pipeline.models.loading import check_gguf_tokenizer

    class Letters:
        def __call__(self, text, add_special_tokens=True):
            return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    class Words:
        def __call__(self, text, add_special_tokens=True):
            return type("Encoding", (), {"input_ids": list(range(len(text.split()) + 1))})()

    check_gguf_tokenizer(Words(), "gemma3-270m")
    with pytest.raises(UserError, match="character by character"):
        check_gguf_tokenizer(Letters(), "gemma3-270m")
