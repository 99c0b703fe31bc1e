"""The HTML report, rendered in headless Chromium: a non-empty screenshot, every run's row and plot."""

import html
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import make_tiny_checkpoint

from pipeline.cli import main
from pipeline.results.record import Record

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=5000"]


def _chromium():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("SPARSEACT_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return binary


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tiny = make_tiny_checkpoint(root / "tiny")
    config = root / "sweep.yaml"
    config.write_text(f"""models: [{{name: {tiny}}}]
datasets: [{{limit: 4}}, {{limit: 3, start: 10}}]
protocol: {{metrics: [magnitude, cor_gxo, wina], allocation: [per_layer, global], normalize: mean,
           levels: [0.0, 0.3, 0.6, 0.9], max_new_tokens: 6, save_scores: true}}
run: {{progress: false}}
root: {root / "runs"}
""")
    main(["sweep", "--config", str(config)])
    return root / "runs"


def test_report_renders_in_chromium(two_runs, tmp_path):
    """Rendered in a real browser: every plot decodes; the matrix and the curves come first, the
    headroom table next, and the long tables come last, collapsed (no height until opened)."""
    import json

    binary = _chromium()
    runs = sorted(p.name for p in two_runs.iterdir())
    assert len(runs) == 2
    main(["report", "--runs", str(two_runs), "--output", str(tmp_path)])
    page = (tmp_path / "report.html").as_uri()

    dom = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120).stdout
    for run in runs:
        assert dom.count(f'data-run="{run}"') == 6  # one long-table row per score x allocation
        assert f'id="run-{run}"' in dom and f'alt="layers {run}"' in dom
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images="(\d+)"', dom)
    assert loaded and total and loaded.group(1) == total.group(1) == str(1 + len(runs))  # curves + heatmaps decoded

    layout = json.loads(html.unescape(re.search(r'data-layout="([^"]*)"', dom).group(1)))
    top = {key: value[0] for key, value in layout.items()}
    assert top["matrix"] < top["last-matrix"] < top["curves"] < top["headroom"] < top["details-headline"] < top["details-task"]
    assert layout["curves"][1] > 200  # the panels are drawn at a readable size
    # collapsed: the long tables are not shown, their <details> are one summary line high
    assert layout["headline"][2] is False and layout["task"][2] is False
    assert 0 < layout["details-headline"][1] < 60 and 0 < layout["details-task"][1] < 60
    assert layout["matrix"][2] and layout["last-matrix"][2] and layout["curves"][2] and layout["headroom"][2]
    for details in re.findall(r"<details[^>]*>", dom):
        assert " open" not in details
    # the source order says the same, for readers of the Markdown and of the raw page
    source = (tmp_path / "report.html").read_text()
    assert (source.index('id="matrix-demo"') < source.index('id="curves"') < source.index('id="headroom"')
            < source.index('id="headline"') < source.index('id="task"'))
    md = (tmp_path / "report.md").read_text()
    assert md.index("### demo") < md.index("![curves]") < md.index("## Oracle headroom") < md.index("<details>")

    shot = tmp_path / "shot.png"
    subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1100,2600",
                    f"--screenshot={shot}", page], capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 2600 and pixels.shape[1] == 1100
    assert np.std(pixels[..., :3]) > 0.05  # not a blank page
    # by default the heatmap shows a series whose kept fraction differs per layer
    assert "Kept fraction per layer: magnitude/global/mean at p = 0.6." in source


def _masks_by_hand(scores, level, normalize=None):
    """Switched-off sets per (token, layer) written out with Python sorting: per_layer switches off
    the floor(p*n) lowest of each layer; global (``normalize`` mean) the floor(p*layers*n) lowest of
    all layers after dividing each layer by its mean |score| at that token (ties: lower index)."""
    tokens, layers, units = scores.shape
    off = np.zeros((tokens, layers, units), dtype=bool)
    for t in range(tokens):
        if normalize is None:
            for layer in range(layers):
                values = scores[t, layer].tolist()
                for unit in sorted(range(units), key=lambda u: (values[u], u))[: int(level * units + 1e-9)]:
                    off[t, layer, unit] = True
        else:
            scaled = [(scores[t, layer, u].item() / scores[t, layer].abs().mean().item(), layer * units + u)
                      for layer in range(layers) for u in range(units)]
            for _, flat in sorted(scaled)[: int(level * layers * units + 1e-9)]:
                off[t, flat // units, flat % units] = True
    return off


def _iou_by_hand(off, other_off):
    ratios = [(a & b).sum() / (a | b).sum() for a, b in zip(off.reshape(-1, off.shape[-1]),
                                                           other_off.reshape(-1, off.shape[-1])) if (a | b).any()]
    return sum(ratios) / len(ratios) if ratios else None


def test_records_carry_mask_iou_with_the_oracle_equal_to_masks_from_saved_scores(two_runs):
    """The per-record IoU against cor_gxo under the same allocation, recomputed from the run's saved
    raw scores with masks built by hand (per_layer and global/mean), for every label-free record at
    levels 0.3 and 0.6."""
    import json

    from pipeline import load_scores

    checked = 0
    for run_dir in sorted(two_runs.iterdir()):
        records = [Record.from_json(json.loads(line)) for line in (run_dir / "records.jsonl").read_text().splitlines()]
        for record in records:
            if record.metric in ("cor_gxo",):
                assert record.iou_cor_gxo is None  # oracle rows are left as they were
                continue
            normalize = record.normalize
            reference = "cor_gxo/global/mean" if normalize else "cor_gxo"  # the same allocation only
            assert set(record.iou_cor_gxo) == {reference}
            if record.level not in (0.3, 0.6):
                continue
            scores = load_scores(run_dir, record.sample_id)
            steps = max(1, record.n_tokens)
            for kind in ("heads", "neurons"):
                mine = _masks_by_hand(getattr(scores[record.metric], kind)[:steps], record.level, normalize)
                oracle = _masks_by_hand(getattr(scores["cor_gxo"], kind)[:steps], record.level, normalize)
                expected = _iou_by_hand(mine, oracle)
                assert record.iou_cor_gxo[reference][kind] == pytest.approx(expected, abs=1e-4)
                checked += 1
    assert checked == 2 * 2 * 2 * 2 * (4 + 3)  # scores x allocations x levels x kinds x samples


def test_mask_iou_of_known_masks():
    import torch

    from pipeline.measures.mask_stats import mask_iou, oracle_overlap

    keep = torch.ones(2, 3, 4, dtype=torch.bool)  # [tokens, layers, units]
    other = torch.ones(2, 3, 4, dtype=torch.bool)
    keep[0, 0, [0, 1]] = False
    other[0, 0, [1, 2]] = False  # token 0, layer 0: {0, 1} vs {1, 2} -> 1/3
    keep[0, 2, 3] = False
    other[0, 2, 3] = False  # token 0, layer 2: {3} vs {3} -> 1
    keep[1, 1, 0] = False  # token 1, layer 1: {0} vs {} -> 0; the other (token, layer) pairs switch nothing off
    assert mask_iou(keep, other) == pytest.approx(round((1 / 3 + 1 + 0) / 3, 4))
    assert mask_iou(keep, keep) == 1.0
    assert mask_iou(torch.ones(2, 3, 4, dtype=torch.bool), torch.ones(2, 3, 4, dtype=torch.bool)) is None

    # rows: which rows get an overlap, against which oracle row (same level, same allocation;
    # calibrated: per_layer), over which steps
    rows = [(("magnitude", "per_layer", None), 0.5), (("magnitude", "per_layer", None), 0.8),
            (("cor_gxo", "per_layer", None), 0.5), (("cor_gxo", "global", "mean"), 0.5), (("snip", "per_layer", None), 0.5),
            (("wina", "global", "mean"), 0.5), (("wina", "calibrated", None), 0.5), (("wina", "global", "rank"), 0.5)]
    heads = torch.stack([keep, keep, other, keep, other, other, keep, keep])
    neurons = torch.stack([keep, keep, keep, other, other, keep, keep, keep])
    found = oracle_overlap(heads, neurons, rows, steps=[1, 2, 2, 2, 2, 2, 2, 2])
    assert found[2] is None and found[3] is None and found[4] is None  # oracle rows and other oracles
    assert found[1] is None and found[7] is None  # no cor_gxo row at 0.8, none under global/rank
    both_steps = pytest.approx((1 / 3 + 1 + 0) / 3, abs=1e-4)  # keep against other, as above
    step_zero = pytest.approx((1 / 3 + 1) / 2, abs=1e-4)  # step 0 only: layers 0 and 2
    assert found[0] == {"cor_gxo": {"heads": step_zero, "neurons": 1.0}}
    assert found[5] == {"cor_gxo/global/mean": {"heads": both_steps, "neurons": both_steps}}
    assert found[6] == {"cor_gxo": {"heads": both_steps, "neurons": 1.0}}  # calibrated: against per_layer
    assert oracle_overlap(heads[[0, 4]], neurons[[0, 4]], [rows[0], rows[4]], [2, 2]) == [None, None]  # no cor_gxo


def test_sweep_rerun_skips_finished_cells(two_runs, capsys):
    config = two_runs.parent / "sweep.yaml"
    before = {p: p.read_bytes() for p in two_runs.rglob("records*.jsonl")}
    main(["sweep", "--config", str(config)])
    out = capsys.readouterr().out
    assert out.count("samples already done") == 2
    assert {p: p.read_bytes() for p in two_runs.rglob("records*.jsonl")} == before


def test_sweep_writes_slurm_cells(two_runs, tmp_path, capsys):
    config = two_runs.parent / "sweep.yaml"
    main(["sweep", "--config", str(config), "--root", str(tmp_path / "cells_root"), "--slurm", "true"])
    listing = (tmp_path / "cells_root" / "cells.txt").read_text().splitlines()
    assert len(listing) == 2 and all(line.endswith(".yaml") for line in listing)
    assert "sbatch --array=0-1 slurm/array.sbatch" in capsys.readouterr().out
    for line in listing:  # each cell config is a valid `sparseact run --config`
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--config", line, "--print_config"])
        assert exit_info.value.code == 0


def _record(**fields) -> Record:
    """A record written by hand: the fields a test sets, neutral values for the others."""
    neutral = {"sparsity": 0.0, "kept_heads": [1.0], "kept_neurons": [1.0], "bleu": 100.0, "token_agreement": 1.0,
               "task_score": None, "dense_task_score": None, "n_tokens": 1, "n_dense_tokens": 1, "output": "",
               "dense_output": "", "question": "", "reference": ""}
    return Record(**{**neutral, **fields})


def _synthetic_run(run_dir, rng, gz: bool, metrics=("cor_gxo", "magnitude")):
    """A run directory written by hand: 7 samples x the scores x 3 levels with random measures."""
    import gzip
    import json

    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": "f" * 16, "dataset": "gsm8k",
                                                  "config": {"model": {"name": "tiny"}}}))
    records = [_record(sample_id=f"gsm8k:{i}", metric=metric, level=level, sparsity=float(rng.uniform(0, level)),
                       bleu=float(rng.uniform(0, 100)), task_score=float(rng.choice([0.0, 100.0])),
                       dense_task_score=100.0 * (i % 2))
               for i in range(7) for metric in metrics for level in (0.0, 0.5, 0.8)]
    text = "".join(r.to_json() + "\n" for r in records)
    if gz:
        (run_dir / "records.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (run_dir / "records.jsonl").write_text(text)
    return records


def test_task_table_matches_direct_means_and_reads_gzipped_records(tmp_path):
    from pipeline.results.report import RunData

    plain = _synthetic_run(tmp_path / "plain", np.random.default_rng(3), gz=False)
    _synthetic_run(tmp_path / "gz", np.random.default_rng(3), gz=True)
    run, zipped = RunData(tmp_path / "plain"), RunData(tmp_path / "gz")
    assert sorted(map(str, zipped.records)) == sorted(map(str, run.records))

    m = run.metrics.index("magnitude")
    point = run.at_level(m, 0.8)
    chosen = [r for r in plain if r.metric == "magnitude" and r.level == 0.8]
    assert point["sparsity"] == pytest.approx(sum(r.sparsity for r in chosen) / 7)
    assert point["bleu"][0] == pytest.approx(sum(r.bleu for r in chosen) / 7)
    assert point["task"][0] == pytest.approx(sum(r.task_score for r in chosen) / 7)
    assert point["dense_task"][0] == pytest.approx(300 / 7)
    assert point["task"][1] <= point["task"][0] <= point["task"][2]
    assert run.at_level(m, 0.3) is None  # a level the run does not have is not guessed

    main(["report", "--runs", str(tmp_path / "gz"), "--output", str(tmp_path / "out")])
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("| tiny | gsm8k |") == 2 + 2 * 2  # headline rows + task rows at 0.5 and 0.8


def test_heatmap_defaults_to_static_and_falls_back_to_first_score(tmp_path):
    rng = np.random.default_rng(4)
    _synthetic_run(tmp_path / "runs" / "topk", rng, gz=False)  # cor_gxo and magnitude, no static
    _synthetic_run(tmp_path / "runs" / "calibrated", rng, gz=False, metrics=("magnitude", "static"))
    _controlled_run(tmp_path / "runs" / "withglobal", rng)  # per_layer and global series, no static
    main(["report", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    page = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    # three runs of one model and dataset: the long table's rows say which run each comes from
    headline = md.split("<details><summary>Every series")[1].split("</details>")[0]
    assert headline.count("| withglobal |") == len(SERIES)
    assert headline.count("| topk |") == 2 and headline.count("| calibrated |") == 2
    note = "Top-k scores keep floor(p·n)/n of every layer by construction (docs/protocol.md §5.1)"

    # without static the run still gets a heatmap, of its first score, flagged as flat by construction
    assert (tmp_path / "out" / "report_assets" / "topk_layers.png").exists()
    topk = page.split('id="run-topk"')[1].split("</section>")[0]
    assert 'alt="layers topk"' in topk and "Kept fraction per layer: cor_gxo at p = 0.5." in topk
    assert note in topk and f"*Kept fraction per layer: cor_gxo at p = 0.5. {note}" in md

    # with static the default shows it, without the top-k note
    calibrated = page.split('id="run-calibrated"')[1].split("</section>")[0]
    assert 'alt="layers calibrated"' in calibrated
    assert "Kept fraction per layer: static at p = 0.5.</p>" in calibrated and note not in calibrated
    assert "*Kept fraction per layer: static at p = 0.5.*" in md
    assert md.count("- wall time of last session (s): ") == 3 and "- wall time (s)" not in md

    # a run with a global series shows it by default (label-free first): it differs per layer
    withglobal = page.split('id="run-withglobal"')[1].split("</section>")[0]
    assert "Kept fraction per layer: magnitude/global/mean at p = 0.5.</p>" in withglobal
    # a calibrated series comes before a global one
    from pipeline.results.report import RunData, default_heatmap_series

    run = RunData(tmp_path / "runs" / "withglobal")
    assert default_heatmap_series(run) == "magnitude/global/mean"
    run.metrics = sorted(run.metrics + ["wina/calibrated"])
    assert default_heatmap_series(run) == "wina/calibrated"


def test_one_curve_drawing_for_a_runs_plot_and_the_reports_panels(tmp_path, monkeypatch):
    """curves.png of a run and the report's small multiples both go through plot.draw_curves."""
    from pipeline.results import plot

    drawn = []
    original = plot.draw_curves
    monkeypatch.setattr(plot, "draw_curves", lambda ax, curves, title: (drawn.append((title, [c.series for c in curves])),
                                                                         original(ax, curves, title)))
    records = _controlled_run(tmp_path / "runs" / "one", np.random.default_rng(2))
    from pipeline.results.summary import summarize

    plot.plot_curves(summarize(records), tmp_path / "curves.png", "one run")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    main(["report", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    series = sorted(f"{m}/{a}/{n}" if n else m for m, a, n in SERIES)
    assert drawn == [("one run", series), ("tiny on gsm8k (6 samples)", series)]


SERIES = {  # (metric, allocation, normalize): BLEU lost per unit of level, so that the cells differ
    ("cor_gxo", "per_layer", None): 8, ("cor_gxo", "global", "mean"): 5, ("snip", "per_layer", None): 60,
    ("magnitude", "per_layer", None): 40, ("magnitude", "global", "mean"): 20, ("wina", "per_layer", None): 30}
LEVELS = (0.0, 0.3, 0.5, 0.8)


def _controlled_run(run_dir, rng, samples=6):
    """A run written by hand with every allocation field, and mask overlaps on label-free rows."""
    import json

    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": "c" * 16, "dataset": "gsm8k",
                                                  "config": {"model": {"name": "tiny"}}}))
    records = []
    for i in range(samples):
        for (metric, allocation, normalize), slope in SERIES.items():
            for level in LEVELS:
                iou = None
                if metric in ("magnitude", "wina"):
                    iou = {
                        name: {"heads": None if level == 0 else round(float(rng.uniform()), 4),
                               "neurons": None if level == 0 else round(float(rng.uniform()), 4)}
                        for name in ("cor_gxo", "cor_gxo/global/mean")}
                records.append(_record(sample_id=f"gsm8k:{i}", metric=metric, level=level,
                                       sparsity=level * float(rng.uniform(0.85, 1.0)),
                                       bleu=float(np.clip(100 - slope * level * float(rng.uniform(0.3, 1.7)), 0, 100)),
                                       kept_heads=[1 - level, 1.0], kept_neurons=[1.0, 1 - level],
                                       allocation=allocation, normalize=normalize, iou_cor_gxo=iou))
    (run_dir / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    return records


def _by_hand(records, metric, allocation, normalize, picks=None):
    """Max sparsity within 5 BLEU points, by hand: per level the mean over the (resampled) samples,
    levels walked in order of mean sparsity, linear interpolation at the first that loses more."""
    ids = sorted({r.sample_id for r in records})
    chosen = [ids[k] for k in picks] if picks is not None else ids
    points = []
    for level in LEVELS:
        rows = {r.sample_id: r for r in records
                if (r.metric, r.allocation, r.normalize, r.level) == (metric, allocation, normalize, level)}
        points.append((sum(rows[s].sparsity for s in chosen) / len(chosen),
                       100 - sum(rows[s].bleu for s in chosen) / len(chosen)))
    points.sort()
    best = 0.0
    for k, (sparsity, loss) in enumerate(points):
        if loss > 5:
            if k == 0:
                return 0.0
            s0, l0 = points[k - 1]
            return s0 + (5 - l0) * (sparsity - s0) / (loss - l0)
        best = sparsity
    return best


def _percentile(values, q):
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (position - low)


def test_matrix_and_headroom_numbers_against_a_computation_by_hand(tmp_path, capsys):
    records = _controlled_run(tmp_path / "runs" / "controlled", np.random.default_rng(7))
    main(["report", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    page = (tmp_path / "out" / "report.html").read_text()
    matrix = page.split('id="matrix-gsm8k"')[1].split("</table>")[0]

    # columns: label-free scores first, then the oracles, each group in the score table's order
    headers = re.findall(r"<th[^>]*>([a-z_]+)</th>", matrix)
    assert headers == ["model", "allocation", "magnitude", "wina", "snip", "cor_gxo"]
    assert matrix.index("label-free (deployable)") < matrix.index("oracle (needs the dense output)")

    # the documented resampling: 1000 resamples of the samples, seed 0, percentiles 2.5 and 97.5
    samples = len({r.sample_id for r in records})
    picks = np.random.default_rng(0).integers(0, samples, size=(1000, samples)).tolist()
    point, replicates = {}, {}
    for metric, allocation, normalize in SERIES:
        key = (metric, allocation + (f"/{normalize}" if normalize else ""))
        point[key] = _by_hand(records, metric, allocation, normalize)
        replicates[key] = [_by_hand(records, metric, allocation, normalize, p) for p in picks]
    for (metric, allocation), value in point.items():
        row = re.search(rf'<tr data-model="tiny" data-allocation="{allocation}">(.*?)</tr>', matrix).group(1)
        cell = re.search(rf'<td class="([^"]*)" data-metric="{metric}" data-value="([^"]+)" data-low="([^"]+)" '
                         rf'data-high="([^"]+)"', row)
        assert float(cell.group(2)) == pytest.approx(value, abs=1e-6)
        assert float(cell.group(3)) == pytest.approx(_percentile(replicates[metric, allocation], 2.5), abs=1e-6)
        assert float(cell.group(4)) == pytest.approx(_percentile(replicates[metric, allocation], 97.5), abs=1e-6)
        best_in_row = max((m for m, a in point if a == allocation), key=lambda m: point[m, allocation])
        assert ("best" in cell.group(1).split()) == (metric == best_in_row)
    # global/mean has no snip and no wina: empty cells, not zeros
    row = re.search(r'<tr data-model="tiny" data-allocation="global/mean">(.*?)</tr>', matrix).group(1)
    assert 'data-metric="snip">–' in row and 'data-metric="wina">–' in row

    # headroom: the fraction of cor_gxo's best allocation (here global/mean), the overlap with
    # cor_gxo under the row's own allocation (the records carry both to tell them apart)
    reference = max(("per_layer", "global/mean"), key=lambda a: point["cor_gxo", a])
    assert reference == "global/mean"
    rows = re.findall(r'<tr class="headroom-row" ([^>]*)>', page)
    assert len(rows) == 3  # magnitude x 2 allocations, wina x 1
    for attrs in rows:
        found = dict(re.findall(r'data-([a-z0-9-]+)="([^"]*)"', attrs))
        key = (found["metric"], found["allocation"])
        assert float(found["fraction"]) == pytest.approx(point[key] / point["cor_gxo", reference], abs=1e-6)
        for level, name in ((0.5, "iou-05"), (0.8, "iou-08")):
            allocation, normalize = (key[1], None) if key[1] == "per_layer" else key[1].split("/")
            same = "cor_gxo" if normalize is None else f"cor_gxo/global/{normalize}"  # the same allocation's oracle
            chosen = [r.iou_cor_gxo[same] for r in records if r.level == level
                      and (r.metric, r.allocation, r.normalize) == (key[0], allocation, normalize)]
            heads, neurons = map(float, found[name].split(","))
            assert heads == pytest.approx(sum(c["heads"] for c in chosen) / len(chosen), abs=1e-6)
            assert neurons == pytest.approx(sum(c["neurons"] for c in chosen) / len(chosen), abs=1e-6)

    # the same numbers as text (what the README quotes), with the paired interval of the fraction
    from pipeline.results.report import main as report_main

    capsys.readouterr()
    report_main(["--print", str(tmp_path / "runs")])
    text = capsys.readouterr().out
    m = ("magnitude", "global/mean")
    ratios = [a / b for a, b in zip(replicates[m], replicates["cor_gxo", reference]) if b > 0]
    fraction = (f"{point[m] / point['cor_gxo', reference]:.2f} "
                f"[{_percentile(ratios, 2.5):.2f}, {_percentile(ratios, 97.5):.2f}]")
    line = next(line for line in text.splitlines() if line.startswith("gsm8k") and "magnitude  global/mean" in line)
    assert fraction in line and f"cor_gxo/global/mean {point['cor_gxo', reference]:.3f}" in line
    matrix_line = next(line for line in text.splitlines() if line.startswith("tiny") and "per_layer" in line)
    cor = point["cor_gxo", "per_layer"]
    assert (f"{cor:.3f} [{_percentile(replicates['cor_gxo', 'per_layer'], 2.5):.3f}, "
            f"{_percentile(replicates['cor_gxo', 'per_layer'], 97.5):.3f}]*") in matrix_line


def test_iou_rounding_ties_round_as_the_exact_mean_does():
    """Two (token, layer) entries of 400 units, each switched off entirely by one mask and in ``b1``
    and ``b2`` units by the other: the exact IoU, (b1 + b2) / 800, is a rounding tie at 4 places when
    b1 + b2 is odd. Records carry it rounded half to even (decimal arithmetic here), whatever order a
    float mean summed in: alone (``mask_iou``) and in a batch of samples (``oracle_overlap``'s path)."""
    from decimal import ROUND_HALF_EVEN, Decimal

    import torch

    from pipeline.measures.mask_stats import mask_iou, oracle_overlaps

    units, totals = 400, range(1, 800, 2)
    keeps, others, expected, float_rounded = [], [], [], []
    for total in totals:
        shares = (min(units, total), total - min(units, total))
        keep = torch.zeros(2, 1, units, dtype=torch.bool)  # every unit off at both tokens
        other = torch.ones(2, 1, units, dtype=torch.bool)
        for token, share in enumerate(shares):
            other[token, 0, :share] = False
        keeps.append(keep)
        others.append(other)
        expected.append(float((Decimal(total) / 800).quantize(Decimal("0.0001"), ROUND_HALF_EVEN)))
        float_rounded.append(round(torch.tensor([s / units for s in shares], dtype=torch.float64).mean().item(), 4))
    assert sum(a != b for a, b in zip(expected, float_rounded)) > 100  # the float64 mean alone rounds many wrongly

    assert [mask_iou(k, o) for k, o in zip(keeps, others)] == expected
    rows = [(("magnitude", "per_layer", None), 0.5), (("cor_gxo", "per_layer", None), 0.5)]
    heads = torch.stack([torch.cat(keeps), torch.cat(others)])  # [rows, samples x 2 tokens, 1, units]
    found = oracle_overlaps(heads, heads, rows, [2] * len(keeps), [[2, 2]] * len(keeps))
    assert [pairs.overlaps()[0]["cor_gxo"]["heads"] for pairs in found] == expected
    assert [pairs.overlaps()[0]["cor_gxo"]["neurons"] for pairs in found] == expected
