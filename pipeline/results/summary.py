"""Aggregate records into the per-(metric, allocation, level) table and the headline figure (docs/protocol.md §8).

Rows of different allocations (and normalisations) of one metric are different
curves: they are grouped apart and named apart (``series_name``), so a run that
evaluates several allocations never averages them together.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from pipeline.results.record import ORACLE, Record, series_name
from pipeline.results.store import atomic_write_text

MEASURES = ("sparsity", "bleu", "token_agreement", "task_score")
# The headline's accuracy budget, in BLEU points below 100 (i.e. percent of the dense output's
# BLEU against itself). Every "within 5% loss" of summaries, reports, plots and claims reads it.
MAX_LOSS = 5.0
LOSS_LABEL = f"{MAX_LOSS:g}%"  # "5%"
HEADLINE_KEY = f"max_sparsity_within_{MAX_LOSS:g}pct_loss"  # summary.json's key (unchanged name at 5)


def iou_reference(allocation: str | None, normalize: str | None) -> str:
    """The ORACLE series a label-free series' masks are compared with: the oracle under the same
    allocation and normalisation, or per_layer for ``calibrated`` (the oracle has no calibrated
    levels). Never another allocation, so adding allocations to a run leaves its rows unchanged."""
    return series_name(ORACLE, "per_layer") if allocation == "calibrated" else series_name(ORACLE, allocation, normalize)


def summarize(records: list[Record]) -> list[dict]:
    """Mean of each measure per (metric, allocation, normalisation, level), with the sample count, sorted."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for record in records:
        groups[(record.metric, record.allocation, record.normalize or "", record.level)].append(record)
    rows = []
    for (metric, allocation, normalize, level), items in sorted(groups.items()):
        row = {"metric": metric, "allocation": allocation, "normalize": normalize or None, "level": level,
               "n": len(items), "series": series_name(metric, allocation, normalize)}
        for measure in MEASURES:
            values = [getattr(r, measure) for r in items if getattr(r, measure) is not None]
            # fsum is exactly rounded, so the mean does not depend on record order (ranks, resumes)
            row[measure] = math.fsum(values) / len(values) if values else None
        row["accuracy_loss"] = 100.0 - row["bleu"]
        rows.append(row)
    return rows


def max_sparsity_within_loss(points: list[tuple[float, float]], max_loss: float = MAX_LOSS) -> float:
    """Highest achieved sparsity whose accuracy loss stays within ``max_loss``.

    ``points`` are (achieved sparsity, accuracy loss). Walk them in order of sparsity,
    stop at the first whose loss exceeds ``max_loss`` and interpolate linearly between
    it and the previous point; 0 if the first point already fails.
    """
    points = sorted(points)
    previous = None
    for sparsity, loss in points:
        if loss > max_loss:
            if previous is None:
                return 0.0
            s0, l0 = previous
            return s0 + (max_loss - l0) * (sparsity - s0) / (loss - l0)
        previous = (sparsity, loss)
    return previous[0] if previous else 0.0


def headline(rows: list[dict]) -> dict[str, float]:
    """Max sparsity within MAX_LOSS loss per series (metric, or metric/allocation[/normalisation])."""
    by_metric: dict[str, list] = defaultdict(list)
    for row in rows:
        by_metric[row["series"]].append((row["sparsity"], row["accuracy_loss"]))
    return {metric: max_sparsity_within_loss(points) for metric, points in by_metric.items()}


def write_summary(run_dir: Path, rows: list[dict], info: dict, session: dict | None = None) -> dict[str, float]:
    best = headline(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["metric", "allocation", "normalize", "level", "n", *MEASURES,
                                                "accuracy_loss"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "summary.csv", buffer.getvalue())
    summary = {
        "model": info["config"]["model"]["name"],
        "dataset": info["dataset"],
        "fingerprint": info["fingerprint"],
        HEADLINE_KEY: best,
        "last_session": session or {},  # wall time, device, versions of the run that wrote this
        "rows": rows,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return best


def format_table(best: dict[str, float], rows: list[dict]) -> str:
    n = max((r["n"] for r in rows), default=0)
    width = max([12] + [len(name) + 2 for name in best])
    lines = [f"max sparsity within {LOSS_LABEL} accuracy loss (BLEU vs dense, {n} samples)",
             f"{'metric':<{width}}{'sparsity':>10}"]
    lines += [f"{metric:<{width}}{value:>10.3f}" for metric, value in sorted(best.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
