"""The HTML report, rendered in headless Chromium: a non-empty screenshot, every run's row and plot."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import make_tiny_checkpoint

from pipeline.cli import main

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
protocol: {{metrics: [magnitude, cor_gxo, wina], levels: [0.0, 0.3, 0.6, 0.9], max_new_tokens: 6}}
run: {{progress: false}}
root: {root / "runs"}
""")
    main(["sweep", "--config", str(config)])
    return root / "runs"


def test_report_renders_in_chromium(two_runs, tmp_path):
    binary = _chromium()
    runs = sorted(p.name for p in two_runs.iterdir())
    assert len(runs) == 2
    main(["report", "--runs", str(two_runs), "--output", str(tmp_path)])
    page = (tmp_path / "report.html").as_uri()

    dom = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120).stdout
    for run in runs:
        assert dom.count(f'data-run="{run}"') == 3  # one table row per score
        assert f'id="run-{run}"' in dom
        assert f'alt="curves {run}"' in dom and f'alt="layers {run}"' in dom
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images="(\d+)"', dom)
    assert loaded and total and loaded.group(1) == total.group(1) == str(2 * len(runs))  # every plot decoded

    shot = tmp_path / "shot.png"
    subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1100,2600",
                    f"--screenshot={shot}", page], capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 2600 and pixels.shape[1] == 1100
    assert np.std(pixels[..., :3]) > 0.05  # not a blank page
    assert (tmp_path / "report.md").read_text().count("| ") > 6


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


def _synthetic_run(run_dir, rng, gz: bool, metrics=("cor_gxo", "magnitude")):
    """A run directory written by hand: 7 samples x the scores x 3 levels with random measures."""
    import gzip
    import json

    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": "f" * 16, "dataset": "gsm8k",
                                                  "config": {"model": {"name": "tiny"}}}))
    records = [{"sample_id": f"gsm8k:{i}", "metric": metric, "level": level, "sparsity": float(rng.uniform(0, level)),
                "bleu": float(rng.uniform(0, 100)), "task_score": float(rng.choice([0.0, 100.0])),
                "dense_task_score": 100.0 * (i % 2), "kept_heads": [1.0], "kept_neurons": [1.0]}
               for i in range(7) for metric in metrics for level in (0.0, 0.5, 0.8)]
    text = "".join(json.dumps(r) + "\n" for r in records)
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
    chosen = [r for r in plain if r["metric"] == "magnitude" and r["level"] == 0.8]
    assert point["sparsity"] == pytest.approx(sum(r["sparsity"] for r in chosen) / 7)
    assert point["bleu"][0] == pytest.approx(sum(r["bleu"] for r in chosen) / 7)
    assert point["task"][0] == pytest.approx(sum(r["task_score"] for r in chosen) / 7)
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
    main(["report", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    page = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    # two runs of one model and dataset: the headline rows say which run each comes from
    headline = md.split("\n\n")[1]
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
    assert md.count("- wall time of last session (s): ") == 2 and "- wall time (s)" not in md
