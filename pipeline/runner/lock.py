"""One run per directory at a time: an advisory ``fcntl`` lock per rank.

Each process of a run locks ``<run_dir>/.lock.rank<R>`` (its global rank R) before it
reads what is done or writes anything, and holds it until it exits. The kernel drops
the lock when the process dies, so a run killed with SIGKILL never leaves a stale
lock: the rerun takes it at once.

Why one lock per rank rather than one for the whole run: every rank decides on its own
which blocks are left and appends to its own shard. A single rank-0 lock would let a
second job's rank 1 start while the first job's rank 1 is still writing (a requeued
array task whose old copy is still alive, or a rank 0 that died first). With one lock
per rank, two processes can never write the same shard at once, whatever the ranks'
timing. The holder's pid and host are written into the lock file for the refusal line.

``fcntl`` locks work on local file systems and on NFS with lock support; on a parallel
file system mounted without locks (Lustre without ``flock``) the lock is a no-op.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from pipeline.errors import UserError


def process_rank(devices_per_node: int | str = 1) -> int:
    """This process's global rank, read from the launcher's environment before Lightning starts.

    torchrun sets RANK, srun SLURM_PROCID, and Lightning's own launcher starts rank 0 as
    the user's process and the others with LOCAL_RANK (and NODE_RANK across nodes).
    """
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    per_node = int(devices_per_node) if str(devices_per_node).isdigit() else 1
    return int(env.get("NODE_RANK", 0)) * per_node + int(env.get("LOCAL_RANK", 0))


class RunLock:
    """Holds ``.lock.rank<R>`` in ``run_dir`` until ``release`` or the process's exit."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / f".lock.rank{rank}"
        self.handle = None

    def acquire(self) -> "RunLock":
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{self.path.parent} is in use by another run ({holder}); "
                            "wait for it to finish or stop it, or choose another --run.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor drops the lock
            self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
