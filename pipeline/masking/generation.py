"""Greedy decoding with a KV cache, with optional per-step unit masks (SPEC section 6).

All rows share one prompt, so many (metric, level) mask sets decode together in one
batch. At step t the hooks multiply the units at the position being computed by the
row's mask for token t; earlier positions keep the states they got under their own
masks because they come from the cache.

Positions before the last prompt token are dense in every row, so they are computed
once with batch 1 and the cache is then repeated for all rows.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from pipeline.masking.hooks import StepMasks, hooks_for


def forward_arguments(model) -> tuple[str, str | None]:
    # transformers 5.x renamed ``past_key_values`` to ``cache``; older releases call
    # ``logits_to_keep`` ``num_logits_to_keep`` or lack it.
    names = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in names else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in names), None)
    return cache, keep


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
    device = next(model.parameters()).device
    rows = 1 if head_keep is None else head_keep.shape[0]
    hooks = hooks_for(model)
    temporary = not hooks.installed
    cache_name, keep_name = forward_arguments(model)
    cache = DynamicCache(config=model.config)
    last_only = {keep_name: 1} if keep_name else {}
    prompt_ids = prompt_ids.to(device).unsqueeze(0)

    eos = torch.tensor(eos_token_ids, device=device, dtype=torch.long)
    tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, device=device)
    try:
        if prompt_ids.shape[1] > 1:  # the dense prefix, once
            model(input_ids=prompt_ids[:, :-1], use_cache=True, **{cache_name: cache}, **last_only)
            if rows > 1:
                cache.batch_repeat_interleave(rows)
        if head_keep is not None:
            hooks.install()
            hooks.masks = StepMasks(heads=head_keep.to(device=device, dtype=torch.bool),
                                    neurons=neuron_keep.to(device=device, dtype=torch.bool))
        step_input = prompt_ids[:, -1:].expand(rows, 1)
        for step in range(max_new_tokens):
            if hooks.masks is not None:
                hooks.masks.step = step
            logits = model(input_ids=step_input, use_cache=True, **{cache_name: cache}, **last_only).logits[:, -1]
            next_token = logits.argmax(-1)
            tokens[:, step] = next_token
            just_finished = ~finished & torch.isin(next_token, eos)
            lengths = torch.where(just_finished, step + 1, lengths)
            finished |= just_finished
            if bool(finished.all()):
                break
            step_input = next_token.unsqueeze(-1)
    finally:
        hooks.masks = None
        if temporary:
            hooks.remove()
    return [row[:n].tolist() for row, n in zip(tokens, lengths.tolist())]


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
