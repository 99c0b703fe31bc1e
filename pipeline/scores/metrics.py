"""The score formulas of SPEC section 4, from unit outputs ``x`` and gradients ``g``.

Shapes: heads ``[..., heads, head_dim]``, neurons ``[..., neurons]``; the ``...`` are
the leading token and layer dimensions. Higher score = more important = keep.
For integrated gradients pass the step-averaged gradient as ``g``: the formula is
then the same as ``gxo``.
"""

from __future__ import annotations

import torch

METRICS = ("magnitude", "gradient", "gxo", "snip", "ig", "cor_gxo", "wina", "static")
DEFAULT_METRICS = ("magnitude", "gradient", "gxo", "snip", "cor_gxo")
# Scores a deployed model can compute itself: no labels, no gradients.
# ``static`` ranks by magnitude against thresholds calibrated ahead of time (masking/static.py).
LABEL_FREE = frozenset({"magnitude", "wina", "static"})
NEEDS_GRADIENT = frozenset(METRICS) - LABEL_FREE


def wina_head_scores(x: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    """WINA for heads: ``||W_o[:, head] x_h||_2``, what the head adds to the residual stream.

    ``x`` ``[..., layers, heads, head_dim]``; ``head_weights`` ``[layers, hidden, heads, head_dim]``
    (the output projection's columns grouped by head).
    """
    return torch.einsum("...lhd,lehd->...lhe", x, head_weights.to(x.dtype)).norm(dim=-1)


def wina_neuron_scores(x: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """WINA for neurons: ``|x_i| * ||W_down[:, i]||_2``; ``column_norms`` ``[layers, neurons]``."""
    return x.abs() * column_norms.to(x.dtype)


def head_scores(metric: str, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    if metric in ("magnitude", "static"):
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
    if metric in ("magnitude", "static"):
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


def neuron_score_set(metrics, x: torch.Tensor, g: torch.Tensor | None, g_ig: torch.Tensor | None = None) -> dict:
    """``neuron_scores`` of several metrics at once.

    Neurons outnumber heads by far, so each term here is a pass over every neuron of
    every token and layer: ``|x|``, ``-g`` and ``-g * x`` are computed once and shared
    (``magnitude``/``cor_gxo``, ``gradient``/``gxo``, ``gxo``/``snip``/``cor_gxo``).
    """
    terms: dict = {}

    def term(name, make):
        if name not in terms:
            terms[name] = make()
        return terms[name]

    abs_x = lambda: term("abs_x", x.abs)  # noqa: E731
    neg_gx = lambda: term("neg_gx", lambda: term("neg_g", g.neg) * x)  # noqa: E731
    scores = {}
    for metric in metrics:
        if metric in ("magnitude", "static"):
            scores[metric] = abs_x()
        elif metric == "gradient":
            scores[metric] = term("neg_g", g.neg)
        elif metric == "gxo":
            scores[metric] = neg_gx()
        elif metric == "snip":
            scores[metric] = neg_gx().abs()
        elif metric == "cor_gxo":
            scores[metric] = torch.addcmul(neg_gx(), abs_x(), g.norm(dim=-1, keepdim=True), value=0.5)
        elif metric == "ig":
            scores[metric] = neuron_scores("ig", x, g_ig)
        else:
            raise ValueError(f"no shared neuron score for {metric!r}")
    return scores
