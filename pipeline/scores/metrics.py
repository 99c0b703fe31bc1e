"""The score formulas of SPEC section 4, from unit outputs ``x`` and gradients ``g``.

Shapes: heads ``[..., heads, head_dim]``, neurons ``[..., neurons]``; the ``...`` are
the leading token and layer dimensions. Higher score = more important = keep.
For integrated gradients pass the step-averaged gradient as ``g``: the formula is
then the same as ``gxo``.
"""

from __future__ import annotations

import torch

METRICS = ("magnitude", "gradient", "gxo", "snip", "ig", "cor_gxo")
DEFAULT_METRICS = ("magnitude", "gradient", "gxo", "snip", "cor_gxo")
NEEDS_GRADIENT = frozenset(METRICS) - {"magnitude"}


def head_scores(metric: str, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    if metric == "magnitude":
        return x.norm(dim=-1)
    if metric == "gradient":
        return -g.mean(-1)
    gxo = (g * x).mean(-1)
    if metric in ("gxo", "ig"):
        return -gxo
    if metric == "snip":
        return gxo.abs()
    if metric == "cor_gxo":
        layer_gradient_norm = g.mean(-1).norm(dim=-1, keepdim=True)  # ||G_l|| over the layer's heads
        return -gxo + 0.5 * x.norm(dim=-1) * layer_gradient_norm
    raise ValueError(f"unknown metric {metric!r}")


def neuron_scores(metric: str, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    if metric == "magnitude":
        return x.abs()
    if metric == "gradient":
        return -g
    gxo = g * x
    if metric in ("gxo", "ig"):
        return -gxo
    if metric == "snip":
        return gxo.abs()
    if metric == "cor_gxo":
        layer_gradient_norm = g.norm(dim=-1, keepdim=True)  # ||G_l|| over the layer's neurons
        return -gxo + 0.5 * x.abs() * layer_gradient_norm
    raise ValueError(f"unknown metric {metric!r}")
