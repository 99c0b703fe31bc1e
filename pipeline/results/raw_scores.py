"""Per-sample raw scores as safetensors: ``scores/<sample id>.safetensors`` in the run directory.

Each file holds ``<metric>/heads`` ``[tokens, layers, heads]`` and ``<metric>/neurons``
``[tokens, layers, neurons]`` for every metric of the run, for users' own analysis.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline.scores.attribution import UnitScores

FOLDER = "scores"


def _path(run_dir: Path, sample_id: str) -> Path:
    return Path(run_dir) / FOLDER / (sample_id.replace("/", "_").replace(":", "_") + ".safetensors")


def save_scores(run_dir: Path, sample_id: str, scores: dict[str, UnitScores]) -> None:
    path = _path(run_dir, sample_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for metric, unit_scores in scores.items():
        tensors[f"{metric}/heads"] = unit_scores.heads.detach().float().cpu().contiguous()
        tensors[f"{metric}/neurons"] = unit_scores.neurons.detach().float().cpu().contiguous()
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata={"sample_id": sample_id})
    partial.replace(path)


def load_scores(run_dir: str | Path, sample_id: str) -> dict[str, UnitScores]:
    """The saved scores of one sample: ``{metric: UnitScores(heads, neurons)}``."""
    tensors = load_file(str(_path(Path(run_dir), sample_id)))
    metrics = sorted({key.split("/")[0] for key in tensors})
    return {m: UnitScores(heads=tensors[f"{m}/heads"], neurons=tensors[f"{m}/neurons"]) for m in metrics}
