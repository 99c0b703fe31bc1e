"""Accuracy against activation ratio, one line per metric (and allocation), as in the paper's figures."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = defaultdict(list)
    for row in rows:
        lines[row.get("series", row["metric"])].append((1.0 - row["sparsity"], row["bleu"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for metric, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", markersize=3, label=metric)
    ax.axhline(95, color="grey", linestyle=":", linewidth=1, label="5% loss")
    ax.set_xlabel("activation ratio (1 - achieved sparsity)")
    ax.set_ylabel("BLEU vs dense output")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial)
    plt.close(fig)
    partial.replace(path)
