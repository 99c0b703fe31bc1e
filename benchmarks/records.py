"""Host work of one batch's records: its seconds, and sentence BLEU against sacreBLEU's own call.

Builds a batch of synthetic samples as a run on a random-weight model makes them (every row a
different text of ``--tokens`` random tokens, so nearly every row is scored), times
``protocol._records`` over them (on a GPU this runs in the record thread, and the last batch's
runs while the device waits), and times ``sentence_bleu`` on the same pairs against
one sacreBLEU ``BLEU`` object's ``corpus_score`` per pair, what it was before (the numbers must
be equal: checked here too).

    python benchmarks/records.py --tokenizer .bench_assets/tokenizer --samples 64
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, timed  # noqa: E402


def synthetic_batch(tokenizer, protocol, samples: int, tokens: int, layers: int, seed: int = 0):
    from pipeline.data.sources import Sample
    from pipeline.measures.mask_stats import OraclePairs, RowStats

    rows = len(protocol.variants()) * len(protocol.levels)
    pairs = [(i, "cor_gxo") for i in range(0, rows, 5)]
    rng = random.Random(seed)
    vocabulary = range(1000, min(30000, len(tokenizer)))
    batch = []
    for s in range(samples):
        dense = [rng.choice(vocabulary) for _ in range(tokens)]
        outputs = [[rng.choice(vocabulary) for _ in range(tokens)] for _ in range(rows)]
        stats = RowStats(torch.rand(rows, tokens), torch.rand(rows, layers), torch.rand(rows, layers),
                         OraclePairs(rows, pairs, torch.rand(len(pairs), 2, dtype=torch.float64)))
        batch.append((Sample(id=f"synthetic:{s}", question="What happens if you eat watermelon seeds?",
                             reference="Nothing happens; they pass through your digestive system"), dense, stats, outputs))
    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--samples", type=int, default=64, help="a GPU block")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pipeline.config import ProtocolConfig
    from pipeline.measures.fidelity import sentence_bleu
    from pipeline.protocol import _records

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    protocol = ProtocolConfig(max_new_tokens=args.tokens)
    records_s = []
    for repeat in range(args.repeats):
        batch = synthetic_batch(tokenizer, protocol, args.samples, args.tokens, args.layers, seed=repeat)
        _, seconds = timed(lambda: [_records(tokenizer, sample, dense, stats, outputs, protocol, "bleu_vs_reference")
                                    for sample, dense, stats, outputs in batch], "cpu")
        records_s.append(seconds)

    # BLEU alone, on the pairs of a fresh batch: each row against its dense text and its reference
    batch = synthetic_batch(tokenizer, protocol, args.samples, args.tokens, args.layers, seed=args.repeats)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    pairs = [(decode(row), text) for sample, dense, _, outputs in batch
             for text in (decode(dense), sample.reference) for row in outputs]
    from sacrebleu.metrics import BLEU

    from pipeline.measures import fidelity

    def before():  # what sentence_bleu was: one BLEU object's corpus_score per pair
        bleu = BLEU()
        return [bleu.corpus_score([hypothesis], [[reference]]).score for hypothesis, reference in pairs]

    def now():
        return [sentence_bleu(hypothesis, reference) for hypothesis, reference in pairs]

    seconds, scores = {before: [], now: []}, {}
    for _ in range(args.repeats):  # alternated, each from cold caches and a fresh collection
        for way in (before, now):
            sentence_bleu.cache_clear()
            fidelity._ngrams.cache_clear()
            type(fidelity._BLEU.tokenizer).__call__.cache_clear()
            gc.collect()
            scores[way], spent = timed(way, "cpu")
            seconds[way].append(spent)
    ours, theirs = scores[now], scores[before]
    sacrebleu_s, ours_s = min(seconds[before]), min(seconds[now])
    if ours != theirs:
        raise SystemExit(f"sentence_bleu differs from sacreBLEU on {sum(a != b for a, b in zip(ours, theirs))} pairs")
    lines = [
        f"{args.samples} synthetic samples x {len(batch[0][3])} rows, {args.tokens} random tokens each, "
        f"{args.layers} layers",
        f"records of a batch: {min(records_s):.3f} s (best of {args.repeats}; all: "
        + ", ".join(f"{s:.3f}" for s in records_s) + ")",
        f"sentence BLEU, {len(pairs)} pairs (best of {args.repeats}, cold caches): {ours_s:.3f} s vs one sacreBLEU "
        f"object's corpus_score per pair {sacrebleu_s:.3f} s "
        f"({sacrebleu_s / ours_s:.2f}x); equal on every pair",
    ]
    record("Records of one batch (host work)", lines, "cpu", args.no_record)


if __name__ == "__main__":
    main()
