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
* ``evaluate(...)``: a whole run, as ``sparseact run`` does it.
"""

from pipeline.masks.allocation import allocate
from pipeline.decoding.generation import masked_generate
from pipeline.masks.masks import achieved_sparsity, keep_masks
from pipeline.models.adapters import ADAPTERS, layout_for
from pipeline.scores.attribution import UnitScores, attribute
from pipeline.scores.metrics import DEFAULT_METRICS, METRICS, SCORES


def load_scores(run_dir, sample_id):
    """Raw per-token scores saved by a run with ``protocol.save_scores``; see ``pipeline.results.raw_scores``."""
    from pipeline.results.raw_scores import load_scores as _load

    return _load(run_dir, sample_id)


def evaluate(*args, **kwargs):
    """Run the whole protocol; see ``pipeline.runner.run.evaluate``."""
    from pipeline.runner.run import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = [
    "ADAPTERS", "DEFAULT_METRICS", "METRICS", "SCORES", "UnitScores", "achieved_sparsity", "allocate", "attribute",
    "evaluate",
    "keep_masks", "layout_for", "load_scores", "masked_generate",
]
