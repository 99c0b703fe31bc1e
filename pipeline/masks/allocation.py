"""Allocation: the step between scores and masks that decides how many units each layer loses.

Scores rank units; an allocation turns a level ``p`` into keep masks. Allocation changes
the answer as much as the score does, so it is a choice of its own
(``--protocol.allocation``):

* ``per_layer`` (docs/protocol.md §5, the paper's rule and the default): per token, layer and
  unit kind, the ``floor(p * n)`` lowest-scoring units are switched off.
* ``global``: per token and unit kind, the units of all layers are ranked together and
  the lowest ``floor(p * layers * n)`` are switched off, so layers lose different counts.
  Raw scores of different layers live on different scales (a late layer's magnitudes
  are larger), so each layer's scores are first made comparable (``NORMALIZATIONS``).
* ``calibrated``: per-layer levels ``q_l`` found once by a greedy search on calibration
  rows (``calibration.py``); per token, layer ``l`` loses its ``floor(q_l * n)`` lowest
  units, for heads and neurons alike.

All masks are bool ``[levels, tokens, layers, units]``; ties go to the lower unit index
(and, for ``global``, to the lower layer), as in ``keep_masks``.
"""

from __future__ import annotations

import torch

from pipeline.device import on_device
from pipeline.masks import ALLOCATIONS, NORMALIZATIONS
from pipeline.masks.masks import keep_masks, unit_ranks, units_off


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # a layer whose scores are all 0 keeps them (0 / 1) instead of turning them into NaN
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def normalized(importance: torch.Tensor, how: str) -> torch.Tensor:
    """``importance`` ``[..., layers, units]`` made comparable across layers, per (token, layer)."""
    if how == "none":
        return importance
    if how == "mean":
        return importance / _safe(importance.abs().mean(dim=-1, keepdim=True))
    if how == "l2":
        return importance / _safe(importance.norm(dim=-1, keepdim=True))
    if how == "rank":
        return (unit_ranks(importance).to(torch.float64) + 1) / importance.shape[-1]
    raise ValueError(f"unknown normalisation {how!r}; choose from {', '.join(NORMALIZATIONS)}")


def global_keep_masks(importance: torch.Tensor, levels: list[float], how: str) -> torch.Tensor:
    """Keep masks ``[levels, ..., layers, units]``: per token, the lowest ``floor(p * layers * units)``
    of all layers' normalised scores are switched off."""
    flat = normalized(importance, how).flatten(-2)  # [..., layers * units], layer-major: ties go to lower layers
    return keep_masks(flat, levels).view(len(levels), *importance.shape)


def layer_level_keep_masks(importance: torch.Tensor, layer_levels: torch.Tensor) -> torch.Tensor:
    """Keep masks ``[levels, ..., layers, units]`` with a level per layer: ``layer_levels`` ``[levels, layers]``.

    Layer ``l`` at row ``i`` loses its ``floor(layer_levels[i, l] * units)`` lowest units.
    """
    units = importance.shape[-1]
    off = on_device([[units_off(q, units) for q in row] for row in layer_levels.tolist()], importance.device)
    # off [levels, layers] against rank [..., layers, units]
    return unit_ranks(importance).unsqueeze(0) >= off.view(off.shape[0], *([1] * (importance.dim() - 2)), off.shape[1], 1)


def allocate(allocation: str, importance: torch.Tensor, levels: list[float], normalize: str | None = None,
             layer_levels: torch.Tensor | None = None) -> torch.Tensor:
    """Keep masks ``[levels, tokens, layers, units]`` of one score and unit kind under ``allocation``.

    ``layer_levels`` ``[levels, layers]``: the calibrated levels of each requested level (``calibrated`` only).
    """
    if allocation == "per_layer":
        return keep_masks(importance, levels)
    if allocation == "global":
        return global_keep_masks(importance, levels, normalize)
    if allocation == "calibrated":
        return layer_level_keep_masks(importance, layer_levels)
    raise ValueError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
