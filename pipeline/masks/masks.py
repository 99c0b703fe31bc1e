"""From importances to keep masks, and the achieved sparsity they give (docs/protocol.md §5)."""

from __future__ import annotations

import math

import torch

from pipeline.device import on_device
from pipeline.models.adapters import UnitLayout


def units_off(level: float, units: int) -> int:
    """``floor(level * units)``, robust to float error (0.7 * 10 is 7.000000000000001)."""
    return math.floor(level * units + 1e-9)


def unit_ranks(importance: torch.Tensor) -> torch.Tensor:
    """Each unit's rank from the lowest importance along the last dimension (0 = switched off
    first). Ties: a stable sort, so among equal importances the lower unit index ranks lower;
    NaN ranks above every number."""
    order = importance.argsort(dim=-1, stable=True)
    units = importance.shape[-1]
    # the masks compare every rank with every level (a Phi-2 batch: 10 levels x 3e8 ranks), so
    # int16 moves a quarter of int64's bytes
    dtype = _narrowest_integer(units)
    rank = torch.empty(order.shape, dtype=dtype, device=order.device)
    return rank.scatter_(-1, order, torch.arange(units, dtype=dtype, device=order.device).expand_as(order))


def _narrowest_integer(count: int) -> torch.dtype:
    """The narrowest integer dtype that holds 0 .. count - 1."""
    return torch.int16 if count <= 2**15 else torch.int32 if count <= 2**31 else torch.int64


def keep_masks(importance: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """Keep masks for all levels at once.

    ``importance`` is ``[..., units]`` (typically ``[tokens, layers, units]``); the
    result is bool ``[levels, ..., units]``. At each level the ``floor(p * units)``
    units with the lowest importance along the last dimension are switched off.
    Ties are broken by a stable sort: among equal importances the lower unit index
    is switched off first. NaN counts as the highest importance (never switched off
    before a number).
    """
    units = importance.shape[-1]
    off = on_device([units_off(p, units) for p in levels], importance.device)
    return unit_ranks(importance).unsqueeze(0) >= off.view(-1, *([1] * importance.dim()))


def kept_counts(keep: torch.Tensor) -> torch.Tensor:
    """Kept units along the last dimension of 0/1 masks ``[..., units]`` -> ``[...]``; bool masks are
    counted as bytes (on a CPU 3.5x faster than summing bools, which counts in int64)."""
    if keep.dtype != torch.bool:
        keep = keep != 0
    return keep.view(torch.uint8).sum(-1, dtype=_narrowest_integer(keep.shape[-1] + 1))


def sparsity_of_counts(head_counts: torch.Tensor, neuron_counts: torch.Tensor, heads: int, neurons: int,
                       layout: UnitLayout) -> torch.Tensor:
    """``achieved_sparsity`` from kept counts ``[..., steps, layers]`` (``kept_counts``) of masks with
    ``heads`` and ``neurons`` units per layer -> ``[..., steps]``."""
    heads_off = 1 - head_counts.sum(-1).float() / (head_counts.shape[-1] * heads)
    neurons_off = 1 - neuron_counts.sum(-1).float() / (neuron_counts.shape[-1] * neurons)
    return layout.attention_share * heads_off + layout.mlp_share * neurons_off


def achieved_sparsity(head_keep: torch.Tensor, neuron_keep: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """Parameter-weighted fraction of switched-off units, per step.

    ``head_keep`` ``[..., steps, layers, heads]``, ``neuron_keep`` ``[..., steps, layers, neurons]``
    (0/1, any dtype) -> ``[..., steps]``. Attention counts ``layout.attention_share`` of the
    layer's weights, the MLP the rest (Phi-2: 1/3 and 2/3). Counts of kept units (exact
    integers) divided once: the float mean of the 0/1 masks.
    """
    return sparsity_of_counts(kept_counts(head_keep), kept_counts(neuron_keep), head_keep.shape[-1],
                              neuron_keep.shape[-1], layout)
