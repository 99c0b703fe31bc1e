"""The attribution engine: per-token unit outputs and gradients, then scores.

One forward and one backward pass over ``prompt + labels`` give, for every label
token t and every layer, the unit outputs at the position that predicts y_t and the
gradient of L_t alone with respect to them (see ``exact_attention.py`` for why this
equals the step-by-step definition). Several samples of different lengths share the
pass, padded left or right, with attention masks and position ids set accordingly.

Integrated gradients add, per layer and unit kind, one pass whose batch holds all n
scaling steps of all samples; the scaled passes read the dense keys and values of
earlier positions recorded by the first pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from pipeline.hooks import HEADS, NEURONS, Probe, UnitHooks, using_hooks
from pipeline.models.adapters import output_weights
from pipeline.models.inputs import forward_arguments, pad, position_ids, with_cache
from pipeline.scores.exact_attention import ExactAttention
from pipeline.scores.formulas import Terms
from pipeline.scores.metrics import DEFAULT_METRICS, SCORES, neuron_score_set

IGNORE = -100
# The LM head runs on at least this many rows of the batch (more positions per sample where the
# batch is small, or all): its backward for fewer rows is a matrix-vector product whose fp32 sum
# over the vocabulary is ~10x less precise (SmolLM2, one sample, one label: 2.2e-4 relative error
# of the gradients against fp64, 1.8e-5 with 4+ rows on a CPU;
# tests/test_scores.py::test_one_token_answer_fp32_precision). The extra rows take no part in the loss.
MIN_LOGIT_ROWS = 16
SPLIT_PREFIX_ON = {"cpu"}  # device types where the prompt prefix runs without autograd (see below)


@dataclass
class UnitScores:
    """One metric's importances: ``heads`` ``[tokens, layers, heads]``, ``neurons`` ``[tokens, layers, neurons]``."""

    heads: torch.Tensor
    neurons: torch.Tensor


@dataclass
class Packed:
    """Samples packed into one padded batch."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    positions: torch.Tensor  # [B, T]: the position predicting label t (padding points at a real one)
    labels: torch.Tensor  # [B, T], IGNORE where padded
    lengths: list[int]  # T per sample
    valid: torch.Tensor  # [N]: indices into the flattened [B, T] of the real (not padded) labels
    keep_argument: str | None = None  # the model's name for "logits for the last n positions"
    logits_kept: int = 0  # >0: the model returns logits for the last ``logits_kept`` positions only

    def repeat(self, times: int) -> "Packed":
        rep = lambda t: t.repeat(times, 1)  # noqa: E731
        per_copy = self.labels.numel()
        valid = torch.cat([self.valid + copy * per_copy for copy in range(times)])
        kept = self.logits_kept and _logits_kept(int(self.positions.shape[1]), self.input_ids.shape[0] * times,
                                                 self.input_ids.shape[1])  # more rows: fewer positions needed
        return replace(self, input_ids=rep(self.input_ids), attention_mask=rep(self.attention_mask),
                       position_ids=rep(self.position_ids), positions=rep(self.positions), labels=rep(self.labels),
                       lengths=self.lengths * times, valid=valid, logits_kept=kept)

    def split(self) -> tuple[dict, "Packed"]:
        """Inputs of the positions before any label position, and the rest.

        Left padding puts every label position in the last ``max T`` columns (the
        split keeps ``logits_kept`` columns when that is more). The columns before them
        need no gradient (exact attention sees earlier positions only as fixed context),
        so they run once without autograd and reach the attribution pass as a KV cache.
        """
        cut = self.input_ids.shape[1] - max(int(self.positions.shape[1]), self.logits_kept)
        prefix = dict(input_ids=self.input_ids[:, :cut], attention_mask=self.attention_mask[:, :cut],
                      position_ids=self.position_ids[:, :cut])
        rest = replace(self, input_ids=self.input_ids[:, cut:], position_ids=self.position_ids[:, cut:],
                       positions=self.positions - cut, logits_kept=0)
        return prefix, rest

    def selected(self) -> torch.Tensor:
        """Indices into the flattened ``[batch * seq]`` positions of every label's predicting position."""
        # known before the pass (no wait for the GPU to find the real labels)
        return self._flat_index(self.positions, self.input_ids.shape[1])

    def logit_rows(self) -> torch.Tensor:
        """The same positions as indices into the flattened logits (the last ``logits_kept`` positions, or all)."""
        if not self.logits_kept:
            return self.selected()
        return self._flat_index(self.positions - (self.input_ids.shape[1] - self.logits_kept), self.logits_kept)

    def _flat_index(self, positions: torch.Tensor, width: int) -> torch.Tensor:
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
        return (rows * width + positions).flatten().index_select(0, self.valid)

    def model_inputs(self) -> dict:
        inputs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                      use_cache=False)
        if self.logits_kept:
            inputs[self.keep_argument] = self.logits_kept
        return inputs


def pack(prompts: list[torch.Tensor], labels: list[torch.Tensor], padding_side: str, device,
         keep_argument: str | None = None) -> Packed:
    """Pad samples into one batch.

    With left padding every sample's label positions are among the last ``max T``
    positions, so (where the model supports it) logits are computed only there: the
    output projection over the vocabulary is skipped for all prompt positions.
    """
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    label_lengths = torch.tensor([len(y) for y in labels])
    fed = torch.cat([t for p, y in zip(prompts, labels) for t in (p, y[:-1])])  # each: prompt + y_0..y_{T-2}
    input_ids, attention_mask, start = pad(fed, prompt_lengths + label_lengths - 1, padding_side)
    B, T = len(prompts), int(label_lengths.max())
    first = (start + prompt_lengths - 1)[:, None]  # the position predicting y_0
    steps = torch.arange(T)
    real = steps < label_lengths[:, None]  # [B, T]
    positions = torch.where(real, first + steps, first)
    label_ids = torch.full((B, T), IGNORE, dtype=torch.long)
    label_ids[real] = torch.cat(list(labels))
    to = lambda t: t.to(device)  # noqa: E731
    valid = (label_ids != IGNORE).flatten().nonzero()[:, 0]
    packed = Packed(to(input_ids), to(attention_mask), to(position_ids(attention_mask)), to(positions), to(label_ids),
                    label_lengths.tolist(), to(valid))
    if padding_side == "left" and keep_argument is not None:
        packed.logits_kept = _logits_kept(T, B, input_ids.shape[1])
        packed.keep_argument = keep_argument
    return packed


def _logits_kept(T: int, rows: int, width: int) -> int:
    """Positions whose logits are kept: the T label positions, or more so that the LM head sees
    ``MIN_LOGIT_ROWS`` rows of the batch, at most the whole width."""
    return min(max(T, -(-MIN_LOGIT_ROWS // rows)), width)


def _label_loss(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Sum over samples and tokens of CE(logits at the predicting position, label).

    Only the real labels' rows enter the softmax (padding slots would be ignored anyway).
    """
    picked = logits.flatten(0, 1).index_select(0, packed.logit_rows())
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    return F.cross_entropy(picked, packed.labels.flatten().index_select(0, packed.valid), reduction="sum")


def _pick(tensors: dict, kind: str, layers: int, index: torch.Tensor) -> torch.Tensor:
    """``[N, layers, width]``: the rows ``index`` of every layer's ``[batch, seq, width]`` tensor."""
    return torch.stack([tensors[(kind, layer)].flatten(0, 1).index_select(0, index) for layer in range(layers)], dim=1)


def _outputs_and_gradients(model, hooks: UnitHooks, attention: ExactAttention, packed: Packed, with_gradient: bool,
                           keep_context: bool):
    """Unit outputs and per-token gradients ``[N, layers, width]`` at the N label positions.

    ``keep_context`` records every position's keys and values for integrated gradients,
    so the whole sequence runs through autograd.
    """
    layout = hooks.layout
    inputs = packed.model_inputs()
    # On a CPU the prompt prefix runs once without autograd and is passed on as a KV cache:
    # compute saved is time saved. On a GPU the two passes cost more Python time than the
    # GPU time they save: one pass over the whole sequence measured 127-141 ms against
    # 149-186 ms (Phi-2 shape, 64 prompts, H200).
    split = packed.input_ids.device.type in SPLIT_PREFIX_ON and not keep_context
    if split and packed.logits_kept and packed.input_ids.shape[1] > packed.logits_kept:
        prefix, packed = packed.split()
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(**prefix, **with_cache(model, cache))  # its logits are not needed
        inputs = {**packed.model_inputs(), **with_cache(model, cache, last_position_only=False)}  # mask spans both
    probe = Probe(rows=packed.input_ids.shape[0])
    hooks.probe = probe
    keys = [(kind, layer) for kind in (HEADS, NEURONS) for layer in range(layout.num_layers)]
    gradients = {}
    try:
        with torch.set_grad_enabled(with_gradient), attention.mode("record" if keep_context else "live"):
            logits = model(**inputs).logits
            if with_gradient:
                grads = torch.autograd.grad(_label_loss(logits, packed), [probe.inputs[k] for k in keys])
                gradients = dict(zip(keys, grads))
            del logits
    finally:
        hooks.probe = None
    index = packed.selected()
    with torch.no_grad():  # the recorded inputs are still part of the graph; picking them needs no record
        x = {kind: _pick(probe.inputs, kind, layout.num_layers, index) for kind in (HEADS, NEURONS)}
    g = {kind: _pick(gradients, kind, layout.num_layers, index) for kind in (HEADS, NEURONS)} if with_gradient else None
    return x, g


def _integrated_gradients(model, hooks: UnitHooks, attention: ExactAttention, packed: Packed,
                          steps: int) -> dict[str, torch.Tensor]:
    """Step-averaged gradients ``[N, layers, width]``, one pass per (kind, layer).

    Each pass holds every sample at every step (``steps * B`` rows). Must follow a
    ``record`` pass over ``packed``: the scaled passes see the recorded dense states of
    earlier positions, as one decoding step would.
    """
    layout = hooks.layout
    B = packed.input_ids.shape[0]
    device = packed.input_ids.device
    alphas = (torch.arange(1, steps + 1, dtype=torch.float64, device=device) / steps).repeat_interleave(B)
    batch = packed.repeat(steps)  # row = step * B + sample
    index = batch.selected()  # ordered by step, then sample, then token
    averaged = {}
    for kind in (HEADS, NEURONS):
        per_layer = []
        for layer in range(layout.num_layers):
            probe = Probe(rows=batch.input_ids.shape[0], positions=batch.positions, valid=batch.labels != IGNORE,
                          scale=(kind, layer, alphas), only=(kind, layer))
            hooks.probe = probe
            try:
                with torch.enable_grad(), attention.mode("replay"):
                    logits = model(**batch.model_inputs()).logits
                    (grad,) = torch.autograd.grad(_label_loss(logits, batch), [probe.inputs[(kind, layer)]])
                    del logits
            finally:
                hooks.probe = None
            picked = grad.flatten(0, 1).index_select(0, index)
            per_layer.append(picked.view(steps, -1, picked.shape[-1]).mean(0))  # [N, width]
        averaged[kind] = torch.stack(per_layer, dim=1)
    return averaged


def attribute_batch(
    model,
    prompts: list[torch.Tensor],
    labels: list[torch.Tensor],
    metrics=DEFAULT_METRICS,
    ig_steps: int = 20,
    padding_side: str = "left",
    targets: list[torch.Tensor] | None = None,
    hooks: UnitHooks | None = None,
) -> list[dict[str, UnitScores]]:
    """``attribute`` for several samples in one pass; returns one result per sample.

    ``hooks``: the run's ``UnitHooks`` (``pipeline/hooks.py``); None: hooks installed for this call only.
    ``targets`` (one 1-D tensor per sample, as long as its labels): the tokens whose loss is
    differentiated, when they differ from the fed ``labels`` (lm-eval log-likelihood requests
    feed the given continuation but take the dense model's argmax as labels).
    """
    unknown = [m for m in metrics if m not in SCORES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(SCORES)}")
    if ig_steps < 1:
        raise ValueError("ig_steps must be >= 1")
    device = next(model.parameters()).device
    packed = pack(prompts, labels, padding_side, device, forward_arguments(model)[1])
    if targets is not None:
        real = packed.labels != IGNORE
        packed.labels[real] = torch.cat([t.to(device) for t in targets])
    rows = [SCORES[m] for m in metrics]
    with_gradient = any(row.needs_gradient for row in rows)
    integrated = any(row.gradient == "integrated" for row in rows)
    # ExactAttention keeps a record pass's keys and values for the replays, until the block ends
    with using_hooks(model, hooks) as hooks, ExactAttention(model) as attention:
        x, g = _outputs_and_gradients(model, hooks, attention, packed, with_gradient, keep_context=integrated)
        ig = _integrated_gradients(model, hooks, attention, packed, ig_steps) if integrated else None

    layout = hooks.layout
    head_shape = (*x[HEADS].shape[:-1], layout.num_heads, layout.head_dim)
    x_heads = x[HEADS].view(head_shape)
    head_weights, column_norms = output_weights(layout) if any(row.weights for row in rows) else (None, None)
    neurons = neuron_score_set(metrics, x[NEURONS], g and g[NEURONS], ig and ig[NEURONS], column_norms)
    per_metric = {}
    for row in rows:
        gradients = ig if row.gradient == "integrated" else g
        g_heads = gradients[HEADS].view(head_shape) if gradients is not None else None
        per_metric[row.name] = (row.heads(Terms(x_heads, g_heads, head_weights)), neurons[row.name])
    # rows are sample by sample; split gives each sample's rows as views in one call per tensor
    per_sample = {m: (h.split(packed.lengths), n.split(packed.lengths)) for m, (h, n) in per_metric.items()}
    return [{m: UnitScores(heads=h[i], neurons=n[i]) for m, (h, n) in per_sample.items()}
            for i in range(len(packed.lengths))]


def attribute(
    model,
    prompt_ids: torch.Tensor,
    label_ids: torch.Tensor,
    metrics=DEFAULT_METRICS,
    ig_steps: int = 20,
    hooks: UnitHooks | None = None,
) -> dict[str, UnitScores]:
    """Score every attention head and MLP neuron for every label token.

    Args:
        model: a Hugging Face causal LM whose architecture is in the adapter table.
        prompt_ids: 1-D tensor, the formatted prompt's token ids.
        label_ids: 1-D tensor, the dense model's greedy output y_0..y_{T-1}.
        metrics: any names of the score table (``pipeline.scores.metrics.SCORES``).
        ig_steps: number of integrated-gradient steps (``ig`` only).
        hooks: a ``UnitHooks`` of ``model`` to work with; None: installed for this call and removed after.

    Returns:
        ``{metric: UnitScores}`` with ``heads`` ``[T, layers, heads]`` and ``neurons``
        ``[T, layers, neurons]``; row t scores the units for generating y_t.
    """
    return attribute_batch(model, [prompt_ids.cpu()], [label_ids.cpu()], metrics, ig_steps, hooks=hooks)[0]
