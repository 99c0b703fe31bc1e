"""The shared-prefix attention of masked groups against attention written out row by row."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline.decoding.shared_prefix import SharedPrefixCache


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_each_row_attends_to_its_sample_prefix_and_its_own_steps(kv_heads):
    torch.manual_seed(0)
    heads, dim, samples, rows, width, steps = 4, 8, 3, 2, 5, 3
    config = types.SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim,
                                   num_hidden_layers=1, hidden_size=heads * dim)
    config.get_text_config = lambda: config
    cache = SharedPrefixCache(config, samples, rows, width, steps, torch.float64, "cpu")
    lengths = [5, 0, 2]  # a sample with an empty prefix (a one-token prompt) has its own steps only
    prefixes = [[(torch.randn(1, kv_heads, n, dim, dtype=torch.float64),
                  torch.randn(1, kv_heads, n, dim, dtype=torch.float64))] if n else [] for n in lengths]
    cache.start(prefixes)
    batch, scale = samples * rows, 0.3
    own_keys, own_values = [], []  # per step [batch, kv_heads, dim]
    for step in range(steps):
        query = torch.randn(batch, heads, 1, dim, dtype=torch.float64)
        key = torch.randn(batch, kv_heads, 1, dim, dtype=torch.float64)
        value = torch.randn(batch, kv_heads, 1, dim, dtype=torch.float64)
        own_keys.append(key[:, :, 0])
        own_values.append(value[:, :, 0])
        cache.open_columns()
        got = cache.attend(0, query, key, value, cache.mask, scale)
        cache.advance()
        assert got.shape == (batch, 1, heads, dim)
        for row in range(batch):
            sample = row // rows
            for head in range(heads):
                kv = head // (heads // kv_heads)
                keys = torch.cat([prefixes[sample][0][0][0, kv] if lengths[sample] else torch.zeros(0, dim, dtype=torch.float64),
                                  torch.stack([k[row, kv] for k in own_keys])])
                values = torch.cat([prefixes[sample][0][1][0, kv] if lengths[sample] else torch.zeros(0, dim, dtype=torch.float64),
                                    torch.stack([v[row, kv] for v in own_values])])
                weights = torch.softmax(keys @ query[row, head, 0] * scale, 0)
                torch.testing.assert_close(got[row, 0, head], weights @ values)


def test_more_steps_than_the_group_holds_is_refused():
    from pipeline.decoding.shared_prefix import SharedPrefixDecoder
    from pipeline.models.adapters import layout_for
    from conftest import tiny_model

    model = tiny_model("llama")
    decoder = SharedPrefixDecoder(model, 1, 2, 0, 4, layout_for(model))
    with pytest.raises(ValueError, match="5 steps do not fit"):
        decoder.decode([[]], torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), 5,
                       torch.tensor([]), None, None, None)
