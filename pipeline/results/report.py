"""One report over many run directories: report.html (self-contained) and report.md.

It reads top to bottom as an answer to "how sparse can this model get, with which score
and which allocation, and how much of the oracle's headroom does a deployable score reach?":

1. **Matrix per dataset**: rows model x allocation[/normalisation], columns scores
   (label-free, deployable scores grouped apart from the attribution oracles, as the score
   table ``SCORES`` says); each cell is the highest achieved sparsity within ``MAX_LOSS``
   BLEU loss with its 95% bootstrap interval over samples; the best cell of a row is bold.
2. **Curves as small multiples**: one panel per model x dataset (``plot.curves_figure``,
   the same drawing as a run's ``curves.png``): scores as colours, allocations as line styles.
3. **Oracle headroom**: per deployable score and allocation, its max sparsity as a fraction
   of the oracle's (``ORACLE``, cor_gxo) under the oracle's best allocation, and the mask
   overlap with the oracle under the same allocation at levels 0.5 and 0.8.
4. Per run, the kept fraction per layer (a global or calibrated series by default: under
   per_layer every layer keeps floor(p*n)/n by construction) and the run's metadata.
5. Collapsed (``<details>``): the long per-series table and fidelity/task scores at fixed levels.

**How the overlap is computed.** Records keep per-layer kept *fractions*, not masks, and two
masks with equal fractions can be disjoint, so IoU needs the masks. protocol.py has all masks
of a sample in memory: for every label-free row of a run that also evaluates the oracle it
stores ``iou_cor_gxo`` = {oracle series: {heads, neurons}}, the IoU of the two switched-off
sets per (token, layer) averaged over the decoded steps and layers (pairs where neither
switches anything off do not count), against the oracle at the same requested level under
the same allocation and normalisation (``summary.iou_reference``; calibrated: per_layer).
Same allocation, not the oracle's best one: the best is known only after all samples, and a
row compared with other allocations' rows would change when allocations are added to a run
(per_layer records stay those of a per_layer-only run); the overlap then says whether the
score picks the oracle's units, while the fraction column says what the allocation costs.
It takes a few boolean operations per pair (about 5 ms for SmolLM2's 30 x 1536 neurons x 64
steps, one thread) and no extra files; the alternative, recomputing masks here from
``--protocol.save_scores`` files, needs those (large) files in every published run and a
second copy of the allocation step (calibrated levels, static thresholds, dense first step)
that could drift from the one that made the records. The report averages the field over
samples; a run without the oracle, or older records, show "n/a".

Intervals are percentile bootstraps over samples (``BOOTSTRAP`` resamples, fixed seed): each
resample's per-level means give one replicate of the headline. The fraction of the oracle
gets an interval when both come from one run (paired resamples: same samples, same seed).

``python -m pipeline.results.report --print RUNS...`` prints the matrix and headroom numbers as text.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.results.plot import Curve, curves_figure, is_label_free, split_series
from pipeline.results.record import ORACLE
from pipeline.results.store import RUN_INFO, atomic_write_text, read_records
from pipeline.results.summary import LOSS_LABEL, iou_reference, max_sparsity_within_loss
from pipeline.scores.metrics import SCORES

BOOTSTRAP = 1000
TABLE_LEVELS = (0.5, 0.8)  # fidelity and task score table
IOU_LEVELS = (0.5, 0.8)  # headroom table's mask overlap
ALLOCATION_ORDER = ("per_layer", "global/none", "global/mean", "global/l2", "global/rank", "calibrated")


def find_runs(paths: list[str]) -> list[Path]:
    runs = []
    for path in map(Path, paths):
        if (path / RUN_INFO).exists():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p.parent for p in path.glob(f"*/{RUN_INFO}"))
        else:
            raise UserError(f"not a run directory or a folder of runs: {path}")
    if not runs:
        raise UserError(f"no run directories (with {RUN_INFO}) under {', '.join(paths)}")
    return runs


def load_runs(paths: list[str]) -> list["RunData"]:
    """Every run under ``paths`` (``find_runs``), loaded."""
    return [RunData(run_dir) for run_dir in find_runs(paths)]


def label_free(series: str) -> bool:
    """Whether a series' score is label-free (deployable), from the score table."""
    return is_label_free(series.split("/")[0])


def top_k_per_layer(series: str) -> bool:
    """Whether a series keeps floor(p*n)/n of every layer by construction (per_layer top-k)."""
    metric, *allocation = series.split("/")
    return not allocation and metric in SCORES and not SCORES[metric].thresholds


def allocation_rank(allocation: str) -> tuple:
    return (ALLOCATION_ORDER.index(allocation) if allocation in ALLOCATION_ORDER else len(ALLOCATION_ORDER), allocation)


def score_columns(metrics) -> tuple[list[str], list[str]]:
    """(label-free, oracle) scores among ``metrics``, each in the score table's order."""
    known = [m for m in SCORES if m in metrics] + sorted(set(metrics) - set(SCORES))
    return [m for m in known if is_label_free(m)], [m for m in known if not is_label_free(m)]


class RunData:
    """A run's records as arrays: BLEU and sparsity per (series, level) x sample; a series is a
    metric under one allocation (``Record.series``)."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.info = json.loads((run_dir / RUN_INFO).read_text())
        summary_path = run_dir / "summary.json"
        self.summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        self.records = read_records(run_dir)
        if not self.records:
            raise UserError(f"{run_dir} has no records yet")
        self.model = self.info["config"]["model"]["name"]
        self.dataset = self.info["dataset"]
        self.name = run_dir.name
        self.samples = sorted({r.sample_id for r in self.records})
        self.metrics = sorted({r.series for r in self.records})
        self.levels = sorted({r.level for r in self.records})
        index = {s: i for i, s in enumerate(self.samples)}
        shape = (len(self.metrics), len(self.levels), len(self.samples))
        self.bleu, self.sparsity = np.full(shape, np.nan), np.full(shape, np.nan)
        self.task, self.dense_task = np.full(shape, np.nan), np.full(shape, np.nan)
        for r in self.records:
            key = (self.metrics.index(r.series), self.levels.index(r.level), index[r.sample_id])
            self.bleu[key], self.sparsity[key] = r.bleu, r.sparsity
            if r.task_score is not None:
                self.task[key], self.dense_task[key] = r.task_score, r.dense_task_score
        # bootstrap replicates of the per-(metric, level) means, resampling samples; one set of
        # resamples for all series, so that replicates of two series of a run are paired
        rng = np.random.default_rng(0)
        picks = rng.integers(0, len(self.samples), size=(BOOTSTRAP, len(self.samples)))
        self.boot_bleu = np.nanmean(self.bleu[..., picks], axis=-1)  # [metrics, levels, BOOTSTRAP]
        self.boot_sparsity = np.nanmean(self.sparsity[..., picks], axis=-1)
        self._headlines: dict[int, tuple] = {}

    def curve(self, m: int):
        x = 1 - np.nanmean(self.sparsity[m], axis=-1)
        y = np.nanmean(self.bleu[m], axis=-1)
        low, high = np.percentile(self.boot_bleu[m], [2.5, 97.5], axis=-1)
        order = np.argsort(x)
        return x[order], y[order], low[order], high[order]

    def headline_replicates(self, m: int) -> tuple[float, np.ndarray]:
        """Max sparsity within MAX_LOSS of series ``m`` from the per-level means, and its
        BOOTSTRAP replicates."""
        if m not in self._headlines:
            def best(sparsity, bleu):
                return max_sparsity_within_loss(list(zip(sparsity.tolist(), (100 - bleu).tolist())))

            point = best(np.nanmean(self.sparsity[m], -1), np.nanmean(self.bleu[m], -1))
            replicates = np.array([best(self.boot_sparsity[m, :, b], self.boot_bleu[m, :, b])
                                   for b in range(BOOTSTRAP)])
            self._headlines[m] = point, replicates
        return self._headlines[m]

    def headline(self, m: int) -> tuple[float, float, float]:
        point, replicates = self.headline_replicates(m)
        low, high = np.percentile(replicates, [2.5, 97.5])
        return point, float(low), float(high)

    def at_level(self, m: int, level: float) -> dict | None:
        """Means at the run's level nearest to ``level``, with 95% bootstrap intervals over
        samples: achieved sparsity, BLEU vs dense (fidelity) and the task score."""
        nearest = min(self.levels, key=lambda p: abs(p - level))
        if abs(nearest - level) > 1e-6:
            return None
        li = self.levels.index(nearest)
        rng = np.random.default_rng(1)
        picks = rng.integers(0, len(self.samples), size=(BOOTSTRAP, len(self.samples)))

        def with_interval(values):
            if np.all(np.isnan(values)):
                return None
            return (float(np.nanmean(values)), *np.percentile(np.nanmean(values[picks], axis=-1), [2.5, 97.5]).tolist())

        return {"level": nearest, "sparsity": float(np.nanmean(self.sparsity[m, li])),
                "bleu": with_interval(self.bleu[m, li]), "task": with_interval(self.task[m, li]),
                "dense_task": with_interval(self.dense_task[m, li])}

    def kept_per_layer(self, metric: str, level: float):
        """Mean kept fraction per layer at the run's level nearest to ``level``: (level, heads, neurons)."""
        if metric not in self.metrics:
            return None
        nearest = min(self.levels, key=lambda p: abs(p - level))
        rows = [r for r in self.records if r.series == metric and r.level == nearest]
        if not rows:
            return None
        return nearest, np.mean([r.kept_heads for r in rows], 0), np.mean([r.kept_neurons for r in rows], 0)

    def iou(self, series: str, level: float) -> tuple[float | None, float | None, int] | None:
        """Mean mask IoU (heads, neurons) of ``series`` with its oracle series (``iou_reference``)
        at the requested ``level``, over the samples whose record has it (``Record.iou_cor_gxo``),
        and that count; None if no record has it."""
        reference = iou_reference(*(split_series(series)[1].split("/") + [None])[:2])
        values = [r.iou_cor_gxo[reference] for r in self.records
                  if r.series == series and abs(r.level - level) < 1e-6 and reference in (r.iou_cor_gxo or {})]
        if not values:
            return None

        def mean(kind):
            found = [v[kind] for v in values if v.get(kind) is not None]
            return float(np.mean(found)) if found else None

        return mean("heads"), mean("neurons"), len(values)


# --- what the report shows, as data (the page, the Markdown and --print render it) ---------


@dataclass
class Cell:
    run: RunData
    m: int
    point: float
    low: float
    high: float


def collect_cells(runs: list[RunData]) -> dict[tuple[str, str, str, str], Cell]:
    """``(dataset, model, metric, allocation) -> Cell``. Where several runs hold one series of a
    model and dataset, the first run given wins (as in results/claims.py)."""
    cells = {}
    for run in runs:
        for m, series in enumerate(run.metrics):
            metric, allocation = split_series(series)
            key = (run.dataset, run.model, metric, allocation)
            if key not in cells:
                cells[key] = Cell(run, m, *run.headline(m))
    return cells


@dataclass
class Matrix:
    dataset: str
    label_free: list[str]
    oracles: list[str]
    rows: list[tuple[str, str, dict[str, Cell], str | None]]  # model, allocation, metric -> cell, best metric


def matrices(cells: dict) -> list[Matrix]:
    """One matrix per dataset: rows (model, allocation), columns scores, best cell per row."""
    found = []
    for dataset in sorted({k[0] for k in cells}):
        mine = {k: c for k, c in cells.items() if k[0] == dataset}
        free, oracles = score_columns({k[2] for k in mine})
        rows = []
        for model, allocation in sorted({(k[1], k[3]) for k in mine}, key=lambda r: (r[0], allocation_rank(r[1]))):
            row = {k[2]: c for k, c in mine.items() if k[1] == model and k[3] == allocation}
            best = max(row, key=lambda metric: row[metric].point) if row else None
            rows.append((model, allocation, row, best))
        found.append(Matrix(dataset, free, oracles, rows))
    return found


@dataclass
class Headroom:
    dataset: str
    model: str
    metric: str
    allocation: str
    cell: Cell
    reference: str  # the oracle's best series, e.g. cor_gxo or cor_gxo/global/mean (for the fraction)
    reference_cell: Cell
    fraction: float | None
    fraction_interval: tuple[float, float] | None  # paired bootstrap, when both come from one run
    iou: dict[float, tuple | None] = field(default_factory=dict)  # level -> (heads, neurons, samples), same allocation


def headroom(cells: dict) -> list[Headroom]:
    """Per (dataset, model) with the oracle: every label-free score x allocation against the
    oracle's best allocation (highest max sparsity; ties: ALLOCATION_ORDER)."""
    rows = []
    for dataset, model in sorted({(k[0], k[1]) for k in cells}):
        oracle = {k[3]: c for k, c in cells.items() if k[:3] == (dataset, model, ORACLE)}
        if not oracle:
            continue
        best_allocation = max(sorted(oracle, key=allocation_rank), key=lambda a: oracle[a].point)
        reference = oracle[best_allocation]
        reference_series = reference.run.metrics[reference.m]
        deployable = [(k[2], k[3]) for k in cells if k[:2] == (dataset, model) and is_label_free(k[2])]
        order = {m: i for i, m in enumerate(SCORES)}
        for metric, allocation in sorted(deployable, key=lambda r: (order.get(r[0], len(order)), allocation_rank(r[1]))):
            cell = cells[(dataset, model, metric, allocation)]
            fraction = cell.point / reference.point if reference.point > 0 else None
            interval = None
            if fraction is not None and cell.run is reference.run:
                _, mine = cell.run.headline_replicates(cell.m)
                _, theirs = reference.run.headline_replicates(reference.m)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios = np.where(theirs > 0, mine / np.where(theirs > 0, theirs, 1), np.nan)
                if np.isfinite(ratios).any():
                    interval = tuple(np.nanpercentile(ratios, [2.5, 97.5]).tolist())
            series = cell.run.metrics[cell.m]
            iou = {level: cell.run.iou(series, level) for level in IOU_LEVELS}
            rows.append(Headroom(dataset, model, metric, allocation, cell, reference_series, reference, fraction,
                                 interval, iou))
    return rows


def fmt_cell(cell: Cell | None, digits: int = 3) -> str:
    return "–" if cell is None else f"{cell.point:.{digits}f} [{cell.low:.{digits}f}, {cell.high:.{digits}f}]"


def fmt_fraction(row: Headroom) -> str:
    if row.fraction is None:
        return "n/a (oracle at 0)"
    text = f"{row.fraction:.2f}"
    return text + (f" [{row.fraction_interval[0]:.2f}, {row.fraction_interval[1]:.2f}]" if row.fraction_interval else "")


def fmt_iou(value) -> str:
    if value is None:
        return "n/a"
    show = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return f"{show(value[0])} / {show(value[1])}"


# --- plots -----------------------------------------------------------------------------------


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def panels_plot(runs: list[RunData], cells: dict) -> bytes:
    """Small multiples: one panel per model x dataset (rows: models, columns: datasets), each
    series taken from the run the matrix took it from, with its 95% bootstrap band."""
    models = sorted({k[1] for k in cells})
    datasets = sorted({k[0] for k in cells})
    panels = []
    for model in models:
        for dataset in datasets:
            mine = sorted((k, c) for k, c in cells.items() if k[:2] == (dataset, model))
            if not mine:
                continue
            curves = sorted((Curve(c.run.metrics[c.m], *c.run.curve(c.m)) for _, c in mine), key=lambda c: c.series)
            samples = sorted({len(c.run.samples) for _, c in mine})
            panels.append((f"{model} on {dataset} ({'/'.join(map(str, samples))} samples)", curves))
    return _png(curves_figure(panels, columns=min(len(datasets), 3)))


def default_heatmap_series(run: RunData) -> str:
    """A series whose kept fraction differs per layer: calibrated, else global (label-free
    first), else static, else the run's first series."""
    def pick(test):
        return next((s for s in sorted(run.metrics, key=lambda s: not label_free(s)) if test(s)), None)

    return (pick(lambda s: split_series(s)[1] == "calibrated") or pick(lambda s: split_series(s)[1].startswith("global"))
            or pick(lambda s: s == "static") or run.metrics[0])


def heatmap_plot(run: RunData, metric: str | None, level: float) -> tuple[bytes, str] | None:
    """The kept-fraction heatmap and its caption, for ``metric`` or, when it is None or the run
    lacks it, ``default_heatmap_series``."""
    if metric not in run.metrics:
        metric = default_heatmap_series(run)
    kept = run.kept_per_layer(metric, level)
    if kept is None:
        return None
    level, *kept = kept
    caption = f"Kept fraction per layer: {metric} at p = {level}."
    # per_layer top-k switches off floor(p*n) units of every layer, so its heatmap is flat and
    # says nothing about the layers; static thresholds, global and calibrated allocations differ per layer
    if top_k_per_layer(metric):
        caption += (" Top-k scores keep floor(p·n)/n of every layer by construction (docs/protocol.md §5.1);"
                    " use --heatmap_metric static, or a global or calibrated series (e.g. cor_gxo/global/mean).")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 1.6))
    image = ax.imshow(np.stack(kept), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set(yticks=[0, 1], yticklabels=["heads", "neurons"], xlabel="layer",
           title=f"kept fraction per layer: {metric}, p = {level}")
    ax.title.set_fontsize(9)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _png(fig), caption


# --- tables ----------------------------------------------------------------------------------


def _task_table(runs: list[RunData]) -> tuple[list[str], list[str]]:
    """Rows (HTML and Markdown) of fidelity and task score at TABLE_LEVELS per run and score."""
    def show(value):
        return "n/a" if value is None else f"{value[0]:.1f} [{value[1]:.1f}, {value[2]:.1f}]"

    html_rows = []
    md = ["| model | dataset | score | level | achieved sparsity | BLEU vs dense [95%] | task score [95%] "
          "| dense task score |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for m, metric in enumerate(run.metrics):
            for level in TABLE_LEVELS:
                point = run.at_level(m, level)
                if point is None:
                    continue
                dense = "n/a" if point["dense_task"] is None else f"{point['dense_task'][0]:.1f}"
                cells = [run.model, run.dataset, metric, f"{point['level']:.1f}", f"{point['sparsity']:.3f}",
                         show(point["bleu"]), show(point["task"]), dense]
                html_rows.append('<tr class="task-row">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
                md.append("| " + " | ".join(cells) + " |")
    return html_rows, md


def _esc(value) -> str:
    return html.escape(str(value))


def matrix_html(matrix: Matrix) -> str:
    free, oracles = matrix.label_free, matrix.oracles
    head = ('<tr><th rowspan="2">model</th><th rowspan="2">allocation</th>'
            + (f'<th colspan="{len(free)}" class="group free">label-free (deployable)</th>' if free else "")
            + (f'<th colspan="{len(oracles)}" class="group oracle">oracle (needs the dense output)</th>' if oracles else "")
            + "</tr><tr>" + "".join(f'<th class="{"first-oracle" if m == (oracles or [None])[0] else ""}">{_esc(m)}</th>'
                                    for m in free + oracles) + "</tr>")
    body = []
    for model, allocation, row, best in matrix.rows:
        tds = []
        for metric in free + oracles:
            cell = row.get(metric)
            classes = ["cell"] + (["best"] if metric == best else []) + (["first-oracle"] if metric == (oracles or [None])[0] else [])
            if cell is None:
                tds.append(f'<td class="{" ".join(classes)} empty" data-metric="{_esc(metric)}">–</td>')
            else:
                tds.append(f'<td class="{" ".join(classes)}" data-metric="{_esc(metric)}" data-value="{cell.point:.6f}" '
                           f'data-low="{cell.low:.6f}" data-high="{cell.high:.6f}">{cell.point:.3f}'
                           f'<span class="ci">[{cell.low:.3f}, {cell.high:.3f}]</span></td>')
        body.append(f'<tr data-model="{_esc(model)}" data-allocation="{_esc(allocation)}"><td>{_esc(model)}</td>'
                    f'<td>{_esc(allocation)}</td>{"".join(tds)}</tr>')
    return (f'<h3>{_esc(matrix.dataset)}</h3><table class="matrix" id="matrix-{_esc(matrix.dataset)}" '
            f'data-dataset="{_esc(matrix.dataset)}">{head}{"".join(body)}</table>')


def matrix_md(matrix: Matrix) -> list[str]:
    columns = [f"{m} (label-free)" for m in matrix.label_free] + [f"{m} (oracle)" for m in matrix.oracles]
    lines = [f"### {matrix.dataset}", "", "| model | allocation | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for model, allocation, row, best in matrix.rows:
        shown = []
        for metric in matrix.label_free + matrix.oracles:
            text = fmt_cell(row.get(metric))
            shown.append(f"**{text}**" if metric == best else text)
        lines.append(f"| {model} | {allocation} | " + " | ".join(shown) + " |")
    return lines + [""]


HEADROOM_COLUMNS = (["dataset", "model", "score", "allocation", f"max sparsity within {LOSS_LABEL} [95%]",
                     f"{ORACLE} best allocation", f"fraction of {ORACLE} [95%]"]
                    + [f"IoU with {ORACLE} (same allocation) at p = {level}, heads / neurons" for level in IOU_LEVELS])


def headroom_cells(row: Headroom) -> list[str]:
    return ([row.dataset, row.model, row.metric, row.allocation, fmt_cell(row.cell),
             f"{row.reference} {row.reference_cell.point:.3f}", fmt_fraction(row)]
            + [fmt_iou(row.iou[level]) for level in IOU_LEVELS])


def headroom_html(rows: list[Headroom]) -> str:
    if not rows:
        return f'<p id="headroom-none">No model and dataset has both {ORACLE} and a label-free score.</p>'
    head = "<tr>" + "".join(f"<th>{_esc(c)}</th>" for c in HEADROOM_COLUMNS) + "</tr>"
    body = []
    for row in rows:
        attrs = (f'data-dataset="{_esc(row.dataset)}" data-model="{_esc(row.model)}" data-metric="{_esc(row.metric)}" '
                 f'data-allocation="{_esc(row.allocation)}" data-fraction="{"" if row.fraction is None else f"{row.fraction:.6f}"}"'
                 + "".join(f' data-iou-{str(level).replace(".", "")}="'
                           + ("" if row.iou[level] is None else ",".join("" if v is None else f"{v:.6f}" for v in row.iou[level][:2]))
                           + '"' for level in IOU_LEVELS))
        body.append(f'<tr class="headroom-row" {attrs}>' + "".join(f"<td>{_esc(c)}</td>" for c in headroom_cells(row)) + "</tr>")
    return f'<table id="headroom">{head}{"".join(body)}</table>'


def headroom_md(rows: list[Headroom]) -> list[str]:
    if not rows:
        return [f"No model and dataset has both {ORACLE} and a label-free score.", ""]
    return (["| " + " | ".join(HEADROOM_COLUMNS) + " |", "|" + "---|" * len(HEADROOM_COLUMNS)]
            + ["| " + " | ".join(headroom_cells(r)) + " |" for r in rows] + [""])


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def text_report(runs: list[RunData]) -> str:
    """The matrix and headroom numbers of loaded runs as plain text (what the README quotes)."""
    cells = collect_cells(runs)
    lines = [f"Max achieved sparsity within {LOSS_LABEL} BLEU loss [95% bootstrap interval over samples];"
             " * marks the best of a row"]
    for matrix in matrices(cells):
        metrics = matrix.label_free + matrix.oracles
        header = ["model", "allocation"] + [f"{m}{' (label-free)' if m in matrix.label_free else ''}" for m in metrics]
        rows = [[model, allocation] + [fmt_cell(row.get(m)) + ("*" if m == best else "") for m in metrics]
                for model, allocation, row, best in matrix.rows]
        lines += ["", f"dataset {matrix.dataset}"] + _text_table(header, rows)
    lines += ["", f"Oracle headroom: label-free scores against {ORACLE}'s best allocation"]
    found = headroom(cells)
    lines += _text_table(HEADROOM_COLUMNS, [headroom_cells(r) for r in found]) if found else ["(none)"]
    return "\n".join(lines)


# --- the page ----------------------------------------------------------------------------------


def _img(data: bytes, cls: str, alt: str) -> str:
    return f'<img class="{cls}" alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def write_report(paths: list[str], output: str | None, heatmap_metric: str | None = None,
                 heatmap_level: float = 0.5) -> Path:
    runs = load_runs(paths)
    out = Path(output or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    assets = out / "report_assets"
    assets.mkdir(exist_ok=True)
    cells = collect_cells(runs)
    found_matrices, found_headroom = matrices(cells), headroom(cells)
    intro = (f"{len(runs)} run(s). Accuracy is BLEU of the masked output against the dense output; "
             f"\"max sparsity\" is the highest achieved (parameter-weighted) sparsity whose mean BLEU stays within "
             f"{LOSS_LABEL} of the dense output's. Intervals and bands are 95% bootstrap intervals over samples "
             f"({BOOTSTRAP} resamples).")
    md = ["# Sparse activation report", "", intro, "", f"## Max sparsity within {LOSS_LABEL} loss", "",
          "Rows: model x allocation; columns: label-free (deployable) scores, then oracles; bold: best of the row.", ""]
    for matrix in found_matrices:
        md += matrix_md(matrix)

    curves = panels_plot(runs, cells)
    (assets / "curves.png").write_bytes(curves)
    md += ["## Curves", "", "![curves](report_assets/curves.png)", "",
           "Colour: score (hollow markers: label-free); line style: allocation; dotted grey: "
           f"{LOSS_LABEL} loss.", "", "## Oracle headroom", ""]
    headroom_note = (f"Per deployable score and allocation: its max sparsity within {LOSS_LABEL} loss as a fraction of "
                     f"{ORACLE}'s under {ORACLE}'s best allocation (paired 95% interval when both come from one run), "
                     f"and the IoU of its switched-off units with {ORACLE}'s under the same allocation (calibrated: "
                     "per_layer) at the same level, per layer and token, averaged over layers, tokens and samples "
                     "(heads / neurons; n/a: the run did not evaluate both, or not at that level).")
    md += [headroom_note, ""] + headroom_md(found_headroom) + ["## Per run: kept fraction per layer", ""]

    sections = []
    for run in runs:
        images = []
        md += [f"### {run.name} ({run.model} on {run.dataset})", ""]
        heatmap = heatmap_plot(run, heatmap_metric, heatmap_level)
        if heatmap is not None:
            heat, caption = heatmap
            (assets / f"{run.name}_layers.png").write_bytes(heat)
            images.append(_img(heat, "heatmap", f"layers {run.name}") + f'<p class="caption">{_esc(caption)}</p>')
            md += [f"![kept per layer](report_assets/{run.name}_layers.png)", "", f"*{caption}*", ""]
        session = run.summary.get("last_session", {})
        # wall_s covers only the last invocation (a resumed run shows just its tail), hence the key
        meta = {"run directory": str(run.dir), "config fingerprint": run.info["fingerprint"],
                "finished": session.get("finished_utc", "?"),
                "wall time of last session (s)": session.get("wall_s", "?"),
                "device": session.get("device", "?"),
                "versions": ", ".join(f"{k} {v}" for k, v in session.get("versions", {}).items()) or "?"}
        meta_html = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in meta.items())
        md += [f"- {k}: {v}" for k, v in meta.items()] + [""]
        sections.append(f'<section class="run" id="run-{_esc(run.name)}"><h3>{_esc(run.name)}: {_esc(run.model)} on '
                        f'{_esc(run.dataset)}</h3>{"".join(images)}<details class="meta"><summary>run metadata'
                        f'</summary><dl>{meta_html}</dl></details></section>')

    table_rows = []
    md += ["<details><summary>Every series: max sparsity per run</summary>", "",
           f"| model | dataset | score | max sparsity within {LOSS_LABEL} loss | 95% interval | samples | run |",
           "|---|---|---|---|---|---|---|"]
    for run in runs:
        for m, metric in enumerate(run.metrics):
            point, low, high = run.headline(m)
            # the run column tells apart runs of one model and dataset (another device, dtype or slice)
            row = [run.model, run.dataset, metric + (" (label-free)" if label_free(metric) else ""),
                   f"{point:.3f}", f"[{low:.3f}, {high:.3f}]", str(len(run.samples)), run.name]
            table_rows.append(f'<tr class="run-row" data-run="{_esc(run.name)}">'
                              + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>")
            md.append("| " + " | ".join(row) + " |")
    task_rows, task_md = _task_table(runs)
    md += ["", "</details>", "", "<details><summary>Fidelity and task accuracy at fixed levels</summary>", ""]
    md += task_md + ["", "</details>", ""]

    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sparse activation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 7px; }} th {{ background: #f3f3f3; font-weight: 600; }}
table.matrix td.cell {{ text-align: right; white-space: nowrap; }}
table.matrix .ci {{ display: block; font-size: .78em; color: #777; }}
table.matrix td.best {{ font-weight: 700; background: #eef6ee; }}
table.matrix .first-oracle, table.matrix th.oracle {{ border-left: 3px solid #888; }}
table.matrix th.free {{ background: #e8f0fb; }} table.matrix th.oracle {{ background: #f7ece4; }}
img {{ max-width: 100%; display: block; margin: .5em 0; }} p.caption, p.note {{ font-size: .85em; color: #555; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 2px 12px; font-size: 0.85em; }}
dt {{ color: #666; }} section.run {{ border-top: 1px solid #eee; margin-top: 1em; }}
details.long {{ margin: 1em 0; }} details.long > summary {{ cursor: pointer; font-weight: 600; }}
</style></head>
<body data-runs="{len(runs)}">
<h1>Sparse activation report</h1>
<p>{_esc(intro)}</p>
<h2 id="matrix">Max sparsity within {LOSS_LABEL} loss</h2>
<p class="note">Rows: model x allocation (global/&lt;normalisation&gt;); columns: label-free, deployable scores,
then the attribution oracles, which need the dense output as labels. Bold: best of the row. Brackets: 95% interval.</p>
{"".join(matrix_html(m) for m in found_matrices)}
<h2>Curves</h2>
<figure id="curves">{_img(curves, "curves", "curves")}
<figcaption class="caption">One panel per model x dataset. Colour: score (hollow markers: label-free);
line style: allocation; shaded: 95% band; dotted grey: {LOSS_LABEL} loss.</figcaption></figure>
<h2>Oracle headroom</h2>
<p class="note">{_esc(headroom_note)}</p>
{headroom_html(found_headroom)}
<h2>Per run: kept fraction per layer</h2>
{"".join(sections)}
<details class="long" id="details-headline"><summary>Every series: max sparsity within {LOSS_LABEL} loss per run
({len(table_rows)} rows)</summary>
<table id="headline"><tr><th>model</th><th>dataset</th><th>score</th><th>max sparsity</th><th>95% interval</th>
<th>samples</th><th>run</th></tr>{"".join(table_rows)}</table></details>
<details class="long" id="details-task"><summary>Fidelity and task accuracy at levels
{", ".join(map(str, TABLE_LEVELS))} ({len(task_rows)} rows)</summary>
<p class="note">Fidelity is BLEU against the dense output; the task score is exact match in % (GSM8K) or BLEU
against the reference answer (TruthfulQA), next to the dense model's own task score.</p>
<table id="task"><tr><th>model</th><th>dataset</th><th>score</th><th>level</th><th>achieved sparsity</th>
<th>BLEU vs dense [95%]</th><th>task score [95%]</th><th>dense task score</th></tr>{"".join(task_rows)}</table></details>
<script>
// lets a headless browser check that every plot decoded, and where things are laid out
window.addEventListener("load", () => {{
  const images = [...document.images];
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = images.length;
  const box = e => {{ const r = e.getBoundingClientRect();
    return [Math.round(r.top + window.scrollY), Math.round(r.height), e.checkVisibility ? e.checkVisibility() : null]; }};
  const layout = {{}};
  for (const id of ["matrix", "curves", "headroom", "details-headline", "headline", "details-task", "task"]) {{
    const element = document.getElementById(id);
    if (element) layout[id] = box(element);
  }}
  const matrices = [...document.querySelectorAll("table.matrix")];
  if (matrices.length) layout["last-matrix"] = box(matrices[matrices.length - 1]);
  document.body.dataset.layout = JSON.stringify(layout);
}});
</script>
</body></html>
"""
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    print(f"report of {len(runs)} run(s): {out / 'report.html'} and {out / 'report.md'}")
    return out / "report.html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or folders of runs")
    parser.add_argument("--print", action="store_true", help="print the matrix and headroom numbers as text")
    parser.add_argument("--output", help="where report.html goes (without --print)")
    args = parser.parse_args(argv)
    if args.print:
        print(text_report(load_runs(args.runs)))
    else:
        write_report(args.runs, args.output)


if __name__ == "__main__":
    main()
