"""One sample through the whole protocol: labels -> scores -> allocation -> masks -> masked generation -> measures.

This is the body of the predict step, kept free of Lightning so it reads top to
bottom and can be called directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.config import ProtocolConfig
from pipeline.data.sources import Sample
from pipeline.hooks import UnitHooks
from pipeline.decoding.generation import dense_generate_batch, masked_after_dense_batch
from pipeline.masks.allocation import allocate
from pipeline.masks.masks import achieved_sparsity
from pipeline.masks.static import threshold_masks
from pipeline.measures import bleu_vs_dense, task_score, token_agreement
from pipeline.models.adapters import UnitLayout
from pipeline.models.prompts import answer_length, prompt_ids
from pipeline.scores.attribution import attribute_batch
from pipeline.scores.metrics import SCORES


@dataclass
class EvaluatedBatch:
    """What one predict step hands to the writer: records, and raw scores when asked for."""

    records: list[dict]
    scores: dict = field(default_factory=dict)  # sample id -> {metric: UnitScores}


def evaluate_batch(
    model,
    tokenizer,
    layout: UnitLayout,
    samples: list[Sample],
    template: str,
    protocol: ProtocolConfig,
    task: str,
    stop_ids: list[int],
    thresholds: dict | None = None,
    layer_levels: dict | None = None,
    hooks: UnitHooks | None = None,
) -> EvaluatedBatch:
    """All (metric, allocation, level) records of a batch of samples (and their raw scores if configured).

    ``thresholds`` are the calibrated per-layer magnitude thresholds of the ``static`` metric;
    ``layer_levels`` ``{metric: [levels, layers]}`` the calibrated allocation's per-layer levels.
    ``hooks``: the run's ``UnitHooks`` (installed), used by attribution and masked decoding;
    None: each of them installs its own for the call.

    The dense runs decode together, attribution runs once for the whole batch, and the
    masked rows of all samples decode together. Every masked row continues from its
    own sample's dense run (the prompt and the steps before any unit is off), so a
    masked row and its dense run share exactly the same prompt computation.
    """
    prompts = [torch.tensor(prompt_ids(tokenizer, template, s.question)) for s in samples]

    # Labels: what the dense model says (docs/protocol.md §3).
    dense = dense_generate_batch(
        model, prompts, [answer_length(tokenizer, s.reference, protocol.max_new_tokens) for s in samples], stop_ids)

    # Scores [T, layers, units] per metric and sample.
    scores = _attribute_fitting(model, prompts, [torch.tensor(d.tokens) for d in dense], protocol, hooks)

    # Keep masks [rows = metrics x allocations x levels, T, layers, units] per sample; every row decodes.
    keeps = [_keep_masks(sample_scores, protocol, thresholds, layer_levels) for sample_scores in scores]
    outputs = masked_after_dense_batch(model, dense, [h for h, _ in keeps], [n for _, n in keeps], stop_ids, hooks)

    records = []
    for sample, dense_run, (head_keep, neuron_keep), rows in zip(samples, dense, keeps, outputs):
        records += _records(tokenizer, layout, sample, dense_run.tokens, head_keep, neuron_keep, rows, protocol, task)
    raw = {s.id: sc for s, sc in zip(samples, scores)} if protocol.save_scores else {}
    return EvaluatedBatch(records=records, scores=raw)


def _attribute_fitting(model, prompts, labels, protocol: ProtocolConfig, hooks: UnitHooks | None):
    """Attribute the whole batch; on out-of-memory, split it in halves (down to one sample)."""
    try:
        return attribute_batch(model, prompts, labels, protocol.metrics, protocol.ig_steps, hooks=hooks)
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(prompts) // 2
        return (_attribute_fitting(model, prompts[:half], labels[:half], protocol, hooks)
                + _attribute_fitting(model, prompts[half:], labels[half:], protocol, hooks))


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in values.tolist()]


def _keep(variant, importance: torch.Tensor, kind: str, levels, thresholds, layer_levels) -> torch.Tensor:
    """Keep masks ``[levels, T, layers, units]`` of one (metric, allocation, normalisation) and unit kind."""
    metric, allocation, normalize = variant
    if SCORES[metric].thresholds:
        return threshold_masks(importance, thresholds[kind])
    calibrated = layer_levels[metric] if allocation == "calibrated" else None
    return allocate(allocation, importance, levels, normalize, calibrated)


def _keep_masks(scores, protocol: ProtocolConfig, thresholds, layer_levels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep masks ``[variants x levels, T, layers, units]`` of one sample, variant by variant."""
    levels, variants = protocol.levels, protocol.variants()
    head_keep = torch.cat([_keep(v, scores[v[0]].heads, "heads", levels, thresholds, layer_levels) for v in variants])
    neuron_keep = torch.cat([_keep(v, scores[v[0]].neurons, "neurons", levels, thresholds, layer_levels)
                             for v in variants])
    if protocol.dense_first_step:
        head_keep[:, 0] = True
        neuron_keep[:, 0] = True
    return head_keep, neuron_keep


def _records(tokenizer, layout, sample, dense, head_keep, neuron_keep, outputs, protocol, task) -> list[dict]:
    sparsity = achieved_sparsity(head_keep, neuron_keep, layout)  # [rows, T]

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    dense_text = decode(dense)
    dense_task = task_score(task, dense_text, sample.reference)
    records = []
    rows = [(v, p) for v in protocol.variants() for p in protocol.levels]
    for row, (((metric, allocation, normalize), level), tokens) in enumerate(zip(rows, outputs)):
        text = decode(tokens)
        records.append({
            "sample_id": sample.id,
            "metric": metric,
            "level": level,
            # averaged over the steps this row actually decoded
            "sparsity": sparsity[row, : max(1, len(tokens))].mean().item(),
            # per layer, the kept fraction of heads and of neurons over the decoded steps
            "kept_heads": _rounded(head_keep[row, : max(1, len(tokens))].float().mean(dim=(0, 2))),
            "kept_neurons": _rounded(neuron_keep[row, : max(1, len(tokens))].float().mean(dim=(0, 2))),
            "bleu": bleu_vs_dense(tokens, dense, text, dense_text),
            "token_agreement": token_agreement(tokens, dense),
            "task_score": task_score(task, text, sample.reference),
            "dense_task_score": dense_task,
            "n_tokens": len(tokens),
            "n_dense_tokens": len(dense),
            "output": text,
            "dense_output": dense_text,
            "question": sample.question,
            "reference": sample.reference,
            # last, so that the fields before are byte for byte those of runs before allocations existed
            "allocation": allocation,
            "normalize": normalize,
        })
    return records
