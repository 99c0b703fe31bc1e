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
    """One worker process, fed by a thread of this one.

    ``submit`` returns at once (it waits only while ``IN_FLIGHT`` batches are queued);
    ``wait`` returns once everything submitted is written. The thread does the pipe's
    blocking writes and reads (they release the interpreter lock), so neither the
    worker's start (its imports take seconds) nor its pace holds up the GPU's feeder.
    """

    IN_FLIGHT = 2

    def __init__(self, tokenizer, protocol, task):
        import queue
        import threading

        environment = dict(os.environ, SPARSEACT_HOST_PATH=os.pathsep.join(sys.path), TOKENIZERS_PARALLELISM="false",
                           OMP_NUM_THREADS="1")
        self._process = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env=environment)
        self._jobs: queue.Queue = queue.Queue(maxsize=self.IN_FLIGHT)
        self._error: str | None = None
        self._thread = threading.Thread(target=self._feed, args=((tokenizer, protocol, task),), daemon=True,
                                        name="sparseact-host-feeder")
        self._thread.start()

    def _feed(self, start) -> None:
        try:
            _write(self._process.stdin, start)
            while (job := self._jobs.get()) is not None:
                if self._error is None:
                    _write(self._process.stdin, job)
                    answer = _read(self._process.stdout)
                    if answer is not None or self._process.poll() not in (None, 0):
                        self._error = answer or "the worker process exited"
        except Exception as error:  # noqa: BLE001 - reported by submit / wait
            self._error = f"{type(error).__name__}: {error}"
            while self._jobs.get() is not None:  # let submit and wait go on
                pass

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing records failed in the worker process: {self._error}")

    def submit(self, decoded, skip, path: Path) -> None:
        self._check()
        self._jobs.put((decoded, skip, str(path)))

    def wait(self) -> None:
        try:
            self._jobs.put(None)
            self._thread.join()
        finally:
            self._process.stdin.close()
            self._process.wait()
        self._check()
