"""Where units are probed and switched off: forward pre-hooks on the unit hook points.

Each layer's head-output point and neuron point (see ``models/adapters.py``) gets one
pre-hook. What the hook does depends on the state set on ``UnitHooks``:

* ``probe`` (attribution): record the hook point's input, the units' outputs, so that
  dL/d(unit output) can be taken with respect to it; optionally scale one layer's
  units by alpha first (integrated gradients).
* ``masks`` (generation): multiply the units at the position being computed (the last
  one) by that decoding step's 0/1 mask (``StepMasks``).

Both are off by default, so an installed ``UnitHooks`` leaves the model's numbers alone.

A ``UnitHooks`` is an object of the run, not of the model: the run makes one, installs it
for its prediction loop (``runner/callbacks.py``) and passes it to attribution and
decoding; removing it leaves the model as it was loaded. Library calls given none make
their own for the call (``using_hooks``). The other places that change how the model
computes, each for one block and undone after it: ``scores/exact_attention.py`` (the
attention implementation) and ``masks/calibration.py`` (its own masking hooks for the
teacher-forced calibration passes).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch

from pipeline.models.adapters import UnitLayout, layout_for

HEADS, NEURONS = "heads", "neurons"


@dataclass
class Probe:
    """Attribution state: what the hooks record, and optional IG scaling.

    Each probed hook point's input ``x`` ``[batch, seq, width]`` is recorded whole in
    ``inputs``; gradients are taken with respect to these tensors afterwards, and the
    attributed positions are picked out once at the end rather than in every hook. A
    hook point nothing upstream differentiates through (the first layer's) becomes a
    leaf that requires grad, so the backward pass reaches every recorded input.

    ``scale`` is ``(kind, layer, alpha)`` with ``alpha`` of shape ``[batch]``: that layer's
    units of that kind are scaled, only at ``positions`` ``[batch, T]`` where ``valid``
    (integrated gradients). ``only`` restricts probing to one ``(kind, layer)``.
    """

    rows: int = 1  # batch size, for hook points fed ``[batch * seq, width]`` (OPT's MLP)
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [batch, T]; padded tokens point at a real position and must not scale it
    scale: tuple[str, int, torch.Tensor] | None = None
    only: tuple[str, int] | None = None
    inputs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def apply(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.only is not None and self.only != (kind, layer):
            return x
        if self.scale is not None and self.scale[:2] == (kind, layer):
            index = self.positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            alpha = self.scale[2].to(x.dtype).view(-1, 1, 1)
            shift = (alpha - 1) * x.gather(1, index)
            if self.valid is not None:
                shift = shift * self.valid.unsqueeze(-1)
            x = x.scatter_add(1, index, shift)
        if not x.requires_grad:
            x = x.detach().requires_grad_()
        self.inputs[(kind, layer)] = x
        return x


class StepMasks:
    """Generation state: the keep masks of the decoding step being computed, for every row.

    ``heads`` is ``[layers, rows, heads, 1]`` and ``neurons`` ``[layers, rows, neurons]``,
    boolean (multiplying by a bool tensor keeps the activation dtype), layer first so that
    a hook's mask is one contiguous block (the multiply then runs vectorised: it took 9% of
    a captured Phi-2 step when strided). They are fixed buffers that the decoding loop
    refills before each step (``load``): a hook does one tensor operation, and a captured
    CUDA graph, which remembers addresses, reads each step's masks from the same place.
    """

    def __init__(self, rows: int, layout: UnitLayout, device):
        self.rows = rows
        self.heads = torch.ones(layout.num_layers, rows, layout.num_heads, 1, dtype=torch.bool, device=device)
        self.neurons = torch.ones(layout.num_layers, rows, layout.num_neurons, dtype=torch.bool, device=device)

    def load(self, heads: torch.Tensor, neurons: torch.Tensor) -> "StepMasks":
        """This step's masks: ``heads`` ``[rows, layers, heads]``, ``neurons`` ``[rows, layers, neurons]``."""
        self.heads.copy_(heads.transpose(0, 1).unsqueeze(-1))
        self.neurons.copy_(neurons.transpose(0, 1))
        return self

    def apply(self, kind: str, layer: int, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        # the position being computed; earlier ones come from the cache
        last = x if x.shape[1] == 1 else x[:, -1:]
        if kind == HEADS:
            last.view(self.rows, -1, head_dim).mul_(self.heads[layer])
        else:
            last.view(self.rows, -1).mul_(self.neurons[layer])
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
            rows = self.probe.rows if self.probe is not None else self.masks.rows
            x = flat.view(rows, -1, flat.shape[-1])
        if self.probe is not None:
            x = self.probe.apply(kind, layer, x)
        if self.masks is not None:
            x = self.masks.apply(kind, layer, x, self.layout.head_dim)
        return (x.view_as(flat), *args[1:])


@contextmanager
def using_hooks(model, hooks: UnitHooks | None) -> Iterator[UnitHooks]:
    """The hooks one call works with.

    ``hooks`` as passed (a run creates one ``UnitHooks``, installs it for the whole loop and
    passes it down), installed for the block if they were not; or, when None, a fresh set
    on ``model``, installed for the block and removed after it (library calls).
    """
    if hooks is None:
        hooks = UnitHooks(layout_for(model))
    if hooks.installed:
        yield hooks
        return
    with hooks:
        yield hooks
