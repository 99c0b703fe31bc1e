"""Static (TEAL-style) masks: per-layer magnitude thresholds calibrated ahead of time.

A deployable policy needs no labels and no gradients: on a calibration split (rows
of the dataset that are not evaluated) collect every unit's output magnitude at every
generated position, and for each layer, unit kind and level p take the p-quantile as
that layer's threshold. At run time a unit is switched off when its magnitude is below
its layer's threshold, so the count varies per token and averages p on the
calibration split.
"""

from __future__ import annotations

import torch

from pipeline.decoding.generation import greedy_generate
from pipeline.models.prompts import answer_length, prompt_ids
from pipeline.scores.attribution import attribute


def quantile_thresholds(values: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """``values`` ``[positions, layers, units]`` -> thresholds ``[levels, layers]``.

    Threshold p is the value below which a fraction p of the layer's (position, unit)
    magnitudes fall; p = 0 switches nothing off.
    """
    per_layer = values.transpose(0, 1).flatten(1).double().sort(dim=1).values  # [layers, positions * units]
    count = per_layer.shape[1]
    rows = []
    for p in levels:
        k = round(p * count)
        rows.append(torch.full((per_layer.shape[0],), float("-inf"), dtype=torch.float64) if k == 0
                    else per_layer[:, k - 1] + 0.5 * (per_layer[:, min(k, count - 1)] - per_layer[:, k - 1]))
    return torch.stack(rows)


def threshold_masks(importance: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep masks ``[levels, tokens, layers, units]``: keep where importance >= the layer's threshold."""
    return importance.unsqueeze(0).double() >= thresholds.to(importance.device)[:, None, :, None]


@torch.no_grad()
def calibrate(model, tokenizer, template: str, samples, levels: list[float], max_new_tokens: int,
              stop_ids: list[int], graphs=None) -> dict[str, torch.Tensor]:
    """Thresholds ``{"heads": [levels, layers], "neurons": [levels, layers]}`` from ``samples``;
    ``graphs``: the run's ``CapturedSteps`` for the dense runs (None: captured per call)."""
    heads, neurons = [], []
    for sample in samples:
        prompt = torch.tensor(prompt_ids(tokenizer, template, sample.question))
        steps = answer_length(tokenizer, sample.reference, max_new_tokens)
        labels = torch.tensor(greedy_generate(model, prompt, steps, stop_ids, graphs=graphs)[0])
        magnitude = attribute(model, prompt, labels, metrics=["magnitude"])["magnitude"]
        heads.append(magnitude.heads.cpu())
        neurons.append(magnitude.neurons.cpu())
    return {"heads": quantile_thresholds(torch.cat(heads), levels),
            "neurons": quantile_thresholds(torch.cat(neurons), levels)}
