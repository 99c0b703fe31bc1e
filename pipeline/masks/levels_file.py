"""The calibrated levels as a file: saved in the run directory, reused by other runs.

``allocation_levels.json`` holds, per calibrated score, the loss table and the greedy
path of ``calibration.py``, with the model shape and the calibration rows. The whole
path is kept rather than the levels of this run's ``p`` only, so another run (other
levels, other questions) reads its own levels off it. A run that reuses a file names it
with ``--protocol.allocation_levels``; the file's content, not its path, enters the
fingerprint, and a file of another model shape is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.masks import calibration
from pipeline.masks.calibration import FORMAT, layer_gain, levels_for
from pipeline.models.adapters import UnitLayout

LEVELS_FILE = "allocation_levels.json"


def layer_levels(document: dict, metric: str, layout: UnitLayout, levels: list[float]) -> torch.Tensor:
    """``[levels, layers]``: the calibrated per-layer levels of ``metric`` at each requested level."""
    grid = document["grid"]
    index = {q: j for j, q in enumerate(grid)}
    moves = [(move["layer"], index[move["level"]]) for move in document["scores"][metric]["path"]]
    return levels_for(moves, layout.num_layers, grid, layer_gain(layout, grid), levels)


def read_levels(path: str | Path) -> dict:
    """A levels document, or one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"allocation levels file not found: {path}")
    try:
        document = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not JSON; expected the {LEVELS_FILE} of an earlier calibrated run") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UserError(f"{path} is not a calibrated-levels file (format {FORMAT}); use the {LEVELS_FILE} of a run")
    return document


def file_digest(path: str | Path) -> str:
    """What the fingerprint holds for a levels file: its content's hash, not its path."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_levels(document: dict, layout: UnitLayout, metrics: list[str], source: str) -> None:
    """Refuse levels of another model shape, or without the scores this run calibrates."""
    shape = (document.get("layers"), document.get("heads"), document.get("neurons"))
    if shape != (layout.num_layers, layout.num_heads, layout.num_neurons):
        raise UserError(f"{source} holds levels for {shape[0]} layers x {shape[1]} heads x {shape[2]} neurons; "
                        f"this model has {layout.num_layers} x {layout.num_heads} x {layout.num_neurons}")
    missing = [m for m in metrics if m not in document.get("scores", {})]
    if missing:
        raise UserError(f"{source} has no calibrated levels for {', '.join(missing)} "
                        f"(it has {', '.join(document.get('scores', {})) or 'none'})")


class RunLevels:
    """A run's calibrated levels: read from ``--protocol.allocation_levels``, from the run directory
    (a resumed run), or searched on the calibration rows and saved there."""

    def __init__(self, protocol, layout: UnitLayout):
        self.protocol, self.layout = protocol, layout
        self.metrics = protocol.calibrated_metrics()
        self.given = None
        if self.metrics and protocol.allocation_levels is not None:
            self.given = read_levels(protocol.allocation_levels)
            check_levels(self.given, layout, self.metrics, protocol.allocation_levels)

    def tensors(self, model, tokenizer, template: str, samples, stop_ids: list[int],
                run_dir: Path, write: bool = True, graphs=None) -> dict | None:
        """``{metric: [levels, layers]}``, or None when no score is calibrated; writes ``LEVELS_FILE``
        when ``write`` (rank 0 only: every rank uses rank 0's levels, so the file must be those).
        ``graphs``: the run's ``CapturedSteps``, for calibration's dense runs."""
        if not self.metrics:
            return None
        from pipeline.results.store import atomic_write_text

        path = Path(run_dir) / LEVELS_FILE
        if self.given is not None:
            document = self.given
        elif path.exists():
            document = read_levels(path)
        else:
            started = time.time()
            document = calibration.calibrate_levels(model, tokenizer, template, samples, self.metrics, self.layout,
                                                    self.protocol.max_new_tokens, stop_ids,
                                                    self.protocol.calibration_step, graphs)
            print(f"calibrated per-layer levels of {', '.join(self.metrics)} on {len(samples)} rows "
                  f"in {time.time() - started:.1f} s")
        if write and not path.exists():
            atomic_write_text(path, json.dumps(document, indent=1) + "\n")
        return {m: layer_levels(document, m, self.layout, self.protocol.levels) for m in self.metrics}
