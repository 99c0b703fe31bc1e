"""Stop cleanly on SIGTERM / SIGUSR1: finish the batch in flight, write it, and exit.

SLURM sends SIGTERM when a job is preempted, cancelled or requeued by an admin, and
SIGUSR1 ahead of the time limit when asked to (``#SBATCH --signal=USR1@90``). Every
finished batch is already on disk, so stopping between batches loses nothing; the
rerun (or the requeued job) skips what is done.

Ctrl-C (SIGINT) stops at once instead: the handler raises ``Interrupted``, which
Lightning tears down after and passes on. (A ``KeyboardInterrupt`` would meet
Lightning's own handler, which exits with status 1 and no word on what was saved.)
The batch in flight is lost; everything before it is on disk.

Under Lightning's own DDP launcher the other ranks are children of rank 0 and do not
see a signal sent to it, so rank 0 passes SIGTERM/SIGUSR1 on: every rank then stops at
its next batch boundary and exits quietly (only rank 0 prints), instead of waiting at
the final barrier for a rank 0 that has gone. (srun and torchrun signal every rank.)
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


class Interrupted(BaseException):
    """Ctrl-C during prediction. Like ``KeyboardInterrupt``, not an ``Exception``: code that falls
    back on errors (``except Exception``, e.g. a failed CUDA graph capture) must not swallow it."""


class PreemptionCallback(L.Callback):
    """Remembers a stop signal and ends the predict loop at the next batch boundary."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._children: list[int] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self._children = [p.pid for p in getattr(trainer.strategy.launcher, "procs", None) or []]
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for pid in self._children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _interrupt(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the teardown
        raise Interrupted()

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
