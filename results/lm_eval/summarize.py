"""Summarise ``results/lm_eval/run.sh``'s run directories: task accuracy with 95% bootstrap
intervals over documents, next to fidelity to the dense (level 0) run of the same model.

Fidelity: TruthfulQA MC1/MC2, the fraction of questions whose highest-likelihood choice is
the dense model's; GSM8K, sentence BLEU of the generated text against the dense text
(100 when identical). Accuracy: MC1 acc, MC2 acc (probability mass of true answers),
GSM8K exact match of the last number (flexible-extract).

    python results/lm_eval/summarize.py results/lm_eval/runs > results/lm_eval/summary.md
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

METRIC = {"truthfulqa_mc1_local": ("acc", "none"), "truthfulqa_mc2_local": ("acc", "none"),
          "gsm8k_local": ("exact_match", "flexible-extract")}


def interval(values, seed: int = 0, draws: int = 2000) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(1)
    return values.mean(), *np.percentile(means, [2.5, 97.5])


def _samples_path(run: Path, task: str) -> Path | None:
    """lm-eval's samples of one task: as written, or gzipped as published."""
    for name in (f"samples_{task}.jsonl", f"samples_{task}.jsonl.gz"):
        if (run / name).exists():
            return run / name
    return None


def _samples_text(run: Path, task: str) -> str:
    path = _samples_path(run, task)
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()


def per_doc(run: Path, task: str) -> dict[str, dict]:
    metric, filt = METRIC[task]
    out = {}
    for line in _samples_text(run, task).splitlines():
        sample = json.loads(line)
        if sample["filter"] != filt:
            continue
        resps = sample["filtered_resps"] if task != "gsm8k_local" else sample["resps"][0][0]
        choice = int(np.argmax([r[0] for r in resps])) if task != "gsm8k_local" else None
        out[sample["doc_id"]] = {"score": float(sample[metric]), "choice": choice, "text": resps}
    return out


def fidelity(task: str, docs: dict, dense: dict) -> list[float]:
    if task == "gsm8k_local":
        import sacrebleu

        return [100.0 if d["text"] == dense[k]["text"] else sacrebleu.sentence_bleu(d["text"], [dense[k]["text"]]).score
                for k, d in docs.items()]
    return [float(d["choice"] == dense[k]["choice"]) for k, d in docs.items()]


def collect(root) -> dict:
    """``{(model, task): {(score, level): per_doc}}`` over the run directories under ``root``."""
    cells = defaultdict(dict)
    for run_json in sorted(Path(root).rglob("run.json")):
        run = run_json.parent
        config = json.loads(run_json.read_text())["config"]
        for task in config["tasks"]:
            if _samples_path(run, task) is not None:
                key = ("dense", 0.0) if config["level"] == 0 else (config["score"], config["level"])
                cells[(config["model"], task)][key] = per_doc(run, task)
    return cells


def main(root: str) -> None:
    cells = collect(root)
    print("| model | task | score | level | n | accuracy [95% CI] | fidelity to dense [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for (model, task), runs in sorted(cells.items()):
        dense = runs.get(("dense", 0.0))
        for (score, level), docs in sorted(runs.items(), key=lambda kv: (kv[0][0] != "dense", kv[0])):
            acc = "%.3f [%.3f, %.3f]" % interval([d["score"] for d in docs.values()])
            fid = "%.3f [%.3f, %.3f]" % interval(fidelity(task, docs, dense)) if dense else "n/a"
            print(f"| {model} | {task} | {score} | {level} | {len(docs)} | {acc} | {fid} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/lm_eval/runs")
