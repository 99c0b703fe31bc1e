"""The Lightning data module: samples in, fixed blocks of ``Sample`` out.

A batch's samples share padded computations, so float rounding in a sample's numbers
can depend on its batch-mates. Batches are therefore fixed blocks of consecutive
samples of the evaluated slice, whatever the number of ranks and however often the
run was resumed: a block with a sample still missing is computed whole, and only
the missing samples are written. Each rank takes every world-size-th block.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader

from pipeline.data.sources import Sample


@dataclass  # not frozen: Lightning walks batches with apply_to_collection, which refuses frozen ones
class Block:
    samples: list[Sample]
    done: frozenset[str] = frozenset()  # already in the run directory: computed with the block, not written


def blocks(samples: list[Sample], batch_size: int, done: set[str] | frozenset = frozenset()) -> list[Block]:
    """The blocks of ``batch_size`` consecutive samples that still have a sample to write."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    return [Block(chunk, frozenset(s.id for s in chunk if s.id in done)) for chunk in chunks
            if any(s.id not in done for s in chunk)]


class SampleDataModule(L.LightningDataModule):
    def __init__(self, samples: list[Sample], batch_size: int = 1, done: set[str] | frozenset = frozenset()):
        super().__init__()
        self.blocks = blocks(samples, batch_size, done)

    def predict_dataloader(self) -> DataLoader:
        # Samples stay Python objects: tokenisation depends on the model's template and
        # happens in the LightningModule. One block is one batch. Blocks are dealt to the
        # ranks here (the trainer runs without a distributed sampler, which would refuse a
        # rank with nothing left to do near the end of a resumed run).
        trainer = self.trainer
        mine = self.blocks[trainer.global_rank::trainer.world_size] if trainer is not None else self.blocks
        return DataLoader(mine, batch_size=None, shuffle=False, collate_fn=_same)


def _same(block: Block) -> Block:
    return block
