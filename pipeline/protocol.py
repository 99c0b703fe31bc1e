"""One sample through the whole protocol: labels -> scores -> allocation -> masks -> masked generation -> measures.

This is the body of the predict step, kept free of Lightning so it reads top to
bottom and can be called directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline.config import ProtocolConfig
from pipeline.data.sources import Sample
from pipeline.hooks import UnitHooks
from pipeline.decoding.generation import dense_generate_batch, masked_after_dense_batch
from pipeline.masks.allocation import allocate
from pipeline.masks.masks import achieved_sparsity
from pipeline.masks.static import threshold_masks
from pipeline.measures import bleu_vs_dense, task_score, token_agreement
from pipeline.models.adapters import UnitLayout
from pipeline.models.prompts import answer_length, prompt_ids
from pipeline.results.record import ORACLE, Record, series_name
from pipeline.results.summary import iou_reference
from pipeline.scores.attribution import UnitScores, attribute_batch
from pipeline.scores.metrics import SCORES


@dataclass
class EvaluatedBatch:
    """What one predict step hands to the writer: records, and raw scores when asked for."""

    records: list[Record]
    scores: dict = field(default_factory=dict)  # sample id -> {metric: UnitScores}


@dataclass
class RowStats:
    """One sample's per-row numbers from its keep masks, on the CPU.

    ``sparsity`` ``[rows, T]`` per step; ``kept_heads`` / ``kept_neurons`` ``[rows, layers]``:
    the kept fraction over the steps the row decoded (its count of kept units over
    those steps, divided once, which is exactly what a float mean of the 0/1 masks gives).
    """

    sparsity: torch.Tensor
    kept_heads: torch.Tensor
    kept_neurons: torch.Tensor
    overlaps: list  # per row, the mask IoU with the oracle's row (``oracle_overlap``) or None


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
                 layer_levels: dict | None = None, hooks: UnitHooks | None = None) -> DecodedBatch:
    """A batch's device work: labels, scores, masks, masked decoding, row numbers; its
    ``finish`` builds the records (host work).

    ``thresholds`` are the calibrated per-layer magnitude thresholds of the ``static`` metric;
    ``layer_levels`` ``{metric: [levels, layers]}`` the calibrated allocation's per-layer levels.
    ``hooks``: the run's ``UnitHooks`` (installed), used by attribution and masked decoding;
    None: each of them installs its own for the call.

    The dense runs decode together, attribution runs once for the whole batch, and the
    masked rows of all samples decode together. Every masked row continues from its
    own sample's dense run (the prompt and the steps before any unit is off), so a
    masked row and its dense run share exactly the same prompt computation.
    """
    prompts = [torch.tensor(prompt_ids(tokenizer, template, s.question)) for s in samples]

    # Labels: what the dense model says (docs/protocol.md §3).
    dense = dense_generate_batch(
        model, prompts, [answer_length(tokenizer, s.reference, protocol.max_new_tokens) for s in samples], stop_ids)

    # Scores [T, layers, units] per metric and sample.
    scores = _attribute_fitting(model, prompts, [torch.tensor(d.tokens) for d in dense], protocol, hooks)

    # Keep masks [rows = metrics x allocations x levels, T, layers, units] per sample; every row decodes.
    keeps = [_keep_masks(sample_scores, protocol, thresholds, layer_levels) for sample_scores in scores]
    outputs = masked_after_dense_batch(model, dense, [h for h, _ in keeps], [n for _, n in keeps], stop_ids, hooks)
    stats = [_row_stats(layout, head_keep, neuron_keep, rows, protocol)
             for (head_keep, neuron_keep), rows in zip(keeps, outputs)]
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
    """Keep masks ``[levels, T, layers, units]`` of one (metric, allocation, normalisation) and unit kind."""
    metric, allocation, normalize = variant
    if SCORES[metric].thresholds:
        return threshold_masks(importance, thresholds[kind])
    return allocate(allocation, importance, levels, normalize, (layer_levels or {}).get(metric))


def _keep_masks(scores, protocol: ProtocolConfig, thresholds, layer_levels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep masks ``[variants x levels, T, layers, units]`` of one sample, variant by variant."""
    levels, variants = protocol.levels, protocol.variants()
    head_keep = torch.cat([_keep(v, scores[v[0]].heads, "heads", levels, thresholds, layer_levels) for v in variants])
    neuron_keep = torch.cat([_keep(v, scores[v[0]].neurons, "neurons", levels, thresholds, layer_levels)
                             for v in variants])
    if protocol.dense_first_step:
        head_keep[:, 0] = True
        neuron_keep[:, 0] = True
    return head_keep, neuron_keep


def _row_stats(layout, head_keep: torch.Tensor, neuron_keep: torch.Tensor, outputs, protocol) -> RowStats:
    """Each row's sparsity per step, kept fractions per layer over its decoded steps, and mask
    overlap with the oracle.

    Computed where the masks are (counts, not the masks, come to the CPU).
    """
    device = head_keep.device
    lengths = [max(1, len(tokens)) for tokens in outputs]
    steps = torch.tensor(lengths, device=device)
    rows = torch.arange(len(outputs), device=device)

    def kept(keep: torch.Tensor) -> torch.Tensor:  # [rows, layers]: kept units over the first n steps / (n x units)
        counts = keep.sum(-1).cumsum(1)[rows, steps - 1]
        return (counts.float() / (steps * keep.shape[-1]).float()[:, None]).cpu()

    variants = [(v, p) for v in protocol.variants() for p in protocol.levels]
    overlaps = oracle_overlap(head_keep, neuron_keep, variants, lengths)
    return RowStats(achieved_sparsity(head_keep, neuron_keep, layout).cpu(), kept(head_keep), kept(neuron_keep),
                    overlaps)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def _records(tokenizer, sample, dense, stats: RowStats, outputs, protocol, task) -> list[Record]:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    dense_text = decode(dense)
    dense_task = task_score(task, dense_text, sample.reference)
    kept_heads, kept_neurons = stats.kept_heads.tolist(), stats.kept_neurons.tolist()
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
            kept_heads=_rounded(kept_heads[row]),
            kept_neurons=_rounded(kept_neurons[row]),
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
            iou_cor_gxo=stats.overlaps[row],
        ))
    return records


def mask_iou(keep: torch.Tensor, other: torch.Tensor) -> float | None:
    """IoU of the switched-off sets of two keep masks ``[T, layers, units]``, per (token, layer),
    averaged over the (token, layer) pairs where either switches something off (None if none does)."""
    off, other_off = ~keep, ~other
    return _iou_of((off & other_off).sum(-1).cpu(), (off | other_off).sum(-1).cpu())


def _iou_of(both: torch.Tensor, either: torch.Tensor) -> float | None:
    """``mask_iou`` from the counts of units both masks / either mask switch off per (token, layer)."""
    valid = either > 0
    iou = (both[valid] / either[valid]).mean().item()
    return None if math.isnan(iou) else round(iou, 4)


def oracle_overlap(head_keep, neuron_keep, rows, steps) -> list[dict | None]:
    """Per row: for a label-free score's row, ``{oracle series: {"heads": IoU, "neurons": IoU}}``
    (``mask_iou``) with the ``ORACLE`` row of the same requested level under the same allocation
    (``iou_reference``), over the steps the label-free row decoded; None for other rows and when
    the run lacks that oracle row.

    Done here because all masks of a sample are in memory; records keep only per-layer kept
    fractions, and recomputing masks from saved raw scores would need ``save_scores`` (large
    files) and a second copy of the allocation step (calibrated levels, static thresholds,
    dense first step). All pairs are counted at once on the device and their counts come to
    the host in one transfer (on an H200 one small wait per pair took ~2 s per 256 questions).
    """
    index = {(series_name(*variant), level): i for i, (variant, level) in enumerate(rows) if variant[0] == ORACLE}
    pairs = []  # (label-free row, oracle row, oracle series)
    for i, ((metric, allocation, normalize), level) in enumerate(rows):
        reference = iou_reference(allocation, normalize)
        j = index.get((reference, level))
        if j is not None and SCORES[metric].label_free:
            pairs.append((i, j, reference))
    found: list[dict | None] = [None] * len(rows)
    if not pairs:
        return found
    device = head_keep.device
    mine, oracle = (torch.tensor([pair[k] for pair in pairs], device=device) for k in (0, 1))
    within = torch.arange(head_keep.shape[1], device=device) < torch.tensor([steps[i] for i, _, _ in pairs],
                                                                              device=device)[:, None]
    counts = []  # per kind: [pairs, 2, T, layers]; past a row's steps nothing counts as switched off
    for keep in (head_keep, neuron_keep):
        off, other_off = ~keep[mine], ~keep[oracle]
        counts.append(torch.stack([(off & other_off).sum(-1), (off | other_off).sum(-1) * within[..., None]], 1))
    counts = torch.stack(counts, 1).cpu()  # [pairs, kind, 2, T, layers]
    for k, (i, _, reference) in enumerate(pairs):
        heads, neurons = (_iou_of(counts[k, kind, 0], counts[k, kind, 1]) for kind in (0, 1))
        found[i] = {reference: {"heads": heads, "neurons": neurons}}
    return found
