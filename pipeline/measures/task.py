"""Task accuracy against a dataset's ground truth.

* ``bleu_vs_reference``: sacreBLEU of the output against the reference answer
  (TruthfulQA: "Best Answer"), 0..100.
* ``exact_number``: 100 if the last number in the output equals the reference's
  final number (GSM8K: the number after ``####``), else 0.
* ``none``: no ground truth.
"""

from __future__ import annotations

import re

from pipeline.measures.fidelity import sentence_bleu

TASK_MEASURES = ("bleu_vs_reference", "exact_number", "none")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_reference_number(answer: str) -> float | None:
    """GSM8K: the number after the last ``####``; otherwise the last number in the text."""
    tail = answer.rsplit("####", 1)[-1] if "####" in answer else answer
    numbers = _NUMBER.findall(tail)
    return _as_number(numbers[-1 if "####" not in answer else 0]) if numbers else None


def last_number(text: str) -> float | None:
    numbers = _NUMBER.findall(text)
    return _as_number(numbers[-1]) if numbers else None


def task_score(measure: str, output: str, reference: str | None) -> float | None:
    if measure == "none" or reference is None:
        return None
    if measure == "bleu_vs_reference":
        return sentence_bleu(output, reference)
    if measure == "exact_number":
        gold, predicted = final_reference_number(reference), last_number(output)
        return 100.0 if gold is not None and predicted is not None and abs(gold - predicted) < 1e-6 else 0.0
    raise ValueError(f"unknown task measure {measure!r}; choose from {TASK_MEASURES}")
