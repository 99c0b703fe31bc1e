"""The shared-prefix attention of masked groups against attention written out row by row."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline.decoding.shared_prefix import Prefix, SharedPrefixCache


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_each_row_attends_to_its_sample_prefix_and_its_own_steps(kv_heads):
    torch.manual_seed(0)
    heads, dim, samples, rows, width, steps = 4, 8, 3, 2, 5, 3
    config = types.SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim,
                                   num_hidden_layers=1, hidden_size=heads * dim)
    config.get_text_config = lambda: config
    cache = SharedPrefixCache(config, samples, rows, width, steps, torch.float64, "cpu")
    # samples 0 and 2 read rows of one batch cache, at their own first columns; sample 1 has an empty
    # prefix (a one-token prompt) and sees its own steps only
    source = [(torch.randn(2, kv_heads, 7, dim, dtype=torch.float64), torch.randn(2, kv_heads, 7, dim, dtype=torch.float64))]
    prefixes = [Prefix(source, row=1, first=2, length=5), Prefix([], length=0), Prefix(source, row=0, first=4, length=2)]
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
                p = prefixes[sample]
                columns = slice(p.first, p.first + p.length)
                keys = torch.cat([source[0][0][p.row, kv, columns], torch.stack([k[row, kv] for k in own_keys])])
                values = torch.cat([source[0][1][p.row, kv, columns], torch.stack([v[row, kv] for v in own_values])])
                weights = torch.softmax(keys @ query[row, head, 0] * scale, 0)
                torch.testing.assert_close(got[row, 0, head], weights @ values)


def test_more_steps_than_the_group_holds_is_refused():
    from pipeline.decoding.shared_prefix import SharedPrefixDecoder
    from pipeline.models.adapters import layout_for
    from conftest import tiny_model

    model = tiny_model("llama")
    decoder = SharedPrefixDecoder(model, 1, 2, 0, 4, layout_for(model))
    with pytest.raises(ValueError, match="5 steps do not fit"):
        decoder.decode([Prefix([])], torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), 5,
                       torch.tensor([]), None, None, None)
