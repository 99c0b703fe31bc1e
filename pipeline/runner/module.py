"""The LightningModule: wraps a causal LM; one predict step runs the protocol on a batch."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import torch
import torch.distributed as dist

from pipeline.config import ProtocolConfig
from pipeline.data.datamodule import Block
from pipeline.decoding.cuda_graph import CapturedSteps
from pipeline.errors import UserError
from pipeline.hooks import UnitHooks
from pipeline.models.adapters import layout_for
from pipeline.protocol import decode_batch

KEEP_ON_DEVICE_AT_TEARDOWN = True  # Lightning's teardown would copy the model to the CPU (Phi-2: 3.5 s)
# cuDNN's attention builds a plan for every new shape (each block, each captured step size):
# seconds each, where the other kernels cost the same per call without it
NO_CUDNN_ATTENTION = True


def _same_run_on_every_rank(fingerprint: str | None, model) -> None:
    """Every rank resolved the same run (weights, questions, settings: the fingerprint) and holds
    the same weights, or every rank stops with the same message. Ranks keep the weights they
    loaded (``runner/strategy.py``) and write into one directory, so a rank that read other
    files, or initialised weights missing from a checkpoint at random, must not run."""
    if fingerprint is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, (fingerprint, weights_checksum(model)))
    for what, index in (("resolved a different run than rank 0 (another fingerprint: other weights, questions "
                         "or settings); every rank must read the same files with the same arguments", 0),
                        ("hold other weights than rank 0 (parameters missing from the checkpoint are initialised "
                         "at random on each rank?)", 1)):
        differing = [rank for rank, other in enumerate(found) if other[index] != found[0][index]]
        if differing:
            raise UserError(f"rank(s) {', '.join(map(str, differing))} {what}")


def weights_checksum(model) -> int:
    """An exact digest of the model's weights: each parameter's bit patterns summed as integers
    (exact on any device), weighted by the parameter's position; one transfer."""
    integer = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = [p.detach().view(integer[p.element_size()]).sum(dtype=torch.int64) for p in model.parameters()]
    return sum((position + 1) * value for position, value in enumerate(torch.stack(sums).tolist()))


def _attention_kernels():
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not NO_CUDNN_ATTENTION:
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class SparseActivationModule(L.LightningModule):
    def __init__(self, model, tokenizer, template: str, protocol: ProtocolConfig, task: str, stop_ids: list[int],
                 thresholds: dict | None = None, layer_levels: dict | None = None, fingerprint: str | None = None,
                 host_tokenizer=None, device_busy=None, graphs: CapturedSteps | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        # The tokenizer of the host work (building records), a copy: that work may run in another
        # thread while this one tokenizes the next batch, and a fast tokenizer is not safe for both at
        # once. Made before the predict loop (run.py copies it while the weights move to the GPU): made
        # at the first batch, it was 0.19 s of an idle device per process (Phi-2 shape, H200).
        self.host_tokenizer = host_tokenizer if host_tokenizer is not None else copy.deepcopy(tokenizer)
        # called in each step once its launch-bound work is queued: RecordWriter.device_busy, which then
        # starts the previous batch's host work (earlier, the GIL that work holds slowed those launches)
        self.device_busy = device_busy
        self.template = template
        self.protocol = protocol
        self.task = task
        self.stop_ids = stop_ids
        self.thresholds = thresholds  # calibrated thresholds of the static metric
        self.layer_levels = layer_levels  # {metric: [levels, layers]} of the calibrated allocation
        self.fingerprint = fingerprint  # of the run this rank resolved (run.json): all ranks must agree
        self.layout = layout_for(model)
        # the run's hooks: installed for the predict loop by MaskingCallback, passed to every step
        self.unit_hooks = UnitHooks(self.layout)
        # the run's captured decoding steps (calibration's, if any, then every batch's), passed to every step
        self.graphs = graphs if graphs is not None else CapturedSteps(model)
        # ranks without a process group deal blocks fixed (data/datamodule.py): one may get none
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def setup(self, stage: str) -> None:
        # Every rank calibrated on its own before the trainer existed; float kernels of different
        # devices may order near-equal values differently, so all ranks take rank 0's. Here and
        # not in on_predict_start: that hook runs only where a predict loop runs, and a rank whose
        # data loader is empty skips it (rank 0 would then wait for it in the broadcast forever).
        _same_run_on_every_rank(self.fingerprint, self.model)
        self.thresholds, self.layer_levels = self.trainer.strategy.broadcast((self.thresholds, self.layer_levels), src=0)

    def predict_step(self, batch: Block, batch_idx: int):
        """The batch's device work; returns its host work (building the records), which the
        RecordWriter callback runs, on an accelerator while the next batch computes.
        (trainer.predict runs with return_predictions=False: Lightning keeps nothing.)"""
        with _attention_kernels():
            decoded = decode_batch(self.model, self.tokenizer, self.layout, batch.samples, self.template,
                                   self.protocol, self.stop_ids, self.thresholds, self.layer_levels,
                                   self.unit_hooks, launched=self.device_busy, graphs=self.graphs)
        return partial(decoded.finish, self.host_tokenizer, self.protocol, self.task, batch.done)

    def cpu(self):
        """Stays where it is: Lightning calls this at the end of ``predict`` only to give the
        device memory back, and the model is not used on the device after the run."""
        if KEEP_ON_DEVICE_AT_TEARDOWN:
            return self
        return super().cpu()
