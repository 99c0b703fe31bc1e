"""The adapter table: where each architecture's units live (docs/protocol.md §2).

A unit's output is the *input* of a projection, so one forward pre-hook on that
projection sees every unit of the layer:

* attention heads: the input of the attention output projection (``o_proj`` /
  ``dense`` / ``out_proj`` / ``c_proj``), laid out as ``[..., heads * head_dim]``;
* MLP neurons: the input of the MLP down projection (``down_proj`` / ``fc2`` /
  ``dense_4h_to_h`` / ``c_proj``), the activated intermediate.

Adding an architecture means adding one row to ``ADAPTERS``; nothing else in the
package knows about model families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import UserError


@dataclass(frozen=True)
class Adapter:
    """Dotted module paths for one architecture.

    ``layers`` is relative to the ``*ForCausalLM`` model; the others are relative to
    one block of ``layers``. ``mlp`` may name several modules (OPT keeps ``fc1`` and
    ``fc2`` directly in the block).
    """

    layers: str
    attention: str
    head_input: str
    mlp: tuple[str, ...]
    neuron_input: str


_LLAMA_LIKE = Adapter("model.layers", "self_attn", "self_attn.o_proj", ("mlp",), "mlp.down_proj")

ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "phi": Adapter("model.layers", "self_attn", "self_attn.dense", ("mlp",), "mlp.fc2"),
    "gpt_neox": Adapter("gpt_neox.layers", "attention", "attention.dense", ("mlp",), "mlp.dense_4h_to_h"),
    "opt": Adapter("model.decoder.layers", "self_attn", "self_attn.out_proj", ("fc1", "fc2"), "fc2"),
    "gpt2": Adapter("transformer.h", "attn", "attn.c_proj", ("mlp",), "mlp.c_proj"),
}


def _input_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    # transformers' Conv1D (GPT-2) stores its weight as [in, out].
    return module.weight.shape[0]


def _matrix_params(modules: list[nn.Module]) -> int:
    # Only weight matrices count: norms and biases are negligible and do not scale
    # with the units that are switched off.
    return sum(p.numel() for m in modules for p in m.parameters() if p.dim() >= 2)


@dataclass
class UnitLayout:
    """The units of one loaded model, resolved through its adapter."""

    model_type: str
    head_inputs: list[nn.Module]
    neuron_inputs: list[nn.Module]
    num_heads: int
    head_dim: int
    num_neurons: int
    attention_share: float  # fraction of a layer's attention+MLP weights in attention

    @property
    def num_layers(self) -> int:
        return len(self.head_inputs)

    @property
    def mlp_share(self) -> float:
        return 1.0 - self.attention_share


def layout_for(model: nn.Module) -> UnitLayout:
    """Resolve the adapter row for ``model`` into its hook points and unit counts."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = config.model_type
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        known = ", ".join(sorted(ADAPTERS))
        raise UserError(
            f"architecture '{model_type}' is not in the adapter table (pipeline/models/adapters.py: ADAPTERS); "
            f"supported: {known}"
        )
    layers = model.get_submodule(adapter.layers)
    head_inputs = [block.get_submodule(adapter.head_input) for block in layers]
    neuron_inputs = [block.get_submodule(adapter.neuron_input) for block in layers]
    num_heads = config.num_attention_heads
    head_width = _input_features(head_inputs[0])
    if head_width % num_heads:
        raise UserError(f"{model_type}: attention output width {head_width} is not divisible by {num_heads} heads")
    block = layers[0]
    attention_params = _matrix_params([block.get_submodule(adapter.attention)])
    mlp_params = _matrix_params([block.get_submodule(name) for name in adapter.mlp])
    return UnitLayout(
        model_type=model_type,
        head_inputs=head_inputs,
        neuron_inputs=neuron_inputs,
        num_heads=num_heads,
        head_dim=head_width // num_heads,
        num_neurons=_input_features(neuron_inputs[0]),
        attention_share=attention_params / (attention_params + mlp_params),
    )


def _as_out_in(module: nn.Module) -> torch.Tensor:
    # nn.Linear stores [out, in]; transformers' Conv1D (GPT-2) stores [in, out].
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def output_weights(layout: UnitLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections the units feed, for weight-informed scores.

    Returns the attention output projections grouped by head,
    ``[layers, hidden, heads, head_dim]``, and the down projections' column norms,
    ``[layers, neurons]``.
    """
    heads = torch.stack([_as_out_in(m).detach() for m in layout.head_inputs])
    heads = heads.view(layout.num_layers, -1, layout.num_heads, layout.head_dim)
    columns = torch.stack([_as_out_in(m).detach().norm(dim=0) for m in layout.neuron_inputs])
    return heads, columns
