"""The adapter table: hook points, unit counts, and that switching a unit off equals removing its weights."""

import pytest
import torch
from torch import nn
from conftest import ARCHITECTURES, tiny_model

from pipeline.errors import UserError
from pipeline.hooks import StepMasks, UnitHooks
from pipeline.decoding.generation import masked_generate
from pipeline.models.adapters import UnitLayout, layout_for


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_counts(arch):
    model = tiny_model(arch)
    layout = layout_for(model)
    config = model.config
    assert layout.num_layers == config.num_hidden_layers
    assert layout.num_heads == 4
    assert layout.num_heads * layout.head_dim == (8 * 4 if arch != "gemma3" else 32)
    assert layout.num_neurons == 48
    assert 0 < layout.attention_share < 1


def test_unsupported_architecture_names_the_table():
    import transformers as tf

    model = tf.BertLMHeadModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, is_decoder=True))
    with pytest.raises(UserError, match="adapter table .*ADAPTERS"):
        layout_for(model)


def zero_head_weights(layout: UnitLayout, layer: int, head: int) -> None:
    """Remove one head by zeroing its input columns of the output projection."""
    module = layout.head_inputs[layer]
    cols = slice(head * layout.head_dim, (head + 1) * layout.head_dim)
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            module.weight[:, cols] = 0
        else:
            module.weight[cols, :] = 0


def zero_neuron_weights(layout: UnitLayout, layer: int, neuron: int) -> None:
    """Remove one neuron by zeroing its column of the down projection."""
    module = layout.neuron_inputs[layer]
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            module.weight[:, neuron] = 0
        else:
            module.weight[neuron, :] = 0


def _masked_last_logits(model, ids, head_keep, neuron_keep):
    """Logits of one forward pass with the masks applied by the project's hooks at the last position."""
    with UnitHooks(layout_for(model)) as hooks:
        hooks.masks = StepMasks(1, hooks.layout, ids.device).load(head_keep[None].bool(), neuron_keep[None].bool())
        return model(input_ids=ids).logits[0, -1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mask_equals_zeroed_weights(arch):
    """A single-token input: the mask hits every position, exactly like zeroed weights."""
    model = tiny_model(arch)
    layout = layout_for(model)
    ids = torch.tensor([[5]])
    head_keep = torch.ones(layout.num_layers, layout.num_heads)
    neuron_keep = torch.ones(layout.num_layers, layout.num_neurons)
    head_keep[0, 1] = 0
    head_keep[-1, 3] = 0
    neuron_keep[0, 7] = 0
    neuron_keep[-1, 0] = 0
    masked = _masked_last_logits(model, ids, head_keep, neuron_keep)
    dense = model(input_ids=ids).logits[0, -1]

    zero_head_weights(layout, 0, 1)
    zero_head_weights(layout, layout.num_layers - 1, 3)
    zero_neuron_weights(layout, 0, 7)
    zero_neuron_weights(layout, layout.num_layers - 1, 0)
    removed = model(input_ids=ids).logits[0, -1]
    assert not torch.allclose(masked, dense)
    torch.testing.assert_close(masked, removed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "phi", "gpt2"])
def test_masked_generation_equals_zeroed_model_generation(arch):
    """With a one-token prompt and the same mask at every step, every position is masked."""
    model = tiny_model(arch)
    layout = layout_for(model)
    steps = 6
    head_keep = torch.ones(steps, layout.num_layers, layout.num_heads)
    neuron_keep = torch.ones(steps, layout.num_layers, layout.num_neurons)
    head_keep[:, 0, 2] = 0
    neuron_keep[:, 1, :20] = 0
    prompt = torch.tensor([11])
    masked = masked_generate(model, prompt, head_keep, neuron_keep, eos_token_ids=[])[0]
    zero_head_weights(layout, 0, 2)
    for n in range(20):
        zero_neuron_weights(layout, 1, n)
    removed = masked_generate(model, prompt, torch.ones_like(head_keep), torch.ones_like(neuron_keep), eos_token_ids=[])[0]
    assert masked == removed and len(masked) == steps
