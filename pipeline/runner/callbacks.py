"""Callbacks: install the module's unit hooks for the whole predict loop, remove them after; write records as batches finish."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from pipeline.results.raw_scores import save_scores
from pipeline.results.store import RECORDS, append_records
from pipeline.runner.host import HostWorker
from pipeline.runner.module import Deferred, overlaps


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
    """Appends each batch's records to the run directory (one shard per rank), durably.

    A ``Deferred`` batch (GPU runs) has its records built and appended by a worker
    process (``host.py``) while the next batch computes; prediction ends only once
    every handed-over batch is on disk, also when it ends by an exception.
    """

    def __init__(self, run_dir: Path):
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)
        self._worker = None

    def shard(self, trainer) -> Path:
        name = RECORDS if trainer.world_size == 1 else RECORDS.replace(".jsonl", f".rank{trainer.global_rank}.jsonl")
        return self.run_dir / name

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if isinstance(prediction, Deferred):
            # Scores first: a sample counts as done once its records are on disk.
            for sample_id, scores in prediction.decoded.scores.items():
                if sample_id not in prediction.done:
                    save_scores(self.run_dir, sample_id, scores)
            prediction.decoded.scores = {}  # the worker needs none of them
            if self._worker is None:
                self._start_worker(pl_module)
            self._worker.submit(prediction.decoded, prediction.done, self.shard(trainer))
            return
        for sample_id, scores in prediction.scores.items():
            save_scores(self.run_dir, sample_id, scores)
        append_records(self.shard(trainer), prediction.records)

    def _start_worker(self, pl_module) -> None:
        self._worker = HostWorker(pl_module.tokenizer, pl_module.protocol, pl_module.task)

    def on_predict_start(self, trainer, pl_module) -> None:
        if overlaps(pl_module):  # the worker imports while the first batch computes
            self._start_worker(pl_module)

    def _flush(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.wait()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._flush()  # batches finished before the exception are written
