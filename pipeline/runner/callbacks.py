"""Callbacks: install the module's unit hooks for the whole predict loop, remove them after; write records as batches finish."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from pipeline.results.raw_scores import save_scores
from pipeline.results.store import RECORDS, append_records


class MaskingCallback(L.Callback):
    """Installs the module's ``UnitHooks`` (probe, scale, mask) when prediction starts and removes
    them when it ends or fails, so the model leaves the run as it came in."""

    def on_predict_start(self, trainer, pl_module) -> None:
        pl_module.unit_hooks.install()

    def on_predict_end(self, trainer, pl_module) -> None:
        pl_module.unit_hooks.remove()

    def on_exception(self, trainer, pl_module, exception) -> None:
        pl_module.unit_hooks.remove()


class RecordWriter(BasePredictionWriter):
    """Appends each batch's records to the run directory (one shard per rank), durably."""

    def __init__(self, run_dir: Path):
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)

    def shard(self, trainer) -> Path:
        name = RECORDS if trainer.world_size == 1 else RECORDS.replace(".jsonl", f".rank{trainer.global_rank}.jsonl")
        return self.run_dir / name

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        # Scores first: a sample counts as done once its records are on disk.
        for sample_id, scores in prediction.scores.items():
            save_scores(self.run_dir, sample_id, scores)
        append_records(self.shard(trainer), prediction.records)
