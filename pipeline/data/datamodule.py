"""The Lightning data module: samples in, batches of ``Sample`` out.

Lightning's predict loop gives each rank its own shard of this dataset; samples
already in the run directory are left out before sharding (resume).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from pipeline.data.sources import Sample


class SampleDataModule(L.LightningDataModule):
    def __init__(self, samples: list[Sample], batch_size: int = 1):
        super().__init__()
        self.samples = samples
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        # Samples stay Python objects: tokenisation depends on the model's template and
        # happens in the LightningModule.
        return DataLoader(self.samples, batch_size=self.batch_size, shuffle=False, collate_fn=list)
