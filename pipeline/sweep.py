"""Sweeps: every (model, dataset) cell of a grid as its own run directory under one root.

The protocol is shared by every cell, so its lists (scores, allocations, normalisations,
levels) are swept inside each cell, sharing one attribution pass per batch.
Cells run one after another here (each resumes what a killed sweep left), or are
written out as config files for a SLURM job array (``slurm/array.sbatch``).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import yaml

from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig, validate
from pipeline.data.sources import run_name
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


def run_sweep(models: list[ModelConfig], datasets: list[DataConfig], protocol: ProtocolConfig, run: RunConfig,
              root: str, slurm: bool) -> None:
    from tqdm import tqdm

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
            calibration_samples(data, protocol.calibration_samples, "the static metric or calibrated allocation")
    for name, model, data, cell_run in tqdm(grid, desc="sweep", unit="cell", position=0):
        print(f"\n== {name}")
        evaluate(model, data, protocol, cell_run)
    print(f"\nsweep done: {len(grid)} cells under {root_dir}; `sparseact report --runs {root_dir}` summarises them")
