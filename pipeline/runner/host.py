"""Host work in a separate process: building and writing a batch's records.

A batch's records need sacreBLEU, detokenisation and JSON for every (metric, level)
row: pure Python. In a thread of the predicting process that work would hold the
interpreter lock against the thread that feeds the GPU (every PyTorch call gives the
lock up and must win it back), so it runs in one worker process instead. The worker
takes batches in order and appends each one's records to the shard before it takes
the next, so records reach the disk in batch order, as without the worker.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

_STATE: dict = {}


def _start(tokenizer, protocol, task) -> None:
    import torch

    torch.set_num_threads(1)  # the predicting process keeps the cores
    _STATE.update(tokenizer=tokenizer, protocol=protocol, task=task)


def _finish_and_write(decoded, skip, path: str) -> int:
    from pipeline.results.store import append_records

    evaluated = decoded.finish(_STATE["tokenizer"], _STATE["protocol"], _STATE["task"], skip)
    append_records(Path(path), evaluated.records)
    return len(evaluated.records)


class HostWorker:
    """One worker process; ``submit`` returns at once, ``wait`` until everything submitted is written."""

    IN_FLIGHT = 2  # batches handed over but not yet written, before ``submit`` waits

    def __init__(self, tokenizer, protocol, task):
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                                         initargs=(tokenizer, protocol, task))
        self._pending: list[Future] = []

    def submit(self, decoded, skip, path: Path) -> None:
        while len(self._pending) >= self.IN_FLIGHT:
            self._pending.pop(0).result()  # raises what the worker raised
        self._pending.append(self._pool.submit(_finish_and_write, decoded, skip, str(path)))

    def wait(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=False)
