"""Host work in a separate process: building and writing a batch's records.

A batch's records need sacreBLEU, detokenisation and JSON for every (metric, level)
row: pure Python. In a thread of the predicting process that work would hold the
interpreter lock against the thread that feeds the GPU (every PyTorch call gives the
lock up and must win it back), so it runs in one worker process instead. The worker
takes batches in order and appends each one's records to the shard before it takes
the next, so records reach the disk in batch order, as without the worker.

The worker is a plain ``python -c`` child fed pickled jobs on its standard input (not
a multiprocessing pool: those re-import the caller's main module, which a script
calling ``evaluate`` unguarded would run again).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

_BOOT = ("import sys, os; sys.path[:0] = [p for p in os.environ['SPARSEACT_HOST_PATH'].split(os.pathsep) if p]; "
         "from pipeline.runner.host import serve; serve()")


def _read(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    return pickle.loads(stream.read(int.from_bytes(header, "little")))


def _write(stream, obj) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(blob).to_bytes(8, "little") + blob)
    stream.flush()


def serve() -> None:
    """The worker's loop: the first message is (tokenizer, protocol, task), then jobs until end of input."""
    import torch

    from pipeline.results.store import append_records

    torch.set_num_threads(1)  # the predicting process keeps the cores
    source, answers = sys.stdin.buffer, sys.stdout.buffer
    tokenizer, protocol, task = _read(source)
    while (job := _read(source)) is not None:
        decoded, skip, path = job
        try:
            evaluated = decoded.finish(tokenizer, protocol, task, skip)
            append_records(Path(path), evaluated.records)
            _write(answers, None)
        except Exception as error:  # noqa: BLE001 - reported to the predicting process
            _write(answers, f"{type(error).__name__}: {error}")


class HostWorker:
    """One worker process; ``submit`` returns at once, ``wait`` until everything submitted is written."""

    IN_FLIGHT = 2  # batches handed over but not yet written, before ``submit`` waits

    def __init__(self, tokenizer, protocol, task):
        environment = dict(os.environ, SPARSEACT_HOST_PATH=os.pathsep.join(sys.path), TOKENIZERS_PARALLELISM="false",
                           OMP_NUM_THREADS="1")
        self._process = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env=environment)
        _write(self._process.stdin, (tokenizer, protocol, task))
        self._pending = 0

    def _answer(self) -> None:
        answer = _read(self._process.stdout)
        self._pending -= 1
        if answer is not None or self._process.poll() not in (None, 0):
            raise RuntimeError(f"writing records failed in the worker process: {answer or 'it exited'}")

    def submit(self, decoded, skip, path: Path) -> None:
        while self._pending >= self.IN_FLIGHT:
            self._answer()
        _write(self._process.stdin, (decoded, skip, str(path)))
        self._pending += 1

    def wait(self) -> None:
        try:
            while self._pending:
                self._answer()
        finally:
            self._process.stdin.close()
            self._process.wait()
