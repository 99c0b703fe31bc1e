"""Callbacks: install the module's unit hooks for the whole predict loop, remove them after; build and write
records as batches finish; show how many blocks all ranks have finished."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

from pipeline.results.raw_scores import save_scores
from pipeline.results.store import RECORDS, append_records

BACKGROUND_ON_ACCELERATORS = True  # the default of RecordWriter(background=None)
# While the record thread works, the thread that feeds the device gets the GIL back within this many
# seconds (Python's default is 5 ms): every torch call releases and retakes the GIL, and each retake
# waited for the record thread's turn to end, so the device waited on the host far more than
# the records' own time.
RECORD_THREAD_SWITCH_S = 0.0002
# A batch's host work waits until the next batch's launch-bound work (dense labels, attribution: many
# small kernels, each launch needing the GIL) is queued and the feeding thread mostly waits for the
# device (masked decoding); started at once, it slowed those launches while the device idled
# (Phi-2 shape, 256 questions, H200: cold runs 6% and warm runs 5% faster with it; benchmarks/RESULTS.md,
# session 8, call 3). It waits at most this long, so that a writer nobody waits for cannot hang the
# process at exit.
RECORDS_AFTER_LAUNCHES = True
RECORDS_START_AT_THE_LATEST_S = 60.0


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
    """Builds each batch's records and appends them to the run directory (one shard per rank), durably.

    A predict step returns its host work (a callable giving the ``EvaluatedBatch``: text,
    BLEU, record lines). With ``background`` (default: on an accelerator) that work and
    the write run in one worker thread while the device computes the next batch: on an
    H200 they took 20-28% of a run with the GPU idle. That work starts when the predict step
    says the device is busy (``device_busy``, once the next batch's launch-bound work is
    queued) or when it is waited for, whichever comes first. At most one batch is pending: it is
    on disk before the next one is queued, when prediction ends, and when it fails (a
    Ctrl-C or an error in the next batch loses only that batch). A kill -9 may also lose
    the pending batch until its host work has run: about the next batch's labels and scores
    and then a second.
    """

    def __init__(self, run_dir: Path, background: bool | None = None):
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)
        self.background = background
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._may_start: threading.Event | None = None  # the pending batch's host work may start
        self._switch_interval: float | None = None  # Python's, while the record thread runs

    def shard(self, trainer) -> Path:
        name = RECORDS if trainer.world_size == 1 else RECORDS.replace(".jsonl", f".rank{trainer.global_rank}.jsonl")
        return self.run_dir / name

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.background is None:
            self.background = BACKGROUND_ON_ACCELERATORS and trainer.strategy.root_device.type != "cpu"

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.wait()
        if not self.background:
            return self._write(self.shard(trainer), prediction)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="sparseact-records")
            if RECORD_THREAD_SWITCH_S:
                self._switch_interval = sys.getswitchinterval()
                sys.setswitchinterval(min(RECORD_THREAD_SWITCH_S, self._switch_interval))
        self._may_start = may_start = threading.Event()
        if not RECORDS_AFTER_LAUNCHES:
            may_start.set()
        self._pending = self._worker.submit(self._write_once_started, may_start, self.shard(trainer), prediction)

    def device_busy(self) -> None:
        """The feeding thread's launch-bound work of the batch is queued: the pending batch's host
        work may start now (called by the predict step; ``protocol.decode_batch``'s ``launched``)."""
        self._let_start()

    def _let_start(self) -> None:
        if self._may_start is not None:
            self._may_start.set()

    @classmethod
    def _write_once_started(cls, may_start: threading.Event, shard: Path, host_work) -> None:
        may_start.wait(RECORDS_START_AT_THE_LATEST_S)
        cls._write(shard, host_work)

    @staticmethod
    def _write(shard: Path, host_work) -> None:
        evaluated = host_work()
        # Scores first: a sample counts as done once its records are on disk.
        for sample_id, scores in evaluated.scores.items():
            save_scores(shard.parent, sample_id, scores)
        append_records(shard, evaluated.records)

    def wait(self) -> None:
        """Until the pending batch is on disk; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        self._let_start()
        if pending is not None:
            pending.result()

    def _close(self) -> None:
        self._let_start()  # a batch nobody waited for (a hook before this one failed) is still written
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    def on_predict_end(self, trainer, pl_module) -> None:
        try:
            self.wait()
        finally:
            self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:
            self.wait()  # what finished before the failure is kept
        except Exception as error:  # noqa: BLE001 - the failure being handled is the one raised
            print(f"the batch before the failure was not saved either: {type(error).__name__}: {error}",
                  file=sys.stderr)
        finally:
            self._close()


class RunProgressBar(TQDMProgressBar):
    """tqdm's bar (it also leaves readable lines in batch-job logs) over the blocks of all ranks.

    Blocks go to whichever rank is free (``data/datamodule.py``), so one rank's count says little
    of the run's: every rank adds its finished blocks to the data module's shared count, and rank
    0, the one that shows the bar, shows that count out of all blocks.
    """

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        finished = getattr(trainer.datamodule, "finished", None)
        if finished is None:  # predicting without the run's data module: this rank's own count
            return super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._show(finished.add())

    def on_predict_end(self, trainer, pl_module) -> None:
        finished = getattr(trainer.datamodule, "finished", None)
        if finished is not None:
            self._show(finished.value())  # what the others finished since (they may still be at work)
        super().on_predict_end(trainer, pl_module)

    def _show(self, finished: int) -> None:
        bar = self.predict_progress_bar
        if not bar.disable:  # shown on rank 0 only
            bar.n = finished
            bar.refresh()
