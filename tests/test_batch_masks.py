"""A batch's keep masks and row numbers, computed for all its samples at once
(``protocol._keep_masks``, ``measures.mask_stats.row_stats``), against slow per-sample references."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.config import ProtocolConfig
from pipeline.masks.allocation import allocate
from pipeline.models.adapters import UnitLayout
from pipeline.measures.mask_stats import row_stats
from pipeline.protocol import _keep_masks
from pipeline.scores.attribution import UnitScores

LAYERS, HEADS, NEURONS = 3, 4, 6
LAYOUT = UnitLayout("test", [None] * LAYERS, [None] * LAYERS, HEADS, 2, NEURONS, attention_share=1 / 3)


def _scores(lengths, metrics, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{m: UnitScores(torch.randn(T, LAYERS, HEADS, generator=generator),
                           torch.randn(T, LAYERS, NEURONS, generator=generator)) for m in metrics} for T in lengths]


def _protocol(dense_first_step=False):
    return ProtocolConfig(metrics=["magnitude", "gxo", "cor_gxo"], levels=[0.0, 0.3, 0.6],
                          allocation=["per_layer", "global"], normalize=["mean", "rank"],
                          dense_first_step=dense_first_step)


@pytest.mark.parametrize("dense_first_step", [False, True])
@pytest.mark.parametrize("allocations", [["per_layer", "global"], ["calibrated"], ["static"]])
def test_batch_keep_masks_are_each_samples_own(dense_first_step, allocations, monkeypatch):
    from pipeline.masks.static import threshold_masks

    lengths = [1, 4, 3]
    protocol = _protocol(dense_first_step)
    levels = len(protocol.levels)
    thresholds = layer_levels = None
    if allocations == ["static"]:  # calibrated per-layer thresholds
        protocol.metrics, protocol.allocation = ["static", "magnitude"], "per_layer"
        thresholds = {"heads": torch.randn(levels, LAYERS).sort(0).values,
                      "neurons": torch.randn(levels, LAYERS).sort(0).values}
    elif allocations == ["calibrated"]:  # a level per layer
        protocol.metrics, protocol.allocation = ["magnitude", "wina"], ["per_layer", "calibrated"]
        layer_levels = {m: torch.rand(levels, LAYERS) for m in protocol.metrics}
    else:
        protocol.allocation = allocations
    scores = _scores(lengths, protocol.metrics)
    monkeypatch.setattr("pipeline.protocol.MASK_CHUNK_ELEMENTS", 2 * LAYERS * NEURONS)  # chunks of 2 tokens
    heads, neurons = _keep_masks(scores, lengths, protocol, thresholds, layer_levels)
    start = 0
    for sample, T in zip(scores, lengths):
        for kind, batch in (("heads", heads), ("neurons", neurons)):
            alone = torch.cat([threshold_masks(getattr(sample[m], kind), thresholds[kind]) if m == "static" else
                               allocate(a, getattr(sample[m], kind), protocol.levels, n,
                                        layer_levels[m] if a == "calibrated" else None)
                               for m, a, n in protocol.variants()])
            if dense_first_step:
                alone[:, 0] = True
            assert torch.equal(batch[:, start:start + T], alone)
        start += T


def _iou_reference(keep, other, steps):
    """Mean over (step, layer) with something off in either of |off & off'| / |off | off'|, from sets."""
    values = []
    for t in range(steps):
        for layer in range(keep.shape[1]):
            off = {u for u in range(keep.shape[2]) if not keep[t, layer, u]}
            other_off = {u for u in range(keep.shape[2]) if not other[t, layer, u]}
            if off | other_off:
                values.append(len(off & other_off) / len(off | other_off))
    return round(sum(values) / len(values), 4) if values else None


def test_batch_row_numbers_are_each_samples_own():
    lengths = [1, 4, 3]
    protocol = _protocol()
    rows = [(v, p) for v in protocol.variants() for p in protocol.levels]
    heads, neurons = _keep_masks(_scores(lengths, protocol.metrics, seed=1), lengths, protocol, thresholds=None)
    rng = random.Random(0)
    outputs = [[[7] * rng.randint(0, T) for _ in rows] for T in lengths]  # an empty output counts as one step
    stats = row_stats(LAYOUT, heads, neurons, lengths, outputs, protocol)
    start = 0
    for T, sample_outputs, got in zip(lengths, outputs, stats):
        h, n = heads[:, start:start + T], neurons[:, start:start + T]
        for r, tokens in enumerate(sample_outputs):
            steps = max(1, len(tokens))
            for t in range(T):
                off = (LAYOUT.attention_share * (1 - h[r, t].sum().item() / (LAYERS * HEADS))
                       + LAYOUT.mlp_share * (1 - n[r, t].sum().item() / (LAYERS * NEURONS)))
                assert got.sparsity[r, t].item() == pytest.approx(off, abs=1e-6)
            for layer in range(LAYERS):
                assert got.kept_heads[r, layer].item() == pytest.approx(
                    h[r, :steps, layer].sum().item() / (steps * HEADS), abs=1e-6)
                assert got.kept_neurons[r, layer].item() == pytest.approx(
                    n[r, :steps, layer].sum().item() / (steps * NEURONS), abs=1e-6)
            (metric, allocation, normalize), level = rows[r]
            if metric != "magnitude":  # the label-free score of the three
                assert got.pairs.overlaps()[r] is None
                continue
            series = "cor_gxo" if allocation == "per_layer" else f"cor_gxo/global/{normalize}"
            oracle = rows.index(((("cor_gxo", allocation, normalize)), level))
            expected = {kind: _iou_reference(keep[r], keep[oracle], steps) for kind, keep in (("heads", h), ("neurons", n))}
            assert list(got.pairs.overlaps()[r]) == [series]
            for kind, value in expected.items():
                found = got.pairs.overlaps()[r][series][kind]
                assert found == value if value is None else found == pytest.approx(value, abs=1e-4)
        start += T


def test_rounded_is_pythons_round_to_four_places():
    from pipeline.protocol import rounded

    generator = torch.Generator().manual_seed(2)
    counts = torch.arange(0, 20481, dtype=torch.float32)
    values = torch.cat([
        torch.rand(20000, generator=generator),
        counts / 20480, counts / (7 * 10240), counts[:9 * 64 + 1] / (9 * 64),  # kept fractions as runs make them
        (torch.arange(0, 10000, dtype=torch.float64) + 0.5).div(1e4).float(),  # next to ties of the 5th digit
        torch.tensor([0.0, 1.0, 0.00005, 0.99995, 0.12345, 0.67895]),
    ]).float()
    assert rounded(values) == [round(v, 4) for v in values.tolist()]
    table = values[:len(values) // 2 * 2].view(2, -1)
    assert rounded(table) == [[round(v, 4) for v in row] for row in table.tolist()]
    with pytest.raises(TypeError):
        rounded(values.double())
