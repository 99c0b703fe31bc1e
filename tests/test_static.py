"""The static (TEAL-style) policy: thresholds against numpy quantiles, calibrated sparsity, end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint, tiny_model

from pipeline.cli import main
from pipeline.masks.masks import achieved_sparsity
from pipeline.masks.static import quantile_thresholds, threshold_masks
from pipeline.models.adapters import layout_for
from pipeline.results.record import Record
from pipeline.scores.attribution import attribute_batch

LEVELS = [0.0, 0.1, 0.3, 0.5, 0.8, 0.9]


def test_thresholds_split_each_layer_at_p():
    torch.manual_seed(0)
    values = torch.rand(40, 3, 64)
    thresholds = quantile_thresholds(values, LEVELS)
    for li, p in enumerate(LEVELS):
        for layer in range(3):
            flat = values[:, layer].flatten().numpy()
            below = (flat < thresholds[li, layer].item()).mean()
            assert below == pytest.approx(p, abs=1 / flat.size)
            if p > 0:  # between the neighbouring order statistics, as numpy's quantile is
                assert np.sort(flat)[round(p * flat.size) - 1] <= thresholds[li, layer] <= np.sort(flat)[round(p * flat.size)]
    assert torch.isinf(thresholds[0]).all()


def test_calibrated_sparsity_is_p_on_the_calibration_split():
    model = tiny_model("llama")
    layout = layout_for(model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 90, (int(n),), generator=g) for n in torch.randint(3, 9, (12,), generator=g)]
    labels = [torch.randint(0, 90, (int(n),), generator=g) for n in torch.randint(4, 12, (12,), generator=g)]
    scores = attribute_batch(model, prompts, labels, metrics=["static"])
    heads = torch.cat([s["static"].heads for s in scores])
    neurons = torch.cat([s["static"].neurons for s in scores])
    thresholds = {"heads": quantile_thresholds(heads, LEVELS), "neurons": quantile_thresholds(neurons, LEVELS)}
    head_keep = threshold_masks(heads, thresholds["heads"])
    neuron_keep = threshold_masks(neurons, thresholds["neurons"])
    achieved = achieved_sparsity(head_keep, neuron_keep, layout).mean(dim=-1)
    for p, a in zip(LEVELS, achieved.tolist()):
        assert abs(a - p) <= 0.02, (p, a)


def test_static_and_wina_end_to_end(tmp_path, capsys):
    tiny = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "run"
    main(["run", "--model.name", str(tiny), "--data.limit", "3", "--protocol.metrics", "[static, wina, cor_gxo]",
          "--protocol.levels", "[0.0, 0.5]", "--protocol.calibration_samples", "4", "--protocol.max_new_tokens", "5",
          "--run.output_dir", str(out), "--run.progress", "false"])
    records = [Record.from_json(json.loads(line)) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r.metric for r in records} == {"static", "wina", "cor_gxo"}
    for r in records:
        assert len(r.kept_heads) == len(r.kept_neurons) == 2
        if r.level == 0.0:
            assert r.bleu == 100.0 and r.sparsity == 0.0
    # calibration rows must exist beyond the evaluated ones
    with pytest.raises(SystemExit):
        main(["run", "--model.name", str(tiny), "--data.start", "30", "--protocol.metrics", "[static]",
              "--run.output_dir", str(tmp_path / "other"), "--run.progress", "false"])
    assert "calibrates on the 16 rows after the evaluated ones" in capsys.readouterr().err
