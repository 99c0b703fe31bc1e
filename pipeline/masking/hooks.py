"""The only place the model is touched: forward pre-hooks on the unit hook points.

Each layer's head-output point and neuron point (see ``models/adapters.py``) gets one
pre-hook. What the hook does depends on the state set on ``UnitHooks``:

* ``probe`` (attribution): read the units' outputs at the attributed positions and add
  a zero "probe" tensor there, whose gradient is dL/d(unit output); optionally scale
  one layer's units by alpha first (integrated gradients).
* ``masks`` (generation): multiply the units at the position being computed (the last
  one) by that decoding step's 0/1 mask.

Both are off by default, so an installed ``UnitHooks`` leaves the model's numbers alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from pipeline.models.adapters import UnitLayout

HEADS, NEURONS = "heads", "neurons"


@dataclass
class Probe:
    """Attribution state: positions to read, optional IG scaling, and what was captured.

    ``positions`` is ``[batch, T]``: for each row, the sequence positions whose unit
    outputs are attributed (the positions that predict the labels).
    ``scale`` is ``(kind, layer, alpha)`` with ``alpha`` of shape ``[batch]``: only that
    layer's units of that kind are scaled, and only at the attributed positions.
    ``only`` restricts probing to one ``(kind, layer)`` (IG needs just the scaled one).
    """

    positions: torch.Tensor
    valid: torch.Tensor | None = None  # [batch, T]; padded tokens point at a real position and must not scale it
    scale: tuple[str, int, torch.Tensor] | None = None
    only: tuple[str, int] | None = None
    outputs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    probes: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def apply(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.only is not None and self.only != (kind, layer):
            return x
        index = self.positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        at_positions = x.gather(1, index)
        probe = torch.zeros_like(at_positions, requires_grad=True)
        delta = probe
        if self.scale is not None and self.scale[:2] == (kind, layer):
            alpha = self.scale[2].to(x.dtype).view(-1, 1, 1)
            shift = (alpha - 1) * at_positions
            if self.valid is not None:
                shift = shift * self.valid.unsqueeze(-1)
            delta = delta + shift
        self.outputs[(kind, layer)] = at_positions.detach()
        self.probes[(kind, layer)] = probe
        return x.scatter_add(1, index, delta)


class StepMasks:
    """Generation state: per-step keep masks for every row, and the current step.

    ``heads`` is ``[rows, steps, layers, heads]`` and ``neurons`` is
    ``[rows, steps, layers, neurons]``, boolean, on the model's device. They stay
    boolean (multiplying by a bool tensor keeps the activation dtype), so nothing the
    size of all masks is ever converted or copied. The hooks run for every layer at
    every decoding step, so per-layer views are made once and a hook does two tensor
    operations: pick this step's mask, multiply in place.
    """

    def __init__(self, heads: torch.Tensor, neurons: torch.Tensor):
        self.rows, self.steps = heads.shape[0], heads.shape[1]
        self.step = 0
        self._heads = [heads[:, :, layer, :, None] for layer in range(heads.shape[2])]  # [rows, steps, H, 1]
        self._neurons = [neurons[:, :, layer] for layer in range(neurons.shape[2])]  # [rows, steps, N]

    def apply(self, kind: str, layer: int, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        step = self.step
        if step >= self.steps:
            return x
        # the position being computed; earlier ones come from the cache
        last = x if x.shape[1] == 1 else x[:, -1:]
        if kind == HEADS:
            keep = self._heads[layer][:, step]
            last.view(self.rows, -1, head_dim).mul_(keep)
        else:
            last.view(self.rows, -1).mul_(self._neurons[layer][:, step])
        return x


class UnitHooks:
    """Installs one pre-hook per layer and unit kind; usable as a context manager."""

    def __init__(self, layout: UnitLayout):
        self.layout = layout
        self.probe: Probe | None = None
        self.masks: StepMasks | None = None
        self._handles: list = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> "UnitHooks":
        if not self._handles:
            for kind, modules in ((HEADS, self.layout.head_inputs), (NEURONS, self.layout.neuron_inputs)):
                for layer, module in enumerate(modules):
                    self._handles.append(module.register_forward_pre_hook(partial(self._hook, kind, layer)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.probe = self.masks = None

    def __enter__(self) -> "UnitHooks":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _hook(self, kind: str, layer: int, module, args):
        if self.probe is None and self.masks is None:
            return None
        x = flat = args[0]
        if flat.dim() == 2:  # OPT feeds its MLP [batch * seq, features]
            rows = self.probe.positions.shape[0] if self.probe is not None else self.masks.rows
            x = flat.view(rows, -1, flat.shape[-1])
        if self.probe is not None:
            x = self.probe.apply(kind, layer, x)
        if self.masks is not None:
            x = self.masks.apply(kind, layer, x, self.layout.head_dim)
        return (x.view_as(flat), *args[1:])


def hooks_for(model) -> UnitHooks:
    """The model's installed hooks, or a fresh (not yet installed) set."""
    from pipeline.models.adapters import layout_for

    existing = getattr(model, "_sparseact_hooks", None)
    if existing is not None and existing.installed:
        return existing
    hooks = UnitHooks(layout_for(model))
    model._sparseact_hooks = hooks
    return hooks
