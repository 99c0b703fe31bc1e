"""Threshold counts, ties, and parameter-weighted sparsity."""

import math
import types

import pytest
import torch
import transformers as tf

from pipeline.masks.masks import achieved_sparsity, keep_masks, units_off
from pipeline.models.adapters import layout_for


def _reference_keep(importance: list[float], level: float) -> list[bool]:
    """Switch off floor(p n) lowest; among equal values the lower index goes first."""
    n = len(importance)
    k = math.floor(round(level * n, 9))
    order = sorted(range(n), key=lambda i: (importance[i], i))
    off = set(order[:k])
    return [i not in off for i in range(n)]


@pytest.mark.parametrize("units", [1, 4, 7, 10, 64])
def test_keep_masks_match_reference(units):
    torch.manual_seed(units)
    levels = [round(0.1 * i, 1) for i in range(10)]
    # few distinct values -> many ties
    importance = torch.randint(0, 3, (5, 2, units)).double()
    masks = keep_masks(importance, levels)
    assert masks.shape == (len(levels), 5, 2, units)
    for li, level in enumerate(levels):
        for t in range(5):
            for layer in range(2):
                expected = _reference_keep(importance[t, layer].tolist(), level)
                assert masks[li, t, layer].tolist() == expected
                assert (~masks[li, t, layer]).sum().item() == math.floor(round(level * units, 9))


def test_units_off_counts():
    assert [units_off(p, 10) for p in (0.0, 0.1, 0.3, 0.7, 0.9)] == [0, 1, 3, 7, 9]
    assert units_off(0.1, 4) == 0  # 4 heads cannot lose 10%
    assert units_off(0.5, 32) == 16


def test_phi2_sparsity_accounting_is_one_third_two_thirds():
    config = tf.PhiConfig(vocab_size=64, hidden_size=2560, intermediate_size=10240, num_hidden_layers=1,
                          num_attention_heads=32)
    with torch.device("meta"):
        model = tf.PhiForCausalLM(config)
    layout = layout_for(model)
    assert layout.attention_share == pytest.approx(1 / 3, abs=1e-12)
    assert layout.mlp_share == pytest.approx(2 / 3, abs=1e-12)
    heads = torch.ones(3, 1, 32, dtype=torch.bool)
    neurons = torch.ones(3, 1, 10240, dtype=torch.bool)
    heads[:, :, :16] = False  # half the heads
    neurons[1, :, :5120] = False  # half the neurons at step 1 only
    sparsity = achieved_sparsity(heads, neurons, layout)
    torch.testing.assert_close(sparsity, torch.tensor([1 / 6, 1 / 6 + 1 / 3, 1 / 6]))


@pytest.mark.parametrize("units", [2**15 - 1, 2**15 + 1])  # int16 ranks, and int32 where int16 would overflow
def test_unit_ranks_at_the_width_of_their_integer(units):
    import torch

    from pipeline.masks.masks import unit_ranks

    importance = torch.randint(0, 50, (2, units)).float()  # many ties: the lower index ranks lower
    expected = torch.empty(2, units, dtype=torch.long)
    for row in range(2):
        order = sorted(range(units), key=lambda u: (importance[row, u].item(), u))
        expected[row, order] = torch.arange(units)
    assert torch.equal(unit_ranks(importance).long(), expected)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64, torch.int64])
def test_achieved_sparsity_of_any_zero_one_masks(dtype):
    """0/1 masks of any dtype, counted over their own widths: the parameter-weighted off fraction."""
    layout = types.SimpleNamespace(attention_share=0.25, mlp_share=0.75, num_heads=99, num_neurons=99)  # widths unused
    generator = torch.Generator().manual_seed(4)
    heads = (torch.rand(2, 3, 5, 4, generator=generator) > 0.3).to(dtype)  # [rows, steps, layers, heads]
    neurons = (torch.rand(2, 3, 5, 6, generator=generator) > 0.6).to(dtype)
    expected = torch.tensor([[0.25 * (1 - heads[r, t].double().sum().item() / 20)
                              + 0.75 * (1 - neurons[r, t].double().sum().item() / 30) for t in range(3)]
                             for r in range(2)], dtype=torch.float64)
    torch.testing.assert_close(achieved_sparsity(heads, neurons, layout).double(), expected, rtol=0, atol=1e-6)


def test_host_values_reach_the_device_equal():
    """``on_device``: the values, dtype and device of ``torch.tensor(values, device=...)``."""
    from pipeline.device import on_device

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for values, dtype in (([3, 1, 2], None), ([[0.5, 1.5]], torch.float64), ([7], torch.long)):
            expected = torch.tensor(values, dtype=dtype, device=device)
            got = on_device(values, device, dtype)
            assert got.device == expected.device and got.dtype == expected.dtype and torch.equal(got, expected)
        host = torch.arange(5)
        assert torch.equal(on_device(host, device).cpu(), host)
        expanded = host[:, None].expand(5, 3)  # a view whose elements share memory
        assert torch.equal(on_device(expanded, device).cpu(), expanded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_values_are_queued_without_waiting_for_the_device():
    """While a long kernel runs, ``on_device`` returns at once (``torch.tensor(..., device="cuda")`` waits for
    the kernel), and what it queued holds the values once the device gets to it."""
    import time

    from pipeline.device import on_device

    big = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()

    def busy():
        for _ in range(20):
            big.matmul(big)

    started = time.perf_counter()
    busy()
    torch.cuda.synchronize()
    kernels = time.perf_counter() - started
    busy()
    started = time.perf_counter()
    values = on_device(list(range(1000)), "cuda")
    queued = time.perf_counter() - started
    busy()
    started = time.perf_counter()
    torch.tensor(list(range(1000)), device="cuda")
    waited = time.perf_counter() - started
    assert queued < kernels / 4 < waited
    assert values.tolist() == list(range(1000))
    busy()  # many copies queued behind the kernels: each keeps its own values until it has run
    queued = [on_device([index] * 100, "cuda") for index in range(50)]
    assert [tensor.tolist() for tensor in queued] == [[index] * 100 for index in range(50)]
