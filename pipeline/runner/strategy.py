"""The strategy behind ``--run.strategy ddp``: Lightning's DDP, cut to what a predict loop needs.

A run's ranks never exchange tensors: they exchange a few Python objects (rank 0's calibrated
levels and thresholds, every rank's run fingerprint) and wait at barriers. Lightning's DDP
is built for training and, for a predict loop too, starts NCCL on every GPU and sends rank 0's
weights to every other rank. On two H200s with a Phi-2-sized model those took 2.5 s of a 7.4 s
run of 256 questions (``benchmarks/RESULTS.md``, session 6). Here the process group is gloo's,
and each rank keeps the weights it loaded: every rank loaded weights identified by their content,
and ``SparseActivationModule.setup`` refuses to run unless all ranks resolved the same run
(the same fingerprint: weights, questions, settings).
"""

from __future__ import annotations

import time

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn


class PredictDDPStrategy(DDPStrategy):
    """``DDPStrategy`` over gloo whose predict-loop setup does not broadcast rank 0's weights."""

    def __init__(self, **kwargs):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)

    def setup(self, trainer) -> None:
        if trainer.state.fn != TrainerFn.PREDICTING:
            super().setup(trainer)
            return
        # DDPStrategy.setup's predict path, less its broadcast of rank 0's weights
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.setup_precision_plugin()


def strategy_for(name: str):
    """What ``L.Trainer(strategy=...)`` gets for ``--run.strategy``: ours for ``ddp``, else the name."""
    return PredictDDPStrategy() if name == "ddp" else name


def wait_for_ranks(trainer) -> float | None:
    """Join the run's process group now, before the evaluation is timed, and return the seconds
    this rank waited for the others; None where nothing is joined here: one process, a strategy
    other than DDP, or rank 0 under Lightning's own launcher (which starts the other ranks only
    inside ``trainer.predict``; those ranks do join here).

    Ranks started together (torchrun, srun) load their models at once but finish at different
    times; the process group forms only when the last has. Inside ``trainer.predict`` that wait was
    timed as evaluation, which it is not: on two H200s, joining at 0.9 s into rank 0's
    ``evaluated ... in`` (``benchmarks/RESULTS.md``, session 7). This is Lightning's own
    ``setup_environment``; ``trainer.predict`` finds the group formed and goes on."""
    strategy = trainer.strategy
    if trainer.world_size == 1 or not isinstance(strategy, DDPStrategy):
        return None
    if not strategy.cluster_environment.creates_processes_externally:
        return None
    started = time.perf_counter()
    strategy.setup_environment()
    return time.perf_counter() - started
