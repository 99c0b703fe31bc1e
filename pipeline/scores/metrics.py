"""The score formulas of docs/protocol.md §4.3, from unit outputs ``x`` and gradients ``g``.

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


def neuron_scores(metric: str, x: torch.Tensor, g: torch.Tensor | None, terms: dict | None = None) -> torch.Tensor:
    """``terms``: where ``|x|``, ``-g`` and ``-g * x`` are kept for other metrics of the same ``x`` and ``g``.

    Neurons outnumber heads by far, so each term is a pass over every neuron of every
    token and layer; metrics computed together share them (``magnitude``/``cor_gxo``,
    ``gradient``/``gxo``, ``gxo``/``snip``/``cor_gxo``).
    """
    terms = {} if terms is None else terms

    def term(name, make):
        if name not in terms:
            terms[name] = make()
        return terms[name]

    if metric in ("magnitude", "static"):
        return term("abs_x", x.abs)
    if metric == "gradient":
        return term("neg_g", g.neg)
    neg_gx = term("neg_gx", lambda: term("neg_g", g.neg) * x)
    if metric in ("gxo", "ig"):
        return neg_gx
    if metric == "snip":
        return neg_gx.abs()
    if metric == "cor_gxo":
        layer_gradient_norm = g.norm(dim=-1, keepdim=True)  # ||G_l|| over the layer's neurons
        return torch.addcmul(neg_gx, term("abs_x", x.abs), layer_gradient_norm, value=0.5)
    raise ValueError(f"unknown metric {metric!r}")


def neuron_score_set(metrics, x: torch.Tensor, g: torch.Tensor | None, g_ig: torch.Tensor | None = None) -> dict:
    """``neuron_scores`` of several metrics at once, sharing their terms (``ig`` uses ``g_ig``)."""
    terms, ig_terms = {}, {}
    return {m: neuron_scores(m, x, g_ig, ig_terms) if m == "ig" else neuron_scores(m, x, g, terms) for m in metrics}
