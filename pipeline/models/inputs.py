"""How the model is called: argument names that differ between releases, padded batches."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch


def forward_arguments(model) -> tuple[str, str | None]:
    """The model's names for the KV cache and for "logits of the last n positions only"."""
    # transformers 5.x renamed ``past_key_values`` to ``cache``; older releases call
    # ``logits_to_keep`` ``num_logits_to_keep`` or lack it.
    names = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in names else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in names), None)
    return cache, keep


def with_cache(model, cache, last_position_only: bool = True) -> dict:
    """Keyword arguments that make ``model`` read and extend ``cache``.

    ``last_position_only``: where the model supports it, logits are computed for the
    last position only (decoding needs no others).
    """
    cache_name, keep_name = forward_arguments(model)
    arguments = {cache_name: cache, "use_cache": True}
    if last_position_only and keep_name:
        arguments[keep_name] = 1
    return arguments


def pad(values: torch.Tensor, lengths: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences, concatenated in ``values`` with ``lengths`` ``[B]``, as one padded batch.

    Returns ``ids`` ``[B, width]`` (0 where padded), ``attention_mask`` ``[B, width]`` and
    each row's first real column ``[B]``; ``side`` is ``left`` or ``right``.
    """
    lengths = lengths.to(values.device)
    width = int(lengths.max())
    start = width - lengths if side == "left" else torch.zeros_like(lengths)
    columns = torch.arange(width, device=values.device)
    inside = (columns >= start[:, None]) & (columns < (start + lengths)[:, None])
    ids = torch.zeros(len(lengths), width, dtype=torch.long, device=values.device)
    ids[inside] = values  # row by row, in order
    return ids, inside.long(), start


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the real tokens of each row (padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@contextmanager
def attention_implementation(model, name: str):
    """Inside the block, ``model``'s attention modules call the function registered as ``name``
    (transformers' ``AttentionInterface``); its own implementation again after it."""
    configs = list({id(c): c for c in (model.config, model.config.get_text_config())}.values())
    previous = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = name
    try:
        yield
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation
