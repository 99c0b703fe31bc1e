"""The LightningModule: wraps a causal LM; one predict step runs the protocol on a batch."""

from __future__ import annotations

import lightning as L

from pipeline.config import ProtocolConfig
from pipeline.data.datamodule import Block
from pipeline.hooks import UnitHooks
from pipeline.models.adapters import layout_for
from pipeline.protocol import EvaluatedBatch, evaluate_batch


class SparseActivationModule(L.LightningModule):
    def __init__(self, model, tokenizer, template: str, protocol: ProtocolConfig, task: str, stop_ids: list[int],
                 thresholds: dict | None = None, layer_levels: dict | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.protocol = protocol
        self.task = task
        self.stop_ids = stop_ids
        self.thresholds = thresholds  # calibrated thresholds of the static metric
        self.layer_levels = layer_levels  # {metric: [levels, layers]} of the calibrated allocation
        self.layout = layout_for(model)
        # the run's hooks: installed for the predict loop by MaskingCallback, passed to every step
        self.unit_hooks = UnitHooks(self.layout)
        # near the end of a resumed run a rank may have no block left
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def on_predict_start(self) -> None:
        # Every rank calibrated on its own before the trainer existed; float kernels of different
        # devices may order near-equal values differently, so all ranks take rank 0's.
        self.thresholds, self.layer_levels = self.trainer.strategy.broadcast((self.thresholds, self.layer_levels), src=0)

    def predict_step(self, batch: Block, batch_idx: int):
        # Records leave through the RecordWriter callback, not through a returned list
        # that Lightning would accumulate (trainer.predict runs with return_predictions=False).
        evaluated = evaluate_batch(self.model, self.tokenizer, self.layout, batch.samples, self.template,
                                   self.protocol, self.task, self.stop_ids, self.thresholds,
                                   self.layer_levels, self.unit_hooks)
        return EvaluatedBatch(records=[r for r in evaluated.records if r["sample_id"] not in batch.done],
                              scores={k: v for k, v in evaluated.scores.items() if k not in batch.done})
