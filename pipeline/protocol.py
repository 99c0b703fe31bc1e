"""One sample through the whole protocol: labels -> scores -> allocation -> masks -> masked generation -> measures.

This is the body of the predict step, kept free of Lightning so it reads top to
bottom and can be called directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config import ProtocolConfig
from pipeline.data.sources import Sample
from pipeline.hooks import UnitHooks
from pipeline.decoding.generation import dense_generate_batch, masked_after_dense_batch
from pipeline.masks.allocation import allocate
from pipeline.masks.masks import kept_counts, sparsity_of_counts
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
    pairs: "OraclePairs"  # the counts behind each row's mask IoU with the oracle's row (``oracle_overlap``)


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

    # Keep masks [rows = metrics x allocations x levels, tokens of every sample, layers, units]; every row decodes.
    lengths = [len(d.tokens) for d in dense]
    head_keep, neuron_keep = _keep_masks(scores, lengths, protocol, thresholds, layer_levels)
    outputs = masked_after_dense_batch(model, dense, head_keep.split(lengths, 1), neuron_keep.split(lengths, 1),
                                       stop_ids, hooks)
    stats = _row_stats(layout, head_keep, neuron_keep, lengths, outputs, protocol)
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
    starts = _starts(lengths)
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


def _starts(lengths: list[int]) -> list[int]:
    """Where each sample's tokens start in a batch's tokens."""
    return [sum(lengths[:i]) for i in range(len(lengths))]


def _row_stats(layout, head_keep: torch.Tensor, neuron_keep: torch.Tensor, lengths: list[int], outputs,
               protocol) -> list[RowStats]:
    """Per sample, each row's sparsity per step, kept fractions per layer over its decoded steps, and
    mask overlap with the oracle, from a batch's keep masks (``_keep_masks``).

    Computed where the masks are, for the whole batch at once; counts, not masks, come to the
    CPU, in one transfer per kind of number. Every number is a count of 0/1 entries (exact in
    any order of summation) divided once, so it does not depend on how samples are batched.
    """
    device = head_keep.device
    starts = _starts(lengths)
    decoded = torch.tensor([[max(1, len(tokens)) for tokens in rows] for rows in outputs])  # [samples, rows]
    if bool((decoded > torch.tensor(lengths)[:, None]).any()):  # would read the next sample's counts
        raise ValueError("a row decoded more steps than its sample has masks for")
    first = torch.tensor(starts)[:, None]
    head_counts, neuron_counts = kept_counts(head_keep), kept_counts(neuron_keep)  # [rows, tokens, layers]

    def kept(counts: torch.Tensor, units: int) -> torch.Tensor:  # [samples, rows, layers]: kept over the first n steps / (n x units)
        running = F.pad(counts.cumsum(1), (0, 0, 1, 0))  # [rows, 1 + tokens, layers]: kept before each token
        rows = torch.arange(counts.shape[0])
        counts = running[rows, (first + decoded).to(device)] - running[rows, first.expand_as(decoded).to(device)]
        return (counts.float() / (decoded.to(device) * units).float()[..., None]).cpu()

    variants = [(v, p) for v in protocol.variants() for p in protocol.levels]
    pairs = oracle_overlaps(head_keep, neuron_keep, variants, lengths, decoded.tolist(), (head_counts, neuron_counts))
    sparsity = sparsity_of_counts(head_counts, neuron_counts, head_keep.shape[-1], neuron_keep.shape[-1],
                                  layout).cpu()  # [rows, tokens]
    kept_heads, kept_neurons = kept(head_counts, head_keep.shape[-1]), kept(neuron_counts, neuron_keep.shape[-1])
    return [RowStats(sparsity[:, start:start + length].clone(), kept_heads[s], kept_neurons[s], pairs[s])
            for s, (start, length) in enumerate(zip(starts, lengths))]


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
    the run lacks that oracle row. Masks ``[rows, T, layers, units]`` of one sample; ``steps``
    per row.

    Done here because all masks of a sample are in memory; records keep only per-layer kept
    fractions, and recomputing masks from saved raw scores would need ``save_scores`` (large
    files) and a second copy of the allocation step (calibrated levels, static thresholds,
    dense first step).
    """
    return oracle_overlaps(head_keep, neuron_keep, rows, [head_keep.shape[1]], [steps])[0].overlaps()


@dataclass
class OraclePairs:
    """One sample's counts for ``oracle_overlap``, on the host: per pair ``(label-free row, oracle
    series)``, units switched off in both and in either mask ``[pairs, kind, 2, T, layers]``.
    The IoUs are taken from them with the records (host work, off the device's path)."""

    rows: int
    pairs: list[tuple[int, str]]
    counts: torch.Tensor | None

    def overlaps(self) -> list[dict | None]:
        found: list[dict | None] = [None] * self.rows
        for k, (i, reference) in enumerate(self.pairs):
            heads, neurons = (_iou_of(self.counts[k, kind, 0], self.counts[k, kind, 1]) for kind in (0, 1))
            found[i] = {reference: {"heads": heads, "neurons": neurons}}
        return found


def oracle_overlaps(head_keep, neuron_keep, rows, lengths: list[int], steps: list[list[int]],
                    kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[OraclePairs]:
    """``oracle_overlap`` of every sample of a batch: masks ``[rows, tokens, layers, units]`` with
    ``lengths`` tokens per sample, ``steps`` ``[samples][rows]``; ``kept``: their ``kept_counts``
    if at hand.

    All pairs of all samples are counted on the device and their counts come to the host in one
    transfer (on an H200 one small wait per pair took ~2 s per 256 questions).
    """
    index = {(series_name(*variant), level): i for i, (variant, level) in enumerate(rows) if variant[0] == ORACLE}
    pairs = []  # (label-free row, oracle row, oracle series)
    for i, ((metric, allocation, normalize), level) in enumerate(rows):
        reference = iou_reference(allocation, normalize)
        j = index.get((reference, level))
        if j is not None and SCORES[metric].label_free:
            pairs.append((i, j, reference))
    if not pairs:
        return [OraclePairs(len(rows), [], None) for _ in lengths]
    device = head_keep.device
    # within[k, token]: the token is one of the steps pair k's label-free row decoded in its sample;
    # past them nothing counts as switched off
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    step = torch.arange(len(sample)) - torch.tensor(_starts(lengths))[sample]
    decoded = torch.tensor(steps)[:, [i for i, _, _ in pairs]]  # [samples, pairs]
    within = (step[None, :] < decoded[sample].T).to(device)  # [pairs, tokens]
    if kept is None:
        kept = (kept_counts(head_keep), kept_counts(neuron_keep))
    counts = []  # per pair: [kind, 2, tokens, layers]
    for k, (i, j, _) in enumerate(pairs):
        per_kind = []
        for keep, kept_units in zip((head_keep, neuron_keep), kept):
            # off in both = units - kept in either; off in either = units - kept in both: one pass over the masks
            both_kept = kept_counts(keep[i] & keep[j]).long()
            either_kept = kept_units[i].long() + kept_units[j].long() - both_kept
            units = keep.shape[-1]
            per_kind.append(torch.stack([units - either_kept, (units - both_kept) * within[k, :, None]]))
        counts.append(torch.stack(per_kind))
    counts = torch.stack(counts).cpu()  # [pairs, kind, 2, tokens, layers]
    named = [(i, reference) for i, _, reference in pairs]
    return [OraclePairs(len(rows), named, counts[..., start:start + length, :])
            for start, length in zip(_starts(lengths), lengths)]
