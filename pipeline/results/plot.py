"""Accuracy against activation ratio, as in the paper's figures: the one curve-drawing function.

``draw_curves`` draws one panel: one line per series (a score under one allocation),
coloured by score, styled by allocation (solid: per_layer, the paper's rule; dashed and
dotted: global normalisations; dash-dot-dot: calibrated), hollow markers for label-free
(deployable) scores, an optional shaded 95% band, and the ``MAX_LOSS`` threshold.
``curves_figure`` lays out panels as small multiples with one legend that says which
colour is which score and which line style which allocation. A run's ``curves.png``
(``plot_curves``, from summary rows) and the report's panels (``report.py``, from
records with bootstrap bands) both go through it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.results.summary import LOSS_LABEL, MAX_LOSS
from pipeline.scores.metrics import SCORES

ALLOCATION_STYLES = {
    "per_layer": "-",
    "global/mean": "--",
    "global/none": (0, (1, 1.5)),
    "global/l2": "-.",
    "global/rank": (0, (6, 2)),
    "global": "--",
    "calibrated": (0, (5, 1.5, 1, 1.5, 1, 1.5)),
}
XLABEL = "activation ratio (1 - achieved sparsity)"
YLABEL = "BLEU vs dense output"


@dataclass
class Curve:
    """One line: ``series`` (``record.series_name``), points sorted by x, optional band."""

    series: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None


def split_series(series: str) -> tuple[str, str]:
    """``cor_gxo/global/mean`` -> (``cor_gxo``, ``global/mean``); ``magnitude`` -> (``magnitude``, ``per_layer``)."""
    metric, _, allocation = series.partition("/")
    return metric, allocation or "per_layer"


def is_label_free(metric: str) -> bool:
    row = SCORES.get(metric)
    return row is not None and row.label_free


def score_color(metric: str) -> str:
    """A fixed colour per score (its place in the score table), the same in every panel and plot."""
    import matplotlib

    names = list(SCORES)
    index = names.index(metric) if metric in names else len(names) + sum(map(ord, metric)) % 7
    return matplotlib.colormaps["tab10"](index % 10)


def allocation_style(allocation: str):
    return ALLOCATION_STYLES.get(allocation, ":")


def draw_curves(ax, curves: list[Curve], title: str) -> None:
    """One panel: BLEU against activation ratio, one line per series, with the MAX_LOSS line."""
    for curve in curves:
        metric, allocation = split_series(curve.series)
        color = score_color(metric)
        ax.plot(curve.x, curve.y, linestyle=allocation_style(allocation), color=color, marker="o", markersize=3,
                markerfacecolor="white" if is_label_free(metric) else color, linewidth=1.3, label=curve.series)
        if curve.low is not None and curve.high is not None:
            ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.10, linewidth=0)
    ax.axhline(100 - MAX_LOSS, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=XLABEL, ylabel=YLABEL, xlim=(0, 1.02), ylim=(-2, 102))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def legend_handles(series: list[str]):
    """Handles that say which colour is which score and which line style which allocation."""
    from matplotlib.lines import Line2D

    parts = [split_series(s) for s in series]
    metrics = [m for m in SCORES if any(p[0] == m for p in parts)] + sorted({m for m, _ in parts} - set(SCORES))
    allocations = [a for a in ALLOCATION_STYLES if any(p[1] == a for p in parts)]
    allocations += sorted({a for _, a in parts} - set(allocations))
    handles = [Line2D([], [], color=score_color(m), marker="o", markersize=4,
                      markerfacecolor="white" if is_label_free(m) else score_color(m),
                      label=m + (" (label-free)" if is_label_free(m) else " (oracle)")) for m in metrics]
    if len(allocations) > 1 or allocations != ["per_layer"]:
        handles += [Line2D([], [], color="black", linestyle=allocation_style(a), label=f"allocation {a}")
                    for a in allocations]
    handles.append(Line2D([], [], color="grey", linestyle=":", label=f"{LOSS_LABEL} loss"))
    return handles


def curves_figure(panels: list[tuple[str, list[Curve]]], columns: int = 2):
    """Small multiples: one panel per (title, curves), ``columns`` per row, one shared legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    legend_width = 2.4
    fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns + legend_width, 3.3 * rows + 0.2),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for ax, (title, curves) in zip(axes.flat, panels):
        draw_curves(ax, curves, title)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    series = sorted({c.series for _, curves in panels for c in curves})
    fig.legend(handles=legend_handles(series), loc="outside right upper", fontsize=7, frameon=False)
    return fig


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """A run's ``curves.png`` from its summary rows (means per level, no bands)."""
    import matplotlib.pyplot as plt

    lines: dict[str, list] = defaultdict(list)
    for row in rows:
        lines[row["series"]].append((1.0 - row["sparsity"], row["bleu"]))
    curves = []
    for series, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        curves.append(Curve(series, np.array(xs), np.array(ys)))
    fig = curves_figure([(title, curves)], columns=1)
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    partial.replace(path)
