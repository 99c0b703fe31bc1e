"""Greedy decoding with a KV cache, with optional per-step unit masks (SPEC section 6).

All rows share one prompt, so many (metric, level) mask sets decode together in one
batch. At step t the hooks multiply the units at the position being computed by the
row's mask for token t; earlier positions keep the states they got under their own
masks because they come from the cache.

Work that is the same in every row is done once:

* the prompt before its last token is dense in every row: it runs once with batch 1
  and its cache is shared by all rows;
* after a dense run (``dense_generate``), the leading steps in which no row switches a
  unit off are the dense run's own steps (SPEC's dense first step), so masked rows
  start from the dense run's cache after them (``masked_after_dense``); a row that
  switches nothing off at any step *is* the dense run and is not decoded again.

On a GPU each decoding step is replayed from a captured CUDA graph where the model
allows it (``cuda_graph.py``): a step then costs GPU time, not Python time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pipeline.masking.cuda_graph import decode_captured
from pipeline.masking.hooks import StepMasks, hooks_for

def forward_arguments(model) -> tuple[str, str | None]:
    # transformers 5.x renamed ``past_key_values`` to ``cache``; older releases call
    # ``logits_to_keep`` ``num_logits_to_keep`` or lack it.
    names = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in names else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in names), None)
    return cache, keep


@dataclass
class DenseRun:
    """A dense greedy run: its tokens and the cache of everything it fed the model."""

    prompt_ids: torch.Tensor  # 1-D, on the model's device
    tokens: list[int]
    cache: DynamicCache  # positions of prompt + tokens[:-1]

    def prefix(self, model, steps: int) -> tuple[DynamicCache, torch.Tensor]:
        """The cache and the next input after the prompt and the first ``steps`` dense tokens."""
        fed = torch.cat([self.prompt_ids, torch.tensor(self.tokens[:steps], dtype=torch.long,
                                                       device=self.prompt_ids.device)])
        length = len(fed) - 1
        if length == 0:
            return DynamicCache(config=model.config), fed[-1:].view(1, 1)
        everything = len(self.prompt_ids) - 1 + len(self.tokens)
        if any(layer.keys.shape[-2] != everything for layer in self.cache.layers):
            # a sliding-window layer dropped early positions: recompute them
            return _encode(model, fed[:-1]), fed[-1:].view(1, 1)
        cache = DynamicCache(config=model.config)
        for index, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], index)
        return cache, fed[-1:].view(1, 1)


def _encode(model, ids: torch.Tensor) -> DynamicCache:
    """The dense cache of ``ids`` (1-D), batch 1."""
    cache = DynamicCache(config=model.config)
    if len(ids):
        cache_name, keep_name = forward_arguments(model)
        model(input_ids=ids.unsqueeze(0), use_cache=True, **{cache_name: cache}, **({keep_name: 1} if keep_name else {}))
    return cache


def _lengths(tokens: torch.Tensor, eos: torch.Tensor) -> list[int]:
    """Per row: up to and including the first end-of-sequence token, else all."""
    is_eos = torch.isin(tokens, eos)
    first = is_eos.int().argmax(dim=1) + 1
    return torch.where(is_eos.any(dim=1), first, tokens.shape[1]).tolist()


def _decode(model, prefix: DynamicCache, first_input: torch.Tensor, rows: int, steps: int, eos: torch.Tensor,
            heads: torch.Tensor | None = None, neurons: torch.Tensor | None = None) -> list[list[int]]:
    """Greedy steps after a batch-1 ``prefix`` for ``rows`` rows, masks ``[rows, steps, layers, units]``."""
    if steps == 0:
        return [[] for _ in range(rows)]
    first_input = first_input.expand(rows, 1)
    tokens = decode_captured(model, prefix, first_input, rows, steps, eos, heads, neurons)
    if tokens is None:
        if rows > 1:
            prefix.batch_repeat_interleave(rows)
        tokens = _decode_eager(model, prefix, first_input, steps, eos, heads, neurons)
    return [row[:n] for row, n in zip(tokens.tolist(), _lengths(tokens, eos))]


def _decode_eager(model, cache, step_input, steps, eos, heads, neurons) -> torch.Tensor:
    rows, device = step_input.shape[0], step_input.device
    cache_name, keep_name = forward_arguments(model)
    last_only = {keep_name: 1} if keep_name else {}
    hooks = hooks_for(model)
    temporary = not hooks.installed
    masks = None
    if heads is not None:
        hooks.install()
        masks = hooks.masks = StepMasks(rows, hooks.layout, device)
    # On a GPU, asking whether every row has finished waits for the GPU: ask every 8 steps.
    check_every = 1 if device.type == "cpu" else 8
    tokens = torch.zeros(rows, steps, dtype=torch.long, device=device)
    try:
        for step in range(steps):
            if masks is not None:
                masks.load(heads[:, step], neurons[:, step])
            logits = model(input_ids=step_input, use_cache=True, **{cache_name: cache}, **last_only).logits[:, -1]
            step_input = logits.argmax(-1, keepdim=True)
            tokens[:, step] = step_input[:, 0]
            if len(eos) and (step + 1) % check_every == 0 and bool(torch.isin(tokens[:, : step + 1], eos).any(1).all()):
                return tokens[:, : step + 1]
    finally:
        hooks.masks = None
        if temporary:
            hooks.remove()
    return tokens


def _on_device(model, prompt_ids, eos_token_ids):
    device = next(model.parameters()).device
    return prompt_ids.to(device), torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)


@torch.no_grad()
def dense_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_ids) -> DenseRun:
    """The dense model's greedy output (batch 1), stopping after an end-of-sequence token."""
    prompt_ids, eos = _on_device(model, prompt_ids, eos_token_ids)
    cache = DynamicCache(config=model.config)
    cache_name, keep_name = forward_arguments(model)
    if len(prompt_ids) > 1:
        model(input_ids=prompt_ids[None, :-1], use_cache=True, **{cache_name: cache},
              **({keep_name: 1} if keep_name else {}))
    tokens = _decode_eager(model, cache, prompt_ids[None, -1:], max_new_tokens, eos, None, None)
    return DenseRun(prompt_ids, tokens[0, : _lengths(tokens, eos)[0]].tolist(), cache)


@torch.no_grad()
def masked_after_dense(model, dense: DenseRun, head_keep: torch.Tensor, neuron_keep: torch.Tensor,
                       eos_token_ids) -> list[list[int]]:
    """Masked greedy outputs of every row, at most ``len(dense.tokens)`` tokens each.

    ``head_keep`` ``[rows, steps, layers, heads]``, ``neuron_keep`` ``[rows, steps, layers, neurons]``
    with ``steps >= len(dense.tokens)``. Steps before the first switched-off unit of any
    row, and rows that never switch a unit off, are the dense run's.
    """
    _, eos = _on_device(model, dense.prompt_ids, eos_token_ids)
    device = dense.prompt_ids.device
    T = len(dense.tokens)
    heads = head_keep[:, :T].to(device=device, dtype=torch.bool)
    neurons = neuron_keep[:, :T].to(device=device, dtype=torch.bool)
    dense_step = heads.flatten(2).all(2) & neurons.flatten(2).all(2)  # [rows, T]
    active = (~dense_step.all(1)).nonzero()[:, 0]
    outputs = [list(dense.tokens) for _ in range(head_keep.shape[0])]
    if len(active) == 0:
        return outputs
    shared = int(dense_step[active].all(0).int().argmin())  # leading steps dense in every row
    kv, first_input = dense.prefix(model, shared)
    decoded = _decode(model, kv, first_input, len(active), T - shared, eos,
                      heads[active, shared:], neurons[active, shared:])
    for row, tokens in zip(active.tolist(), decoded):
        outputs[row] = dense.tokens[:shared] + tokens
    return outputs


@torch.no_grad()
def greedy_generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    head_keep: torch.Tensor | None = None,
    neuron_keep: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generate greedily from one prompt, once per mask row.

    Args:
        prompt_ids: 1-D prompt token ids.
        max_new_tokens: at most this many tokens per row.
        eos_token_ids: generation of a row stops after any of these (it is kept).
        head_keep: ``[rows, steps, layers, heads]`` 0/1 keep masks (or None: dense, one row).
        neuron_keep: ``[rows, steps, layers, neurons]``.

    Returns: one list of generated token ids per row.
    """
    if head_keep is None:
        return [dense_generate(model, prompt_ids, max_new_tokens, eos_token_ids).tokens]
    prompt_ids, eos = _on_device(model, prompt_ids, eos_token_ids)
    masks = []
    for keep in (head_keep, neuron_keep):
        keep = keep[:, :max_new_tokens].to(device=prompt_ids.device, dtype=torch.bool)
        missing = max_new_tokens - keep.shape[1]  # steps without a mask are dense
        masks.append(torch.cat([keep, keep.new_ones(keep.shape[0], missing, *keep.shape[2:])], 1) if missing > 0 else keep)
    return _decode(model, _encode(model, prompt_ids[:-1]), prompt_ids[-1:].view(1, 1), head_keep.shape[0],
                   max_new_tokens, eos, *masks)


def masked_generate(model, prompt_ids, head_keep, neuron_keep, eos_token_ids, max_new_tokens=None):
    """Masked greedy generation from given keep masks (library entry point).

    ``head_keep`` ``[steps, layers, heads]`` or ``[rows, steps, layers, heads]``, likewise
    ``neuron_keep``; generates at most ``steps`` tokens (or ``max_new_tokens``).
    Returns a list of token-id lists, one per row.
    """
    if head_keep.dim() == 3:
        head_keep, neuron_keep = head_keep.unsqueeze(0), neuron_keep.unsqueeze(0)
    steps = head_keep.shape[1] if max_new_tokens is None else max_new_tokens
    return greedy_generate(model, prompt_ids, steps, list(eos_token_ids), head_keep, neuron_keep)
