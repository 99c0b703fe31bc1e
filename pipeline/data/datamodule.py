"""The Lightning data module: samples in, fixed blocks of ``Sample`` out, dealt to whichever rank is free.

A batch's samples share padded computations, so float rounding in a sample's numbers
can depend on its batch-mates. Batches are therefore fixed blocks of consecutive
samples of the evaluated slice, whatever the number of ranks and however often the
run was resumed: a block with a sample still missing is computed whole, and only
the missing samples are written. Which rank computes a block changes no number, so
blocks go to the ranks as they become free (``BlockDeal``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

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


class SharedCount:
    """A count that every rank of a run adds to: a key in a ``torch.distributed`` store (by default
    the one the process group formed with: atomic over all ranks and nodes), or a local count."""

    def __init__(self, key: str | None = None, store=None):
        # the process group's store: torch has no public getter for it, and a TCPStore of our own
        # would need an address and port every launcher agrees on
        self._store = store if store is not None or key is None else dist.distributed_c10d._get_default_store()
        self._key = key
        self._local = 0

    def add(self, amount: int = 1) -> int:
        """Count ``amount`` more; the count after it, over every rank."""
        if self._store is not None:
            return self._store.add(self._key, amount)
        self._local += amount
        return self._local

    def value(self) -> int:
        return self.add(0)


class BlockDeal(Sampler[int]):
    """The indices of the blocks one rank computes, in the order it computes them.

    With a fixed deal (every world-size-th block) a run lasts as long as its slowest rank's share,
    however much faster the others are (mixed nodes, a busy node). Rank r computes block r first
    (every rank starts at once, and a rank gets a block whenever there are enough), then claims
    the next unclaimed block each time it asks for one, that is once it has finished the last. On
    equal GPUs this changes nothing measurable (benchmarks/RESULTS.md, session 11).

    The length is the number of blocks of all ranks, an upper bound: given a length, Lightning
    asks for a block when it starts one (without it, it fetches one ahead: one claim too early).
    """

    def __init__(self, blocks: int, rank: int, world_size: int, claimed: SharedCount | None):
        self.blocks, self.rank, self.world_size, self.claimed = blocks, rank, world_size, claimed

    def __len__(self) -> int:
        return self.blocks

    def __iter__(self):
        if self.claimed is None:  # one process, or ranks without a process group: every world-size-th block
            yield from range(self.rank, self.blocks, self.world_size)
            return
        if self.rank < self.blocks:
            yield self.rank
        # claims count 1, 2, ... over all ranks; blocks 0 .. world_size - 1 went to the ranks directly
        while (index := self.world_size - 1 + self.claimed.add()) < self.blocks:
            yield index


class SampleDataModule(L.LightningDataModule):
    def __init__(self, samples: list[Sample], batch_size: int = 1, done: set[str] | frozenset = frozenset()):
        super().__init__()
        self.blocks = blocks(samples, batch_size, done)
        self.claimed: SharedCount | None = None  # blocks claimed past each rank's first (BlockDeal), over all ranks
        self.finished = SharedCount()  # blocks finished by all ranks (the progress bar's count)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # rank 0 names this run's counts: the same on every rank, new for every run of a process group
            name = trainer.strategy.broadcast(uuid.uuid4().hex, src=0)
            self.claimed = SharedCount(f"sparseact/{name}/claimed")
            self.finished = SharedCount(f"sparseact/{name}/finished")

    def predict_dataloader(self) -> DataLoader:
        # Samples stay Python objects: tokenisation depends on the model's template and
        # happens in the LightningModule. One block is one batch. Blocks are dealt here (the
        # trainer runs without a distributed sampler, which would refuse a rank with nothing
        # left to do near the end of a resumed run).
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        deal = BlockDeal(len(self.blocks), rank, world_size, self.claimed)
        return DataLoader(self.blocks, batch_size=None, sampler=deal, collate_fn=_same)


def _same(block: Block) -> Block:
    return block
