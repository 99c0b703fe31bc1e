"""Stop cleanly on SIGTERM / SIGUSR1: finish the batch in flight, write it, and exit.

SLURM sends SIGTERM when a job is preempted, cancelled or requeued by an admin, and
SIGUSR1 ahead of the time limit when asked to (``#SBATCH --signal=USR1@90``). Every
finished batch is already on disk, so stopping between batches loses nothing; the
rerun (or the requeued job) skips what is done.
"""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class PreemptionCallback(L.Callback):
    """Remembers a stop signal and ends the predict loop at the next batch boundary."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def on_predict_start(self, trainer, pl_module) -> None:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.received is not None:
            raise Preempted(self.received)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    job = slurm_job_id()
    if job is None:
        return False
    return subprocess.run(["scontrol", "requeue", job], capture_output=True).returncode == 0
