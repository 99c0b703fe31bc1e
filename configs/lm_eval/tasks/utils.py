"""Offline datasets for the task YAMLs in this directory (lm-eval ``custom_dataset`` hooks).

lm-eval loads datasets from the Hugging Face Hub; these build the same tasks from local
files. The data directory is, first found: ``--metadata '{"data_dir": "..."}'`` (lm-eval's
own way of passing task arguments), the ``SPARSEACT_DATA_DIR`` environment variable, or
``../shared/data`` next to the repository root. Expected files:
``truthfulqa/TruthfulQA.csv`` and ``gsm8k/test.jsonl``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets
import numpy as np

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def data_file(*parts: str, data_dir: str | None = None) -> Path:
    root = Path(data_dir or os.environ.get("SPARSEACT_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
    path = root.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give the data directory (sparseact lmeval --data_dir DIR, "
                                "lm-eval --metadata '{\"data_dir\": \"DIR\"}', or SPARSEACT_DATA_DIR; "
                                "default ../shared/data)")
    return path


def _answers(cell: str) -> list[str]:
    """TruthfulQA.csv keeps several answers in one cell, separated by '; '."""
    seen = []
    for answer in (a.strip() for a in cell.split(";")):
        if answer and answer not in seen:
            seen.append(answer)
    return seen


def _truthfulqa_rows(data_dir):
    with data_file("truthfulqa", "TruthfulQA.csv", data_dir=data_dir).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def load_truthfulqa_mc1(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """MC1: the Best Answer (choice 0, the target) against every Incorrect Answer."""
    docs = []
    for row in _truthfulqa_rows(data_dir):
        incorrect = [a for a in _answers(row["Incorrect Answers"]) if a != row["Best Answer"].strip()]
        choices = [row["Best Answer"].strip()] + incorrect
        docs.append({"question": row["Question"], "choices": choices, "labels": [1] + [0] * len(incorrect)})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def load_truthfulqa_mc2(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """MC2: every Correct Answer (label 1) against every Incorrect Answer (label 0)."""
    docs = []
    for row in _truthfulqa_rows(data_dir):
        correct = _answers(row["Correct Answers"])
        incorrect = [a for a in _answers(row["Incorrect Answers"]) if a not in correct]
        docs.append({"question": row["Question"], "choices": correct + incorrect,
                     "labels": [1] * len(correct) + [0] * len(incorrect)})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def process_results_mc2(doc, results):
    """Normalised probability mass of the true answers (lm-eval's truthfulqa_mc2 rule)."""
    ll = np.array([r[0] for r in results])
    probs = np.exp(ll - ll.max())  # shifted: the same ratios, no underflow
    probs = probs / probs.sum()
    return {"acc": float(probs[np.array(doc["labels"]) == 1].sum())}


def load_gsm8k(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """GSM8K test split from ``gsm8k/test.jsonl`` (question, answer ending in '#### N')."""
    with data_file("gsm8k", "test.jsonl", data_dir=data_dir).open(encoding="utf-8") as handle:
        docs = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"question": d["question"], "answer": d["answer"]} for d in docs])})
