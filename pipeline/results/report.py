"""One report over many run directories: report.html (self-contained) and report.md.

Per (model, dataset): BLEU against activation ratio, one line per score (and
allocation: ``cor_gxo/global/mean`` is cor_gxo ranked across layers), with a
shaded 95% bootstrap interval over samples (label-free, deployable scores dashed
next to the attribution oracles); a table of the highest achieved sparsity within 5%
accuracy loss per score x model x dataset, with its bootstrap interval; a heatmap of
the kept fraction per layer for one score and level (``static`` by default: the top-k
scores keep the same fraction of every layer by construction); and each run's metadata.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.results.store import RUN_INFO, atomic_write_text, read_records
from pipeline.results.summary import max_sparsity_within_loss, record_series
from pipeline.scores.metrics import SCORES

BOOTSTRAP = 1000


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


def label_free(series: str) -> bool:
    """Whether a series' score is label-free (deployable), from the score table."""
    row = SCORES.get(series.split("/")[0])
    return row is not None and row.label_free


def top_k_per_layer(series: str) -> bool:
    """Whether a series keeps floor(p*n)/n of every layer by construction (per_layer top-k)."""
    metric, *allocation = series.split("/")
    return not allocation and metric in SCORES and not SCORES[metric].thresholds


class RunData:
    """A run's records as arrays: BLEU and sparsity per (series, level) x sample; a series is a
    metric under one allocation (``summary.series_name``)."""

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
        self.samples = sorted({r["sample_id"] for r in self.records})
        self.metrics = sorted({record_series(r) for r in self.records})
        self.levels = sorted({r["level"] for r in self.records})
        index = {s: i for i, s in enumerate(self.samples)}
        shape = (len(self.metrics), len(self.levels), len(self.samples))
        self.bleu, self.sparsity = np.full(shape, np.nan), np.full(shape, np.nan)
        self.task, self.dense_task = np.full(shape, np.nan), np.full(shape, np.nan)
        for r in self.records:
            key = (self.metrics.index(record_series(r)), self.levels.index(r["level"]), index[r["sample_id"]])
            self.bleu[key], self.sparsity[key] = r["bleu"], r["sparsity"]
            if r.get("task_score") is not None:
                self.task[key], self.dense_task[key] = r["task_score"], r["dense_task_score"]
        # bootstrap replicates of the per-(metric, level) means, resampling samples
        rng = np.random.default_rng(0)
        picks = rng.integers(0, len(self.samples), size=(BOOTSTRAP, len(self.samples)))
        self.boot_bleu = np.nanmean(self.bleu[..., picks], axis=-1)  # [metrics, levels, BOOTSTRAP]
        self.boot_sparsity = np.nanmean(self.sparsity[..., picks], axis=-1)

    def curve(self, m: int):
        x = 1 - np.nanmean(self.sparsity[m], axis=-1)
        y = np.nanmean(self.bleu[m], axis=-1)
        low, high = np.percentile(self.boot_bleu[m], [2.5, 97.5], axis=-1)
        order = np.argsort(x)
        return x[order], y[order], low[order], high[order]

    def headline(self, m: int) -> tuple[float, float, float]:
        def best(sparsity, bleu):
            return max_sparsity_within_loss(list(zip(sparsity.tolist(), (100 - bleu).tolist())))

        point = best(np.nanmean(self.sparsity[m], -1), np.nanmean(self.bleu[m], -1))
        replicates = [best(self.boot_sparsity[m, :, b], self.boot_bleu[m, :, b]) for b in range(BOOTSTRAP)]
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
        rows = [r for r in self.records if record_series(r) == metric and r["level"] == nearest and "kept_heads" in r]
        if not rows:
            return None
        return nearest, np.mean([r["kept_heads"] for r in rows], 0), np.mean([r["kept_neurons"] for r in rows], 0)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def curve_plot(run: RunData) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, metric in enumerate(run.metrics):
        x, y, low, high = run.curve(m)
        style = "--" if label_free(metric) else "-"
        (line,) = ax.plot(x, y, style, marker="o", markersize=3, label=metric + (" (label-free)" if label_free(metric) else ""))
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(95, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="activation ratio (1 - achieved sparsity)", ylabel="BLEU vs dense output", xlim=(0, 1.02),
           ylim=(-2, 102), title=f"{run.model} on {run.dataset} ({len(run.samples)} samples, 95% bootstrap bands)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def heatmap_plot(run: RunData, metric: str, level: float) -> tuple[bytes, str] | None:
    """The kept-fraction heatmap and its caption, for ``metric`` or, when the run lacks it,
    the run's first score (so that every run still gets a heatmap)."""
    if metric not in run.metrics:
        metric = run.metrics[0]
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
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _png(fig), caption


TABLE_LEVELS = (0.5, 0.8)


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
    return html_rows, md + [""]


def write_report(paths: list[str], output: str | None, heatmap_metric: str, heatmap_level: float) -> Path:
    runs = [RunData(p) for p in find_runs(paths)]
    out = Path(output or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    assets = out / "report_assets"
    assets.mkdir(exist_ok=True)

    table_rows, sections, md = [], [], ["# Sparse activation report", ""]
    md += ["| model | dataset | score | max sparsity within 5% loss | 95% interval | samples | run |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for m, metric in enumerate(run.metrics):
            point, low, high = run.headline(m)
            # the run column tells apart runs of one model and dataset (another device, dtype or slice)
            cells = [run.model, run.dataset, metric + (" (label-free)" if label_free(metric) else ""),
                     f"{point:.3f}", f"[{low:.3f}, {high:.3f}]", str(len(run.samples)), run.name]
            table_rows.append(f'<tr class="run-row" data-run="{html.escape(run.name)}">'
                              + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            md.append("| " + " | ".join(cells) + " |")
    md.append("")
    task_rows, task_md = _task_table(runs)
    md += task_md
    for run in runs:
        curve = curve_plot(run)
        (assets / f"{run.name}_curves.png").write_bytes(curve)
        images = [f'<img class="curve" alt="curves {html.escape(run.name)}" src="data:image/png;base64,'
                  f'{base64.b64encode(curve).decode()}">']
        md += [f"## {run.model} on {run.dataset}", "", f"![curves](report_assets/{run.name}_curves.png)", ""]
        heatmap = heatmap_plot(run, heatmap_metric, heatmap_level)
        if heatmap is not None:
            heat, caption = heatmap
            (assets / f"{run.name}_layers.png").write_bytes(heat)
            images.append(f'<img class="heatmap" alt="layers {html.escape(run.name)}" src="data:image/png;base64,'
                          f'{base64.b64encode(heat).decode()}"><p class="caption">{html.escape(caption)}</p>')
            md += [f"![kept per layer](report_assets/{run.name}_layers.png)", "", f"*{caption}*", ""]
        session = run.summary.get("last_session", {})
        # wall_s covers only the last invocation (a resumed run shows just its tail), hence the key
        meta = {"run directory": str(run.dir), "config fingerprint": run.info["fingerprint"],
                "finished": session.get("finished_utc", "?"),
                "wall time of last session (s)": session.get("wall_s", "?"),
                "device": session.get("device", "?"),
                "versions": ", ".join(f"{k} {v}" for k, v in session.get("versions", {}).items()) or "?"}
        meta_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in meta.items())
        md += [f"- {k}: {v}" for k, v in meta.items()] + [""]
        sections.append(f'<section class="run" id="run-{html.escape(run.name)}"><h2>{html.escape(run.model)} on '
                        f'{html.escape(run.dataset)}</h2>{"".join(images)}<dl>{meta_html}</dl></section>')

    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sparse activation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; display: block; margin: .5em 0; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 2px 12px; font-size: 0.85em; }}
dt {{ color: #666; }} section {{ border-top: 1px solid #ddd; margin-top: 2em; }}
</style></head>
<body data-runs="{len(runs)}">
<h1>Sparse activation report</h1>
<p>{len(runs)} run(s). Accuracy is BLEU of the masked output against the dense output; shaded bands and
intervals are 95% bootstrap intervals over samples ({BOOTSTRAP} resamples). Dashed lines are label-free,
deployable scores; solid lines are attribution oracles.</p>
<h2>Highest achieved sparsity within 5% accuracy loss</h2>
<table id="headline"><tr><th>model</th><th>dataset</th><th>score</th><th>max sparsity</th><th>95% interval</th>
<th>samples</th><th>run</th></tr>{"".join(table_rows)}</table>
<h2>Fidelity and task accuracy at fixed levels</h2>
<p>Fidelity is BLEU against the dense output; the task score is exact match in % (GSM8K) or BLEU
against the reference answer (TruthfulQA), next to the dense model's own task score.</p>
<table id="task"><tr><th>model</th><th>dataset</th><th>score</th><th>level</th><th>achieved sparsity</th>
<th>BLEU vs dense [95%]</th><th>task score [95%]</th><th>dense task score</th></tr>{"".join(task_rows)}</table>
{"".join(sections)}
<script>
// lets a headless browser check that every plot decoded
window.addEventListener("load", () => {{
  const images = [...document.images];
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = images.length;
}});
</script>
</body></html>
"""
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    print(f"report of {len(runs)} run(s): {out / 'report.html'} and {out / 'report.md'}")
    return out / "report.html"
