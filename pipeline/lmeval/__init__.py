"""Masked models inside lm-evaluation-harness: the lm-eval model ``sparseact``.

Importing ``pipeline.lmeval.model`` registers the model with lm-eval's own registry
(``lm_eval.api.registry.register_model("sparseact")``). lm-eval 0.4.x discovers models only
through that registry and its built-in ``MODEL_MAPPING``; it reads no entry points and
``--include_path`` loads task YAMLs, not model code (lm-eval issues #1457, #1621, #3282).
So the plain ``lm_eval`` command cannot see ``sparseact`` until something imports this
package; ``python -m pipeline.lmeval ARGS`` is the ``lm_eval`` command line with that import
done first (same arguments), and ``sparseact lmeval`` is the project's own subcommand.

What the model computes
=======================

The numbered rules below define every number the model returns, precisely enough to
recompute them without this code (``tests/test_lmeval.py`` does). Where lm-eval's request
types allow, they are the rules of ``sparseact run`` (``docs/protocol.md``).

Model arguments: ``pretrained`` (bundled short name, Hub id or local directory, loaded by
``pipeline.models.loading.load_model``), ``score``, ``level`` (p in [0, 1)), ``allocation``
(``per_layer``: floor(p * n) units off in every layer, per position; see ``ALLOCATIONS``),
``dtype``, ``batch_size``, ``dense_first_step``, ``ig_steps``, ``device``.

1. Which positions are masked. A ``loglikelihood`` request ``(context, continuation)``
   with continuation ``y_0 .. y_{T-1}`` is scored by one teacher-forced pass over
   ``context + y_0 .. y_{T-2}``. The positions predicting ``y_0 .. y_{T-1}`` (the last
   context position and the continuation positions but the last) are *steps* 0 .. T-1,
   as the decoding steps of ``sparseact run``; every earlier (context) position is dense.
   Each step t has its own keep mask: at step t the units switched off by mask t are
   zeroed at that position only. Later positions see earlier positions' states as they
   were computed under those positions' own masks, exactly as greedy decoding with a KV
   cache does in ``sparseact run``. ``loglikelihood_rolling`` is lm-eval's split into
   loglikelihood windows, each scored that way. ``generate_until``: decoding step t
   (the position producing output token t) uses mask t; the prompt is dense.
2. Which activations and labels define mask t. Every score is computed by the
   attribution engine (``pipeline.scores.attribution``) in a *dense* teacher-forced pass
   over the same tokens, and ranked within each layer (``allocation``):

   * label-free scores (``magnitude``, ``wina``): from the dense model's unit outputs at
     the position of step t (for ``loglikelihood``: given ``context + y_<t``; for
     ``generate_until``: the prompt and the dense greedy continuation before t). This is
     exact and the same rule as ``sparseact run``; it is not the online rule of a deployed
     sparse model, whose activations at step t would already be changed by masks of
     earlier steps and layers.
   * oracle scores (``gradient``, ``gxo``, ``snip``, ``ig``, ``cor_gxo``): labels are what
     the dense model says. ``loglikelihood``: the dense model's argmax at each step's
     position (not the given continuation token), with the given continuation fed as
     input; ``generate_until``: the dense greedy continuation (lm-eval's ``hf``
     generation), as ``sparseact run``. Gradients are per token, earlier positions held
     fixed (``exact_attention``).
3. ``generate_until`` at level p > 0 decodes greedily with mask t at step t for at most
   as many steps as the dense continuation has (its masks are defined only there; as in
   ``sparseact run``), stops at an end-of-sequence token, and lm-eval then cuts the
   text at the task's stop sequences. Sampling (``do_sample`` / ``temperature > 0``) is
   refused at p > 0: there is no dense greedy continuation to define masks on.
4. ``dense_first_step``: step 0 keeps every unit (the authors' scripts). Level 0 runs
   lm-eval's own ``hf`` code path unchanged, so its numbers equal ``--model hf`` on the
   same model object, dtype and batch size.
5. At p > 0 lm-eval's one-token-continuation logits sharing is off: requests that share
   ``context + continuation[:-1]`` but split it differently mask different positions.
6. ``static`` (calibrated thresholds) is not served yet: it needs calibration rows.
"""

MODEL_NAME = "sparseact"
