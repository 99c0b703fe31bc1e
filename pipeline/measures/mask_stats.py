"""What a sample's keep masks did, row by row: the numbers its records carry besides the text.

* **achieved sparsity** per step (``masks.achieved_sparsity``: the parameter-weighted
  fraction of switched-off units);
* **kept fractions** per layer over the steps a row decoded;
* **overlap with the oracle**: for a label-free score's row, the IoU of its switched-off
  units with those of the ``ORACLE`` row at the same level (docs/protocol.md §7).

Sparsity and kept fractions are counts of 0/1 mask entries (exact in any order of summation)
divided once; IoUs are float64 means of ratios of such counts, rounded to ``IOU_PLACES`` as
the exact mean rounds (``_settle_ties``). All are taken for a whole batch where the masks are
(``row_stats``), and only the numbers come to the host, in one transfer per kind.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from pipeline.device import on_device
from pipeline.masks.masks import kept_counts, sparsity_of_counts
from pipeline.results.record import ORACLE, series_name
from pipeline.results.summary import iou_reference
from pipeline.scores.metrics import SCORES

IOU_PLACES = 4  # decimal places of the IoUs records carry
# A float64 mean of these ratios is off the exact mean by about 1e-16 x the running sums it takes
# differences of (at most one per token and layer of a batch: below 1e-11 for 100k of them); anything
# this close to a rounding tie (an odd multiple of 10**-IOU_PLACES / 2) is settled exactly.
TIE_TOLERANCE = 1e-9


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
    pairs: "OraclePairs"  # each row's mask IoU with the oracle's row (``oracle_overlap``)


def token_starts(lengths: list[int]) -> list[int]:
    """Where each sample's tokens start in a batch's tokens."""
    return [0, *itertools.accumulate(lengths)][:-1]


def row_stats(layout, head_keep: torch.Tensor, neuron_keep: torch.Tensor, lengths: list[int], outputs,
              protocol) -> list[RowStats]:
    """Per sample, each row's sparsity per step, kept fractions per layer over its decoded steps,
    and mask overlap with the oracle, from a batch's keep masks ``[rows, tokens, layers, units]``
    (the samples' tokens one after the other, ``lengths`` each; ``protocol._keep_masks``) and
    its decoded ``outputs`` (per sample and row, the tokens).

    Computed where the masks are, for the whole batch at once; numbers, not masks, come to the
    CPU, in one transfer per kind. Sparsity and kept fractions are counts of 0/1 entries (exact
    in any order of summation) divided once, so they do not depend on how samples are batched;
    IoUs are float64 means, whose last bits may, and their rounded places do not (``_settle_ties``).
    """
    device = head_keep.device
    starts = token_starts(lengths)
    decoded = torch.tensor([[max(1, len(tokens)) for tokens in rows] for rows in outputs])  # [samples, rows]
    if bool((decoded > torch.tensor(lengths)[:, None]).any()):  # would read the next sample's counts
        raise ValueError("a row decoded more steps than its sample has masks for")
    first = torch.tensor(starts)[:, None]
    head_counts, neuron_counts = kept_counts(head_keep), kept_counts(neuron_keep)  # [rows, tokens, layers]

    rows = torch.arange(head_keep.shape[0], device=device)
    span_ends, span_starts = on_device(first + decoded, device), on_device(first.expand_as(decoded), device)
    steps = on_device(decoded, device)

    def kept(counts: torch.Tensor, units: int) -> torch.Tensor:  # [samples, rows, layers]: kept over the first n steps / (n x units)
        running = F.pad(counts.cumsum(1), (0, 0, 1, 0))  # [rows, 1 + tokens, layers]: kept before each token
        counts = running[rows, span_ends] - running[rows, span_starts]
        return (counts.float() / (steps * units).float()[..., None]).cpu()

    variants = [(v, p) for v in protocol.variants() for p in protocol.levels]
    pairs = oracle_overlaps(head_keep, neuron_keep, variants, lengths, decoded.tolist(), (head_counts, neuron_counts))
    sparsity = sparsity_of_counts(head_counts, neuron_counts, head_keep.shape[-1], neuron_keep.shape[-1],
                                  layout).cpu()  # [rows, tokens]
    kept_heads, kept_neurons = kept(head_counts, head_keep.shape[-1]), kept(neuron_counts, neuron_keep.shape[-1])
    return [RowStats(sparsity[:, start:start + length].clone(), kept_heads[s], kept_neurons[s], pairs[s])
            for s, (start, length) in enumerate(zip(starts, lengths))]


def mask_iou(keep: torch.Tensor, other: torch.Tensor) -> float | None:
    """IoU of the switched-off sets of two keep masks ``[T, layers, units]``, per (token, layer),
    averaged over the (token, layer) pairs where either switches something off (None if none does)."""
    off, other_off = ~keep, ~other
    both, either = (off & other_off).sum(-1), (off | other_off).sum(-1)
    valid = either > 0
    iou = (both[valid].double() / either[valid].double()).mean().item()
    return _rounded_iou(_exact_rounded(both, either) if _near_tie(torch.tensor(iou, dtype=torch.float64)) else iou)


def _rounded_iou(iou: float) -> float | None:
    """An IoU as records carry it: ``IOU_PLACES`` places; None (NaN) where neither mask switched anything off."""
    return None if math.isnan(iou) else round(iou, IOU_PLACES)


def _near_tie(values: torch.Tensor) -> torch.Tensor:
    """Where a float mean is so close to a rounding tie that its last bits could decide the rounding
    (False for NaN)."""
    scaled = values * 10**IOU_PLACES  # float64
    return (scaled - scaled.floor() - 0.5).abs() < TIE_TOLERANCE * 10**IOU_PLACES


def _exact_rounded(both: torch.Tensor, either: torch.Tensor) -> float:
    """The mean of ``both / either`` over the entries where ``either > 0``, in exact fractions, rounded
    to ``IOU_PLACES`` half to even (as Python rounds an exact value): the rounding of a tie then does not
    depend on the order in which a float mean summed (float32 and float64 means of one tie, 0.81125,
    had rounded to 0.8112 and 0.8113)."""
    ratios = [Fraction(b, e) for b, e in zip(both.flatten().tolist(), either.flatten().tolist()) if e > 0]
    return float(round(sum(ratios, Fraction(0)) / len(ratios), IOU_PLACES))


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
    """One sample's ``oracle_overlap``, on the host: per pair ``(label-free row, oracle series)``,
    the IoU of its heads and of its neurons ``[pairs, 2]`` (float64, NaN where neither mask
    switched anything off). Turned into the records' dicts with the records (host work)."""

    rows: int
    pairs: list[tuple[int, str]]
    ious: torch.Tensor | None

    def overlaps(self) -> list[dict | None]:
        found: list[dict | None] = [None] * self.rows
        for (i, reference), (heads, neurons) in zip(self.pairs, self.ious.tolist() if self.pairs else []):
            found[i] = {reference: {"heads": _rounded_iou(heads), "neurons": _rounded_iou(neurons)}}
        return found


def oracle_overlaps(head_keep, neuron_keep, rows, lengths: list[int], steps: list[list[int]],
                    kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[OraclePairs]:
    """``oracle_overlap`` of every sample of a batch: masks ``[rows, tokens, layers, units]`` with
    ``lengths`` tokens per sample, ``steps`` ``[samples][rows]``; ``kept``: their ``kept_counts``
    if at hand.

    The IoUs of all pairs of all samples are computed on the device and come to the host in one
    transfer (on an H200 one small wait per pair took ~2 s per 256 questions; IoUs taken per pair
    and sample on the host, a third of a batch's record building).
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
    spans = token_starts(lengths)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    step = torch.arange(len(sample)) - torch.tensor(spans)[sample]
    decoded = torch.tensor(steps)[:, [i for i, _, _ in pairs]]  # [samples, pairs]
    within = on_device(step[None, :] < decoded[sample].T, device)  # [pairs, tokens]
    if kept is None:
        kept = (kept_counts(head_keep), kept_counts(neuron_keep))
    # per pair, kind and token: the sum over layers of |off in both| / |off in either| where either
    # switches something off, and how many layers do
    ratio_sums, valid_layers, counts = [], [], []  # counts: per pair and kind, (off in both, off in either)
    for k, (i, j, _) in enumerate(pairs):
        for keep, kept_units in zip((head_keep, neuron_keep), kept):
            # off in both = units - kept in either; off in either = units - kept in both: one pass over the masks
            both_kept = kept_counts(keep[i] & keep[j]).long()
            either_kept = kept_units[i].long() + kept_units[j].long() - both_kept
            units = keep.shape[-1]
            both_off, either_off = units - either_kept, (units - both_kept) * within[k, :, None]  # [tokens, layers]
            valid = either_off > 0
            counts.append((both_off, either_off))
            ratio_sums.append((both_off.double() / either_off.clamp(min=1).double() * valid).sum(-1))
            valid_layers.append(valid.sum(-1))
    # per sample: sums over its tokens, as differences of running sums (deterministic, unlike atomic adds)
    starts = on_device(spans, device)
    ends = starts + on_device(lengths, device)

    def per_sample(values: torch.Tensor) -> torch.Tensor:  # [pairs x kinds, tokens] -> [pairs x kinds, samples]
        running = F.pad(values.cumsum(1), (1, 0))
        return running[:, ends] - running[:, starts]

    ious = (per_sample(torch.stack(ratio_sums)) / per_sample(torch.stack(valid_layers)).double())
    ious = ious.view(len(pairs), 2, len(lengths)).permute(2, 0, 1).cpu()  # [samples, pairs, kind]: one transfer
    _settle_ties(ious, counts, spans, lengths)
    named = [(i, reference) for i, _, reference in pairs]
    return [OraclePairs(len(rows), named, sample_ious) for sample_ious in ious]


def _settle_ties(ious: torch.Tensor, counts, starts: list[int], lengths: list[int]) -> None:
    """Replace each IoU ``[samples, pairs, kind]`` within ``TIE_TOLERANCE`` of a rounding tie by its
    exact rounding (``_exact_rounded``) from its ``counts`` (per pair and kind, off in both and off in
    either ``[tokens, layers]``): rare, so each is a small transfer of its own."""
    for sample, pair, kind in _near_tie(ious).nonzero().tolist():
        both, either = counts[2 * pair + kind]
        span = slice(starts[sample], starts[sample] + lengths[sample])
        ious[sample, pair, kind] = _exact_rounded(both[span].cpu(), either[span].cpu())
