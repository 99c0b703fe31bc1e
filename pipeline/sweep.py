"""Sweeps: every cell of a grid as its own run directory under one root.

``sparseact run`` cells: one per (model, dataset). The protocol is shared by every cell,
so its lists (scores, allocations, normalisations, levels) are swept inside each cell,
sharing one attribution pass per batch.

lm-eval cells (a sweep with an ``lmeval`` section, ``LmEvalCells``): one ``sparseact
lmeval`` run per (model, task set, score, level), since lm-eval scores one model
configuration per run; level 0 is the dense model whatever the score, so it is one cell
per (model, task set). A cell whose ``results.json`` exists is finished and skipped; a
killed cell resumes from its lm-eval request cache.

Every cell is checked before the first one runs. Cells run one after another here, or
are written out as config files for a SLURM job array (``slurm/array.sbatch``).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import yaml

from pipeline.config import DataConfig, LmEvalCells, ModelConfig, ProtocolConfig, RunConfig, validate
from pipeline.data.sources import lmeval_run_name, run_name
from pipeline.errors import UserError


def cells(models: list[ModelConfig], datasets: list[DataConfig], protocol: ProtocolConfig, run: RunConfig,
          root: Path) -> list[tuple[str, ModelConfig, DataConfig, RunConfig]]:
    grid = []
    for model in models:
        for data in datasets:
            name = run_name(model.name, data, _slice(data))
            grid.append((name, model, data, replace(run, output_dir=str(root / name))))
    names = [cell[0] for cell in grid]
    if len(set(names)) != len(names):
        raise UserError(f"two sweep cells would share a directory: {sorted(n for n in names if names.count(n) > 1)}")
    return grid


def _slice(data: DataConfig) -> str:
    if data.start == 0 and data.limit is None:
        return ""
    return f"_{data.start}-{'end' if data.limit is None else data.start + data.limit}"


def write_slurm_cells(grid, protocol: ProtocolConfig, root: Path) -> Path:
    """One YAML file per cell and the list ``slurm/array.sbatch`` reads."""
    (root / "cells").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model, data, run in grid:
        path = (root / "cells" / f"{name}.yaml").resolve()
        config = {"model": asdict(model), "data": asdict(data), "protocol": asdict(protocol),
                  "run": {**asdict(run), "output_dir": str(Path(run.output_dir).resolve())}}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(str(path))
    listing = root / "cells.txt"
    listing.write_text("".join(p + "\n" for p in paths))
    return listing


def run_sweep(models: list[ModelConfig], datasets: list[DataConfig] | None, protocol: ProtocolConfig,
              run: RunConfig, root: str, slurm: bool, lmeval: list[LmEvalCells] | None = None) -> None:
    """``datasets`` None: the built-in demo set (for sweeps of ``sparseact run`` cells)."""
    if lmeval is not None:
        # an lm-eval sweep takes every option from its lmeval sections; a sweep file that also
        # sets datasets, protocol or run means two grids in one file: refused, not half ignored
        given = [name for name, value, default in (("datasets", datasets, None),
                                                    ("protocol", protocol, ProtocolConfig()), ("run", run, RunConfig()))
                 if value != default]
        if given:
            raise UserError(f"a sweep with an lmeval section runs lm-eval cells only; {', '.join(given)} "
                            "(options of sparseact run cells) would be ignored: put them in a sweep file of their own")
        if not lmeval:
            raise UserError("the lmeval section is empty: give at least one set of tasks")
        run_lmeval_sweep(models, lmeval, root, slurm)
        return
    datasets = [DataConfig()] if datasets is None else datasets
    from tqdm import tqdm

    from pipeline.data.sources import load_samples
    from pipeline.runner.run import calibration_samples, evaluate

    root_dir = Path(root)
    for model in models:
        for data in datasets:
            validate(model, data, protocol, run)
    grid = cells(models, datasets, protocol, run, root_dir)
    if slurm:
        listing = write_slurm_cells(grid, protocol, root_dir)
        print(f"{len(grid)} cells written; submit with:\n"
              f"  sbatch --array=0-{len(grid) - 1} slurm/array.sbatch {listing}")
        return
    if protocol.needs_calibration_rows():  # every cell's calibration rows exist before the first cell runs
        for data in datasets:
            calibration_samples(data, load_samples(data)[0], protocol.calibration_samples)
    for name, model, data, cell_run in tqdm(grid, desc="sweep", unit="cell", position=0):
        print(f"\n== {name}")
        evaluate(model, data, protocol, cell_run)
    print(f"\nsweep done: {len(grid)} cells under {root_dir}; `sparseact report --runs {root_dir}` summarises them")


# -- lm-eval cells ----------------------------------------------------------------------------

DENSE_SCORE = "wina"
"""The score a level-0 cell is run with: at level 0 no score is computed (lm-eval's ``hf``
code path), but ``sparseact lmeval`` records one in ``run.json``."""


def lmeval_cells(models: list[ModelConfig], sections: list[LmEvalCells], root: Path) -> list[tuple[str, dict]]:
    """``(name, arguments of run_lmeval)`` per cell: model x section x (level 0 once, then score x level > 0)."""
    grid = []
    for model in models:
        for section in sections:
            pairs = [(DENSE_SCORE, 0.0)] if any(level == 0 for level in section.levels) else []
            pairs += [(score, float(level)) for score in section.scores for level in section.levels if level != 0]
            for score, level in pairs:
                name = lmeval_run_name(model.name, section.name, score, level, section.allocation)
                grid.append((name, dict(
                    model=model, tasks=list(section.tasks), score=score, level=level, allocation=section.allocation,
                    dense_first_step=section.dense_first_step, batch_size=section.batch_size,
                    limit=section.limit,
                    num_fewshot=section.num_fewshot, gen_kwargs=section.gen_kwargs,
                    include_path=list(section.include_path), data_dir=section.data_dir,
                    output_dir=str(root / name), device=section.device, ig_steps=section.ig_steps,
                    apply_chat_template=section.apply_chat_template, progress=section.progress)))
    names = [name for name, _ in grid]
    if len(set(names)) != len(names):
        raise UserError(f"two lm-eval cells would share a directory: {sorted({n for n in names if names.count(n) > 1})}"
                        " (give each lmeval section its own name)")
    return grid


def check_lmeval_cells(models: list[ModelConfig], sections: list[LmEvalCells],
                       grid: list[tuple[str, dict]]) -> None:
    """Refuse a bad cell (unknown score, task, allocation, missing data file, a directory holding
    another configuration...) before any cell runs: one ``UserError``."""
    import json

    from pipeline.lmeval.run import check_arguments, check_task_data, run_config, task_manager

    if not models:
        raise UserError("no models given")
    for section in sections:
        if not section.name or "/" in section.name or section.name.startswith("."):
            raise UserError(f"lmeval section name {section.name!r} must be a plain part of a directory name "
                            "(e.g. truthfulqa)")
        if not section.levels:
            raise UserError(f"lmeval section {section.name}: no levels given")
        if not section.scores and any(level != 0 for level in section.levels):
            raise UserError(f"lmeval section {section.name}: no scores given for levels above 0")
    digests = {}  # (tasks, include_path, data_dir, limit): the tasks' content, built once per task set
    for name, cell in grid:
        check_arguments(cell["model"], cell["tasks"], cell["score"], cell["level"], cell["allocation"],
                        cell["batch_size"], cell["limit"], cell["ig_steps"])
        documents = (tuple(cell["tasks"]), tuple(cell["include_path"]), cell["data_dir"], cell["limit"])
        if documents not in digests:
            manager = task_manager(cell["tasks"], cell["include_path"], cell["data_dir"])
            digests[documents] = check_task_data(cell["tasks"], manager, cell["limit"])
        stored = Path(cell["output_dir"]) / "run.json"
        if stored.exists():  # a cell started before: same configuration, or refused now rather than mid-sweep
            previous = json.loads(stored.read_text()).get("config", {})
            wanted = run_config(cell["model"], previous.get("weights"), cell["tasks"], cell["score"], cell["level"],
                                cell["allocation"], cell["dense_first_step"], cell["batch_size"], cell["limit"],
                                cell["num_fewshot"], cell["gen_kwargs"], cell["data_dir"], cell["ig_steps"],
                                cell["apply_chat_template"], digests[documents])
            if previous != wanted:
                changed = sorted(k for k in set(previous) | set(wanted) if previous.get(k) != wanted.get(k))
                raise UserError(f"{stored.parent} holds an lm-eval run with another configuration "
                                f"({', '.join(changed)} differ); choose another root or remove that directory")


def lmeval_finished(cell: dict) -> bool:
    return (Path(cell["output_dir"]) / "results.json").exists()


def write_lmeval_slurm_cells(grid: list[tuple[str, dict]], root: Path) -> Path:
    """One ``sparseact lmeval`` YAML per cell and the list ``slurm/array.sbatch`` reads
    (lines ``lmeval --config <cell.yaml>``)."""
    (root / "cells").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, cell in grid:
        path = (root / "cells" / f"{name}.yaml").resolve()
        config = {**cell, "model": asdict(cell["model"]), "output_dir": str(Path(cell["output_dir"]).resolve()),
                  "include_path": [str(Path(p).resolve()) for p in cell["include_path"]],
                  "data_dir": str(Path(cell["data_dir"]).resolve()) if cell["data_dir"] else None}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        lines.append(f"lmeval --config {path}\n")
    listing = root / "cells.txt"
    listing.write_text("".join(lines))
    return listing


def run_lmeval_sweep(models: list[ModelConfig], sections: list[LmEvalCells], root: str, slurm: bool) -> None:
    from tqdm import tqdm

    root_dir = Path(root)
    grid = lmeval_cells(models, sections, root_dir)
    check_lmeval_cells(models, sections, grid)
    if slurm:
        listing = write_lmeval_slurm_cells(grid, root_dir)
        print(f"{len(grid)} lm-eval cells written; submit with:\n"
              f"  sbatch --array=0-{len(grid) - 1} slurm/array.sbatch {listing}")
        return
    from pipeline.lmeval import run as lmeval_run

    todo = [(name, cell) for name, cell in grid if not lmeval_finished(cell)]
    if len(todo) < len(grid):
        print(f"{len(grid) - len(todo)} of {len(grid)} lm-eval cells already finished (results.json): skipped")
    quiet = not todo or not any(cell["progress"] for _, cell in todo)
    for name, cell in tqdm(todo, desc="sweep", unit="cell", position=0, disable=quiet):
        print(f"\n== {name}")
        lmeval_run.run_lmeval(**cell)
    print(f"\nsweep done: {len(grid)} lm-eval cells under {root_dir}; "
          f"`python results/lm_eval/summarize.py {root_dir}` puts accuracy next to fidelity to the dense cells "
          "(the shipped offline tasks)")
