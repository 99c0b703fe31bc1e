"""One sample through the whole protocol: labels -> scores -> masks -> masked generation -> measures.

This is the body of the predict step, kept free of Lightning so it reads top to
bottom and can be called directly.
"""

from __future__ import annotations

import torch

from pipeline.config import ProtocolConfig
from pipeline.data.sources import Sample
from pipeline.masking.generation import greedy_generate
from pipeline.masking.masks import achieved_sparsity, keep_masks
from pipeline.measures import bleu_vs_dense, task_score, token_agreement
from pipeline.models.adapters import UnitLayout
from pipeline.models.prompts import answer_length, prompt_ids
from pipeline.scores.attribution import attribute


def evaluate_sample(
    model,
    tokenizer,
    layout: UnitLayout,
    sample: Sample,
    template: str,
    protocol: ProtocolConfig,
    task: str,
    stop_ids: list[int],
) -> list[dict]:
    """All (metric, level) records of one sample."""
    prompt = torch.tensor(prompt_ids(tokenizer, template, sample.question))
    steps = answer_length(tokenizer, sample.reference, protocol.max_new_tokens)

    # Labels: what the dense model says (SPEC section 3).
    dense = greedy_generate(model, prompt, steps, stop_ids)[0]
    labels = torch.tensor(dense)

    # Scores [T, layers, units] per metric, then keep masks [levels, T, layers, units].
    scores = attribute(model, prompt, labels, protocol.metrics, protocol.ig_steps)
    head_keep = torch.cat([keep_masks(scores[m].heads, protocol.levels) for m in protocol.metrics])
    neuron_keep = torch.cat([keep_masks(scores[m].neurons, protocol.levels) for m in protocol.metrics])
    if protocol.dense_first_step:
        head_keep[:, 0] = True
        neuron_keep[:, 0] = True

    # Every (metric, level) row decodes in one batch.
    outputs = greedy_generate(model, prompt, len(dense), stop_ids, head_keep, neuron_keep)
    sparsity = achieved_sparsity(head_keep, neuron_keep, layout)  # [rows, T]

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    dense_text = decode(dense)
    records = []
    rows = [(m, p) for m in protocol.metrics for p in protocol.levels]
    for row, ((metric, level), tokens) in enumerate(zip(rows, outputs)):
        text = decode(tokens)
        records.append({
            "sample_id": sample.id,
            "metric": metric,
            "level": level,
            # averaged over the steps this row actually decoded
            "sparsity": sparsity[row, : max(1, len(tokens))].mean().item(),
            "bleu": bleu_vs_dense(tokens, dense, text, dense_text),
            "token_agreement": token_agreement(tokens, dense),
            "task_score": task_score(task, text, sample.reference),
            "dense_task_score": task_score(task, dense_text, sample.reference),
            "n_tokens": len(tokens),
            "n_dense_tokens": len(dense),
            "output": text,
            "dense_output": dense_text,
            "question": sample.question,
            "reference": sample.reference,
        })
    return records
