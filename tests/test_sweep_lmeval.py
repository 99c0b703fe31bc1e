"""lm-eval cells of ``sparseact sweep`` (an ``lmeval`` section in the sweep file).

* a sweep of a tiny local model over 2 levels x 1 score writes one run directory per cell
  whose results and samples equal a ``run_lmeval`` call written here for the same cell;
* a rerun skips finished cells and runs only a cell without results.json; a changed
  configuration aimed at finished cells is refused;
* ``--slurm true`` writes one ``sparseact lmeval`` YAML per cell and the list that
  ``slurm/array.sbatch`` runs as ``sparseact lmeval --config <cell.yaml>``;
* a bad cell is refused before any cell runs: one line, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_checkpoint, shared_file

pytest.importorskip("lm_eval")

from pipeline.cli import main  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "truthfulqa_mc1_local"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    shared_file("truthfulqa", "TruthfulQA.csv")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _sweep_file(tmp_path, tiny_dir, root, **section) -> Path:
    lmeval = {"name": "tqa", "tasks": [TASK], "scores": ["magnitude"], "levels": [0.0, 0.5], "limit": 2,
              "batch_size": 2, "device": "cpu", "progress": False, **section}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": str(tiny_dir)}], "lmeval": [lmeval], "root": str(root)}))
    return path


def _direct(tiny_dir, out, score, level):
    """``sparseact lmeval`` for one cell, with every argument written out here (limit a float, as the
    command line parses it)."""
    from pipeline.lmeval.run import run_lmeval

    return run_lmeval(ModelConfig(name=str(tiny_dir)), [TASK], score, level, "per_layer", False, 2, 2.0, None, None,
                      [], None, str(out), "cpu", 20, False, False)


def _samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / f"samples_{TASK}.jsonl").read_text().splitlines()]


def test_sweep_cells_equal_direct_runs_and_a_rerun_skips_them(tiny_dir, tmp_path, monkeypatch, capsys):
    import pipeline.lmeval.run as lmeval_run

    root = tmp_path / "sweep"
    config = _sweep_file(tmp_path, tiny_dir, root)
    main(["sweep", "--config", str(config)])
    name = tiny_dir.name
    expected = {f"{name}__tqa__dense": ("wina", 0.0), f"{name}__tqa__magnitude-0.5-per_layer": ("magnitude", 0.5)}
    assert {p.name for p in root.iterdir()} == set(expected)

    for cell, (score, level) in expected.items():
        ours = root / cell
        direct = _direct(tiny_dir, tmp_path / "direct" / cell, score, level)
        assert json.loads((ours / "run.json").read_text()) == json.loads((direct / "run.json").read_text())
        got = json.loads((ours / "results.json").read_text())
        want = json.loads((direct / "results.json").read_text())
        assert got["results"] == want["results"] and got["configs"] == want["configs"]
        assert _samples(ours) == _samples(direct) and len(_samples(ours)) == 2
    dense = json.loads((root / f"{name}__tqa__dense" / "results.json").read_text())["results"][TASK]
    masked = json.loads((root / f"{name}__tqa__magnitude-0.5-per_layer" / "results.json").read_text())
    assert _samples(root / f"{name}__tqa__dense") != _samples(root / f"{name}__tqa__magnitude-0.5-per_layer")
    assert set(dense) == set(masked["results"][TASK])

    # a rerun runs nothing
    calls = []
    original = lmeval_run.run_lmeval
    monkeypatch.setattr(lmeval_run, "run_lmeval", lambda **cell: (calls.append(cell["output_dir"]),
                                                                   original(**cell))[1])
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/results.json")}
    capsys.readouterr()
    main(["sweep", "--config", str(config)])
    assert calls == [] and stamps == {p: p.stat().st_mtime_ns for p in root.glob("*/results.json")}
    assert "2 of 2 lm-eval cells already finished" in capsys.readouterr().out

    # a cell without results.json (killed before the end) is the only one run again
    unfinished = root / f"{name}__tqa__magnitude-0.5-per_layer"
    (unfinished / "results.json").unlink()
    main(["sweep", "--config", str(config)])
    assert calls == [str(unfinished)]
    assert json.loads((unfinished / "results.json").read_text())["results"] == masked["results"]

    # the same root with another configuration: refused before anything runs
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(_sweep_file(tmp_path, tiny_dir, root, limit=3))])
    assert exit_info.value.code == 2 and calls == [str(unfinished)]
    assert "holds an lm-eval run with another configuration (limit, tasks_content_sha256 differ)" in capsys.readouterr().err


def test_slurm_writes_one_lmeval_config_per_cell_and_the_array_runs_lmeval(tiny_dir, tmp_path, capsys):
    root = tmp_path / "sweep"
    main(["sweep", "--config", str(_sweep_file(tmp_path, tiny_dir, root, scores=["magnitude", "cor_gxo"])),
          "--slurm", "true"])
    assert "sbatch --array=0-2 slurm/array.sbatch" in capsys.readouterr().out
    lines = (root / "cells.txt").read_text().splitlines()
    name = tiny_dir.name
    cells = [f"{name}__tqa__dense", f"{name}__tqa__magnitude-0.5-per_layer", f"{name}__tqa__cor_gxo-0.5-per_layer"]
    assert lines == [f"lmeval --config {(root / 'cells' / c).resolve()}.yaml" for c in cells]
    assert not list(root.glob("*/run.json"))  # nothing ran
    config = yaml.safe_load((root / "cells" / f"{cells[2]}.yaml").read_text())
    assert config["model"]["name"] == str(tiny_dir) and config["tasks"] == [TASK]
    assert (config["score"], config["level"], config["allocation"], config["limit"]) == ("cor_gxo", 0.5, "per_layer", 2)
    assert config["output_dir"] == str((root / cells[2]).resolve()) and config["device"] == "cpu"
    for line in lines:  # each file is a valid `sparseact lmeval` config
        with pytest.raises(SystemExit) as exit_info:
            main(["lmeval", "--config", line.split()[-1], "--print_config"])
        assert exit_info.value.code == 0
    capsys.readouterr()

    # slurm/array.sbatch, with srun and sparseact replaced by scripts that print their arguments
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("srun", 'exec "$@"'), ("sparseact", 'echo "sparseact $*"')):
        (bin_dir / tool).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / tool).chmod(stat.S_IRWXU)
    listing = tmp_path / "mixed.txt"
    listing.write_text((root / "cells.txt").read_text() + "configs/truthfulqa.yaml\n--config a.yaml --config b.yaml\n")
    ran = []
    for task in range(5):
        done = subprocess.run(["bash", str(ROOT / "slurm" / "array.sbatch"), str(listing)], check=False,
                              capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                   "SLURM_ARRAY_TASK_ID": str(task)})
        assert done.returncode == 0, done.stderr
        ran.append(done.stdout.splitlines()[-1])
    assert ran == [f"sparseact {line}" for line in lines] + [
        "sparseact run --config configs/truthfulqa.yaml", "sparseact run --config a.yaml --config b.yaml"]


@pytest.mark.parametrize("section, message", [
    ({"scores": ["magnitude", "bogus"]}, "unknown score 'bogus'"),
    ({"tasks": [TASK, "no_such_task"]}, "unknown task(s) no_such_task"),
    ({"levels": [0.0, 0.5, 1.5]}, "level must be a number in [0, 1), got 1.5"),
    ({"allocation": "global"}, "unknown allocation 'global'"),
    ({"scores": ["static"]}, "score 'static' needs per-layer thresholds"),
    ({"data_dir": "/nonexistent"}, "/nonexistent/truthfulqa/TruthfulQA.csv not found"),
    ({"levels": []}, "no levels given"),
])
def test_a_bad_cell_is_refused_before_any_cell_runs(tiny_dir, tmp_path, capsys, section, message):
    root = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(_sweep_file(tmp_path, tiny_dir, root, **section))])
    assert exit_info.value.code == 2 and not root.exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sparseact: error:") and message in err[0], err


def test_an_lmeval_sweep_refuses_run_options_it_would_ignore(tiny_dir, tmp_path, capsys):
    root = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(_sweep_file(tmp_path, tiny_dir, root)), "--protocol.levels", "[0.5]"])
    assert exit_info.value.code == 2 and not root.exists()
    assert "a sweep with an lmeval section runs lm-eval cells only; protocol" in capsys.readouterr().err


def test_the_shipped_lm_eval_sweep_is_the_run_sh_grid(tmp_path, capsys):
    shared_file("gsm8k", "test.jsonl")
    shared_file("truthfulqa", "TruthfulQA.csv")
    root = tmp_path / "grid"
    main(["sweep", "--config", str(ROOT / "configs" / "sweep" / "lm_eval.yaml"), "--root", str(root),
          "--slurm", "true"])
    cells = {Path(line.split()[-1]).stem for line in (root / "cells.txt").read_text().splitlines()}
    expected = set()
    for model in ("smollm2-135m", "gemma3-270m"):
        for tasks, limit in (("truthfulqa", 200), ("gsm8k", 50)):
            expected.add(f"{model}__{tasks}__dense")
            expected |= {f"{model}__{tasks}__{s}-{p}-per_layer" for s in ("magnitude", "wina", "cor_gxo")
                         for p in (0.3, 0.5, 0.7)}
            config = yaml.safe_load((root / "cells" / f"{model}__{tasks}__wina-0.5-per_layer.yaml").read_text())
            assert config["limit"] == limit and config["gen_kwargs"] is None
    assert cells == expected and len(cells) == 40


def test_edited_task_documents_are_another_run(tiny_dir, tmp_path, capsys):
    """The documents a cell evaluates are part of its identity: an edited question inside the
    limit makes the sweep and ``sparseact lmeval`` refuse the finished cell's directory
    (instead of skipping it as done); an edit beyond the limit changes nothing."""
    import csv

    from pipeline.errors import UserError
    from pipeline.lmeval.run import run_lmeval

    data = tmp_path / "data"
    (data / "truthfulqa").mkdir(parents=True)
    csv_path = data / "truthfulqa" / "TruthfulQA.csv"
    shutil.copy(shared_file("truthfulqa", "TruthfulQA.csv"), csv_path)
    root = tmp_path / "sweep"
    config = _sweep_file(tmp_path, tiny_dir, root, levels=[0.5], data_dir=str(data))
    main(["sweep", "--config", str(config)])
    cell = root / f"{tiny_dir.name}__tqa__magnitude-0.5-per_layer"
    assert (cell / "results.json").exists()

    def edit(row: int) -> None:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        question = rows[0].index("Question")
        rows[row + 1][question] += " (edited)"
        with csv_path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)

    edit(10)  # beyond limit 2: the same run
    capsys.readouterr()
    main(["sweep", "--config", str(config)])
    assert "1 of 1 lm-eval cells already finished" in capsys.readouterr().out
    edit(1)  # the second evaluated question
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "another configuration (tasks_content_sha256 differ)" in capsys.readouterr().err
    with pytest.raises(UserError, match="holds a run with another configuration"):
        run_lmeval(ModelConfig(name=str(tiny_dir)), [TASK], "magnitude", 0.5, "per_layer", False, 2, 2.0, None, None,
                   [], str(data), str(cell), "cpu", 20, False, False)
