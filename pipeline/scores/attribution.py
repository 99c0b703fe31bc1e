"""The attribution engine: per-token unit outputs and gradients, then scores.

One forward and one backward pass over ``prompt + labels`` give, for every label
token t and every layer, the unit outputs at the position that predicts y_t and the
gradient of L_t alone with respect to them (see ``exact_attention.py`` for why this
equals the step-by-step definition). Integrated gradients add, per layer and unit
kind, one pass whose batch holds all n scaling steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.masking.hooks import HEADS, NEURONS, Probe, hooks_for
from pipeline.scores.exact_attention import exact_attention, forget_recorded
from pipeline.scores.metrics import DEFAULT_METRICS, METRICS, NEEDS_GRADIENT, head_scores, neuron_scores


@dataclass
class UnitScores:
    """One metric's importances: ``heads`` ``[tokens, layers, heads]``, ``neurons`` ``[tokens, layers, neurons]``."""

    heads: torch.Tensor
    neurons: torch.Tensor


def _label_loss(logits: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows and tokens of CE(logits at the predicting position, label)."""
    picked = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    return F.cross_entropy(picked.flatten(0, 1), labels.flatten(), reduction="sum")


def _stack(captured: dict, kind: str, layers: int) -> torch.Tensor:
    # [batch, T, layers, width]
    return torch.stack([captured[(kind, layer)] for layer in range(layers)], dim=2)


def _outputs_and_gradients(model, hooks, input_ids, positions, labels, with_gradient: bool):
    layout = hooks.layout
    probe = Probe(positions=positions)
    hooks.probe = probe
    try:
        with torch.enable_grad(), exact_attention(model, mode="record" if with_gradient else "live"):
            logits = model(input_ids=input_ids, use_cache=False).logits
            keys = [(kind, layer) for kind in (HEADS, NEURONS) for layer in range(layout.num_layers)]
            if with_gradient:
                loss = _label_loss(logits, positions, labels)
                grads = torch.autograd.grad(loss, [probe.probes[k] for k in keys])
                gradients = dict(zip(keys, grads))
    finally:
        hooks.probe = None
    x = {kind: _stack(probe.outputs, kind, layout.num_layers) for kind in (HEADS, NEURONS)}
    g = {kind: _stack(gradients, kind, layout.num_layers) for kind in (HEADS, NEURONS)} if with_gradient else None
    return x, g


def _integrated_gradients(model, hooks, input_ids, positions, labels, steps: int) -> dict[str, torch.Tensor]:
    """Step-averaged gradients, layer by layer and kind by kind, all steps in one batch.

    Must run right after a ``record`` pass over the same input: the scaled passes read
    the recorded dense keys/values of earlier positions.
    """
    layout = hooks.layout
    alphas = torch.arange(1, steps + 1, dtype=torch.float64, device=input_ids.device) / steps
    batch_ids = input_ids.expand(steps, -1)
    batch_positions = positions.expand(steps, -1)
    batch_labels = labels.expand(steps, -1)
    averaged = {}
    for kind in (HEADS, NEURONS):
        per_layer = []
        for layer in range(layout.num_layers):
            probe = Probe(positions=batch_positions, scale=(kind, layer, alphas), only=(kind, layer))
            hooks.probe = probe
            try:
                with torch.enable_grad(), exact_attention(model, mode="replay"):
                    logits = model(input_ids=batch_ids, use_cache=False).logits
                    loss = _label_loss(logits, batch_positions, batch_labels)
                    (grad,) = torch.autograd.grad(loss, [probe.probes[(kind, layer)]])
            finally:
                hooks.probe = None
            per_layer.append(grad.mean(0))  # average over the steps -> [T, width]
        averaged[kind] = torch.stack(per_layer, dim=1).unsqueeze(0)  # [1, T, layers, width]
    return averaged


def attribute(
    model,
    prompt_ids: torch.Tensor,
    label_ids: torch.Tensor,
    metrics=DEFAULT_METRICS,
    ig_steps: int = 20,
) -> dict[str, UnitScores]:
    """Score every attention head and MLP neuron for every label token.

    Args:
        model: a Hugging Face causal LM whose architecture is in the adapter table.
        prompt_ids: 1-D tensor, the formatted prompt's token ids.
        label_ids: 1-D tensor, the dense model's greedy output y_0..y_{T-1}.
        metrics: any of ``magnitude, gradient, gxo, snip, ig, cor_gxo``.
        ig_steps: number of integrated-gradient steps (``ig`` only).

    Returns:
        ``{metric: UnitScores}`` with ``heads`` ``[T, layers, heads]`` and ``neurons``
        ``[T, layers, neurons]``; row t scores the units for generating y_t.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if ig_steps < 1:
        raise ValueError("ig_steps must be >= 1")
    hooks = hooks_for(model)
    temporary = not hooks.installed
    hooks.install()
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    label_ids = label_ids.to(device)
    prompt_len, T = prompt_ids.numel(), label_ids.numel()
    input_ids = torch.cat([prompt_ids, label_ids[:-1]]).unsqueeze(0)
    positions = torch.arange(prompt_len - 1, prompt_len - 1 + T, device=device).unsqueeze(0)
    labels = label_ids.unsqueeze(0)
    try:
        with_gradient = any(m in NEEDS_GRADIENT for m in metrics)
        x, g = _outputs_and_gradients(model, hooks, input_ids, positions, labels, with_gradient)
        ig = _integrated_gradients(model, hooks, input_ids, positions, labels, ig_steps) if "ig" in metrics else None
    finally:
        forget_recorded()
        if temporary:
            hooks.remove()

    head_shape = (*x[HEADS].shape[:-1], hooks.layout.num_heads, hooks.layout.head_dim)
    x_heads = x[HEADS].view(head_shape)
    result = {}
    for metric in metrics:
        gradients = ig if metric == "ig" else g
        g_heads = gradients[HEADS].view(head_shape) if gradients is not None else None
        g_neurons = gradients[NEURONS] if gradients is not None else None
        result[metric] = UnitScores(
            heads=head_scores(metric, x_heads, g_heads)[0],
            neurons=neuron_scores(metric, x[NEURONS], g_neurons)[0],
        )
    return result
