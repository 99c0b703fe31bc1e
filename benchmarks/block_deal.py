"""How evenly two ways of dealing blocks to ranks would split a run, from measured per-block times.

Reads ``end_to_end.py --per-block --json`` output (a cold run, then a warm run, of one process on
one GPU) and replays the blocks on N simulated ranks: each rank's first block costs its warm time
plus the cold run's extra on block 0 (kernel loads, captures: every process pays them once). It
prints each deal's slowest rank and its speed-up over one rank, for the first 4, 12, ... blocks:

* fixed: rank r takes blocks r, r + N, r + 2N, ... (before session 11);
* free rank: rank r takes block r, then whichever rank finishes first claims the next block
  (``pipeline/data/datamodule.py``'s ``BlockDeal``).

    python benchmarks/block_deal.py /path/to/phi2_blocks.json --ranks 2 4
"""

from __future__ import annotations

import argparse
import json


def replay(costs: list[float], ranks: int, cold: float, deal) -> list[float]:
    """Each rank's busy seconds when ``deal(index, busy)`` picks the rank of block ``index``."""
    busy = [0.0] * ranks
    for index, cost in enumerate(costs):
        busy[deal(index, busy)] += cost + (cold if index < ranks else 0.0)  # a rank's first block is cold
    return busy


def fixed(index: int, busy: list[float]) -> int:
    return index % len(busy)


def free_rank(index: int, busy: list[float]) -> int:
    # blocks 0..ranks-1: one to each rank; then the rank that is free first (ties: the lower rank)
    return index if index < len(busy) else min(range(len(busy)), key=lambda r: (busy[r], r))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="end_to_end.py --per-block --json output: a cold run, then a warm one")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--blocks", type=int, nargs="*", default=None, help="first n blocks (default 4, 12, all)")
    args = parser.parse_args()
    cold_run, warm_run = json.load(open(args.json))[:2]
    costs = warm_run["blocks"]
    cold = cold_run["blocks"][0] - warm_run["blocks"][0]
    print(f"{len(costs)} blocks, warm {min(costs):.2f}-{max(costs):.2f} s; a process's first block {cold:.2f} s more")
    for n in args.blocks or sorted({min(4, len(costs)), min(12, len(costs)), len(costs)}):
        one = sum(costs[:n]) + cold
        for ranks in args.ranks:
            for deal in (fixed, free_rank):
                busy = replay(costs[:n], ranks, cold, deal)
                print(f"{n:3d} blocks, {ranks} ranks, {deal.__name__:9s}: slowest rank {max(busy):6.2f} s, "
                      f"idle at the end {sum(max(busy) - b for b in busy):5.2f} s, {one / max(busy):.2f}x one rank")


if __name__ == "__main__":
    main()
