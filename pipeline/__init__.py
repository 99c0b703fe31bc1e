"""sparseact: training-free evaluation of sparse activation in small language models.

Library entry points:

* ``attribute(model, prompt_ids, label_ids, metrics)``: per-token scores of every
  attention head ``[tokens, layers, heads]`` and MLP neuron ``[tokens, layers, neurons]``.
* ``keep_masks(importance, levels)``: switch off the lowest ``floor(p * n)`` units per layer.
* ``allocate(allocation, importance, levels, normalize)``: the same under another
  allocation (``global``: all layers ranked together; ``calibrated``: per-layer levels).
* ``SCORES``: the score table, one row per score.
* ``masked_generate(model, prompt_ids, head_keep, neuron_keep, eos_token_ids)``:
  greedy decoding with per-step masks.
* ``UnitHooks(layout_for(model))``: the hooks that probe and mask units; pass one to
  ``attribute``/``masked_generate`` to reuse it, or let each call install its own.
* ``CapturedSteps(model)``: on a GPU, the decoding steps captured as CUDA graphs; pass one to
  ``masked_generate`` (``graphs=``) to keep them from one call to the next, or let each call
  capture its own.
* ``evaluate(...)``: a whole run, as ``sparseact run`` does it.
* ``load_scores(run_dir, sample_id)``: raw per-token scores saved by a run.

Each name is imported on first use (PEP 562), so ``import pipeline`` and the command
line's ``--help`` load no torch.
"""

from importlib import import_module

_WHERE = {
    "ADAPTERS": "pipeline.models.adapters",
    "layout_for": "pipeline.models.adapters",
    "attribute": "pipeline.scores.attribution",
    "UnitScores": "pipeline.scores.attribution",
    "SCORES": "pipeline.scores.metrics",
    "METRICS": "pipeline.scores.metrics",
    "DEFAULT_METRICS": "pipeline.scores.metrics",
    "keep_masks": "pipeline.masks.masks",
    "achieved_sparsity": "pipeline.masks.masks",
    "allocate": "pipeline.masks.allocation",
    "UnitHooks": "pipeline.hooks",
    "CapturedSteps": "pipeline.decoding.cuda_graph",
    "masked_generate": "pipeline.decoding.generation",
    "evaluate": "pipeline.runner.run",
    "load_scores": "pipeline.results.raw_scores",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
