"""One sample through the whole protocol: labels -> scores -> allocation -> masks -> masked generation -> measures.

This is the body of the predict step, kept free of Lightning so it reads top to
bottom and can be called directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.config import ProtocolConfig
from pipeline.data.sources import Sample
from pipeline.decoding.cuda_graph import CapturedSteps
from pipeline.decoding.generation import dense_generate_batch, masked_after_dense_batch
from pipeline.hooks import UnitHooks
from pipeline.masks.allocation import allocate
from pipeline.masks.static import threshold_masks
from pipeline.measures import bleu_vs_dense, task_score, token_agreement
from pipeline.measures.mask_stats import RowStats, row_stats, token_starts
from pipeline.models.adapters import UnitLayout
from pipeline.models.prompts import answer_length, prompt_ids
from pipeline.results.record import Record
from pipeline.scores.attribution import UnitScores, attribute_batch
from pipeline.scores.metrics import SCORES


@dataclass
class EvaluatedBatch:
    """What one predict step hands to the writer: records, and raw scores when asked for."""

    records: list[Record]
    scores: dict = field(default_factory=dict)  # sample id -> {metric: UnitScores}


@dataclass
class DecodedBatch:
    """A batch after its device work; building its records (``finish``) is host work only."""

    samples: list[Sample]
    dense: list[list[int]]  # per sample, the dense tokens
    outputs: list[list[list[int]]]  # per sample and row, the masked tokens
    stats: list[RowStats]
    scores: dict  # raw scores (protocol.save_scores)

    def finish(self, tokenizer, protocol: ProtocolConfig, task: str, skip=frozenset()) -> EvaluatedBatch:
        """The records of every sample not in ``skip``."""
        records = []
        for sample, dense, stats, rows in zip(self.samples, self.dense, self.stats, self.outputs):
            if sample.id not in skip:
                records += _records(tokenizer, sample, dense, stats, rows, protocol, task)
        return EvaluatedBatch(records=records, scores={k: v for k, v in self.scores.items() if k not in skip})


def decode_batch(model, tokenizer, layout: UnitLayout, samples: list[Sample], template: str,
                 protocol: ProtocolConfig, stop_ids: list[int], thresholds: dict | None = None,
                 layer_levels: dict | None = None, hooks: UnitHooks | None = None,
                 launched: Callable[[], None] | None = None, graphs: CapturedSteps | None = None) -> DecodedBatch:
    """A batch's device work: labels, scores, masks, masked decoding, row numbers; its
    ``finish`` builds the records (host work).

    ``thresholds`` are the calibrated per-layer magnitude thresholds of the ``static`` metric;
    ``layer_levels`` ``{metric: [levels, layers]}`` the calibrated allocation's per-layer levels.
    ``hooks``: the run's ``UnitHooks`` (installed), used by attribution and masked decoding;
    None: each of them installs its own for the call. ``graphs``: the run's ``CapturedSteps`` (the
    decoding steps captured so far, reused); None: captured for this call only. ``launched``: called
    once the launch-bound work (many small kernels: labels, scores, masks) is done and the first
    masked group's steps are queued (``masked_after_dense_batch``'s ``on_queued``); from there the
    host mostly waits for the device, and other host work (the previous batch's records) slows little.

    The dense runs decode together, attribution runs once for the whole batch, and the
    masked rows of all samples decode together. Every masked row continues from its
    own sample's dense run (the prompt and the steps before any unit is off), so a
    masked row and its dense run share exactly the same prompt computation.
    """
    prompts = [torch.tensor(prompt_ids(tokenizer, template, s.question)) for s in samples]

    # Labels: what the dense model says (docs/protocol.md §3).
    dense = dense_generate_batch(
        model, prompts, [answer_length(tokenizer, s.reference, protocol.max_new_tokens) for s in samples], stop_ids,
        graphs)

    # Scores [T, layers, units] per metric and sample.
    scores = _attribute_fitting(model, prompts, [torch.tensor(d.tokens) for d in dense], protocol, hooks)

    # Keep masks [rows = metrics x allocations x levels, tokens of every sample, layers, units]; every row decodes.
    lengths = [len(d.tokens) for d in dense]
    head_keep, neuron_keep = _keep_masks(scores, lengths, protocol, thresholds, layer_levels)
    outputs = masked_after_dense_batch(model, dense, head_keep.split(lengths, 1), neuron_keep.split(lengths, 1),
                                       stop_ids, hooks, on_queued=launched, graphs=graphs)
    stats = row_stats(layout, head_keep, neuron_keep, lengths, outputs, protocol)
    # on the host here: the records' host work may run in another thread, which must not use the GPU
    # while this one captures CUDA graphs
    raw = {s.id: {metric: UnitScores(u.heads.detach().float().cpu(), u.neurons.detach().float().cpu())
                  for metric, u in sc.items()} for s, sc in zip(samples, scores)} if protocol.save_scores else {}
    return DecodedBatch(samples, [d.tokens for d in dense], outputs, stats, raw)


def _attribute_fitting(model, prompts, labels, protocol: ProtocolConfig, hooks: UnitHooks | None):
    """Attribute the whole batch; on out-of-memory, split it in halves (down to one sample)."""
    try:
        return attribute_batch(model, prompts, labels, protocol.metrics, protocol.ig_steps, hooks=hooks)
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
    # Halve outside the except block: there the exception's traceback still holds the failed
    # attempt's frames and their tensors, so every half ran out of memory too (Phi-2 with IG,
    # 64 samples, H200: 138.6 GiB still allocated down to one sample).
    torch.cuda.empty_cache()
    half = len(prompts) // 2
    return (_attribute_fitting(model, prompts[:half], labels[:half], protocol, hooks)
            + _attribute_fitting(model, prompts[half:], labels[half:], protocol, hooks))


def _keep(variant, importance: torch.Tensor, kind: str, levels, thresholds, layer_levels) -> torch.Tensor:
    """Keep masks ``[levels, tokens, layers, units]`` of one (metric, allocation, normalisation) and unit kind."""
    metric, allocation, normalize = variant
    if SCORES[metric].thresholds:
        return threshold_masks(importance, thresholds[kind])
    return allocate(allocation, importance, levels, normalize, (layer_levels or {}).get(metric))


MASK_CHUNK_ELEMENTS = 2**26  # scores allocated at once: bounds the sort's temporaries (its int64 order: 512 MiB)


def _keep_masks(scores: list[dict], lengths: list[int], protocol: ProtocolConfig, thresholds,
                layer_levels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep masks ``[variants x levels, tokens, layers, units]`` of a batch, its samples' tokens one
    after the other (``lengths`` tokens each).

    Every allocation decides token by token, so the tokens of all samples are allocated in
    one call per variant and unit kind (per sample, 640 small calls per batch of 64 kept
    the GPU waiting on the host), in chunks of tokens that bound the sort's memory.
    """
    levels, variants = protocol.levels, protocol.variants()
    starts = token_starts(lengths)
    masks = []
    for kind in ("heads", "neurons"):
        first = getattr(scores[0][variants[0][0]], kind)
        layers, units = first.shape[1:]
        tokens = sum(lengths)
        keep = torch.empty(len(variants) * len(levels), tokens, layers, units, dtype=torch.bool, device=first.device)
        chunk = max(1, MASK_CHUNK_ELEMENTS // (layers * units))
        for v, (metric, allocation, normalize) in enumerate(variants):
            for start in range(0, tokens, chunk):
                stop = min(start + chunk, tokens)
                # the chunk's tokens, from the samples they belong to (no copy of the whole batch's scores)
                importance = torch.cat([getattr(sample[metric], kind)[max(start - at, 0):stop - at]
                                        for sample, at, n in zip(scores, starts, lengths) if at < stop and at + n > start])
                keep[v * len(levels):(v + 1) * len(levels), start:stop] = _keep(
                    (metric, allocation, normalize), importance, kind, levels, thresholds, layer_levels)
        if protocol.dense_first_step:
            keep[:, starts] = True
        masks.append(keep)
    return masks[0], masks[1]


def rounded(values: torch.Tensor) -> list:
    """``round(v, 4)`` of every value of a float32 tensor, as (nested lists of) Python floats.

    For the whole tensor at once (per value, Python's ``round`` took 40% of building a
    batch's records): v x 10^4 is exact in float64 (a 24-bit mantissa times a 14-bit
    number), so rounding it half to even and dividing by 10^4 gives the double nearest
    the correctly rounded decimal, which is what ``round(v, 4)`` returns.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"rounded() is exact for float32 values only, not {values.dtype}")
    return (torch.round(values.double() * 1e4) / 1e4).tolist()


def _records(tokenizer, sample, dense, stats: RowStats, outputs, protocol, task) -> list[Record]:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    dense_text = decode(dense)
    dense_task = task_score(task, dense_text, sample.reference)
    kept_heads, kept_neurons = rounded(stats.kept_heads), rounded(stats.kept_neurons)
    overlaps = stats.pairs.overlaps()
    records = []
    rows = [(v, p) for v in protocol.variants() for p in protocol.levels]
    for row, (((metric, allocation, normalize), level), tokens) in enumerate(zip(rows, outputs)):
        text = decode(tokens)
        records.append(Record(
            sample_id=sample.id,
            metric=metric,
            level=level,
            # averaged over the steps this row actually decoded
            sparsity=stats.sparsity[row, : max(1, len(tokens))].mean().item(),
            # per layer, the kept fraction of heads and of neurons over the decoded steps
            kept_heads=kept_heads[row],
            kept_neurons=kept_neurons[row],
            bleu=bleu_vs_dense(tokens, dense, text, dense_text),
            token_agreement=token_agreement(tokens, dense),
            task_score=task_score(task, text, sample.reference),
            dense_task_score=dense_task,
            n_tokens=len(tokens),
            n_dense_tokens=len(dense),
            output=text,
            dense_output=dense_text,
            question=sample.question,
            reference=sample.reference,
            allocation=allocation,
            normalize=normalize,
            # label-free rows of runs that evaluate the oracle too; None elsewhere (left out of the line)
            iou_cor_gxo=overlaps[row],
        ))
    return records


