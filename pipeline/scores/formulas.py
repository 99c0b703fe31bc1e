"""The score formulas of docs/protocol.md §4.3, from unit outputs ``x`` and gradients ``g``.

Shapes: heads ``[..., heads, head_dim]``, neurons ``[..., neurons]``; the ``...`` are
the leading token and layer dimensions. Higher score = more important = keep.
For integrated gradients the engine passes the step-averaged gradient as ``g``: the
formula is then the same as ``gxo``.

Each formula reads a ``Terms``: one unit kind's ``x`` and ``g`` and the terms several
formulas share. Neurons outnumber heads by far, so each term is a pass over every
neuron of every token and layer; formulas evaluated on the same ``Terms`` compute
``|x|``, ``-g`` and ``-g * x`` once (``magnitude``/``cor_gxo``, ``gradient``/``gxo``,
``gxo``/``snip``/``cor_gxo``). The score table (``metrics.py``) names the formulas.
"""

from __future__ import annotations

import torch


class Terms:
    """One unit kind's outputs ``x``, gradients ``g`` (or None), output ``weights`` (or None),
    and a store of the terms already computed from them."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor | None, weights: torch.Tensor | None = None,
                 store: dict | None = None):
        self.x, self.g, self.weights = x, g, weights
        self.store = {} if store is None else store

    def shared(self, name: str, make):
        if name not in self.store:
            self.store[name] = make()
        return self.store[name]

    @property
    def abs_x(self) -> torch.Tensor:
        return self.shared("abs_x", self.x.abs)

    @property
    def neg_g(self) -> torch.Tensor:
        return self.shared("neg_g", self.g.neg)

    @property
    def neg_gx(self) -> torch.Tensor:
        return self.shared("neg_gx", lambda: self.neg_g * self.x)

    @property
    def head_gxo(self) -> torch.Tensor:
        """``mean_d(g_h * x_h)`` of every head."""
        return self.shared("head_gxo", lambda: (self.g * self.x).mean(-1))


# Heads: x, g ``[..., heads, head_dim]`` -> ``[..., heads]``.

def magnitude_heads(t: Terms) -> torch.Tensor:
    return t.x.norm(dim=-1)


def gradient_heads(t: Terms) -> torch.Tensor:
    return -t.g.mean(-1)


def gxo_heads(t: Terms) -> torch.Tensor:
    return -t.head_gxo


def snip_heads(t: Terms) -> torch.Tensor:
    return t.head_gxo.abs()


def cor_gxo_heads(t: Terms) -> torch.Tensor:
    layer_gradient_norm = t.g.mean(-1).norm(dim=-1, keepdim=True)  # ||G_l|| over the layer's heads
    return -t.head_gxo + 0.5 * t.x.norm(dim=-1) * layer_gradient_norm


def wina_heads(t: Terms) -> torch.Tensor:
    return wina_head_scores(t.x, t.weights)


# Neurons: x, g ``[..., neurons]`` -> ``[..., neurons]``.

def magnitude_neurons(t: Terms) -> torch.Tensor:
    return t.abs_x


def gradient_neurons(t: Terms) -> torch.Tensor:
    return t.neg_g


def gxo_neurons(t: Terms) -> torch.Tensor:
    return t.neg_gx


def snip_neurons(t: Terms) -> torch.Tensor:
    return t.neg_gx.abs()


def cor_gxo_neurons(t: Terms) -> torch.Tensor:
    layer_gradient_norm = t.g.norm(dim=-1, keepdim=True)  # ||G_l|| over the layer's neurons
    return torch.addcmul(t.neg_gx, t.abs_x, layer_gradient_norm, value=0.5)


def wina_neurons(t: Terms) -> torch.Tensor:
    return t.abs_x * t.weights.to(t.x.dtype)  # WINA for neurons: |x_i| * ||W_down[:, i]||, sharing |x|


def wina_head_scores(x: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    """WINA for heads: ``||W_o[:, head] x_h||_2``, what the head adds to the residual stream.

    ``x`` ``[..., layers, heads, head_dim]``; ``head_weights`` ``[layers, hidden, heads, head_dim]``
    (the output projection's columns grouped by head).
    """
    return torch.einsum("...lhd,lehd->...lhe", x, head_weights.to(x.dtype)).norm(dim=-1)
