"""Greedy decoding with a KV cache, with optional per-step unit masks (docs/protocol.md §6).

All rows share one prompt, so many (metric, level) mask sets decode together in one
batch. At step t the hooks multiply the units at the position being computed by the
row's mask for token t; earlier positions keep the states they got under their own
masks because they come from the cache.

Work that is the same in every row is done once:

* the prompt before its last token is dense in every row: it runs once with batch 1
  and its cache is shared by all rows;
* after a dense run (``dense_generate``), the leading steps in which no row switches a
  unit off are the dense run's own steps (e.g. step 0 under --protocol.dense_first_step, docs/protocol.md §6), so masked rows
  start from the dense run's cache after them (``masked_after_dense_batch``); a row that
  switches nothing off at any step *is* the dense run and is not decoded again.

On a GPU each decoding step is replayed from a captured CUDA graph where the model
allows it (``cuda_graph.py``): a step then costs GPU time, not Python time. There the
dense runs of a batch decode as one padded batch, and the masked rows of many samples
decode together (``GROUP_KV_BYTES`` bounds their cache), the rows of a sample reading
its prefix once per step (``shared_prefix.py``): a replayed step costs about the same
for 45 rows as for 1000, so rows of many samples share each step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from pipeline.decoding.cuda_graph import (
    CHECK_EVERY,
    CapturedSteps,
    cached_kv,
    decode_captured,
    decode_captured_padded,
    padded_capacity,
    steps_for,
)
from pipeline.decoding import shared_prefix
from pipeline.decoding.shared_prefix import decoder_for, kv_geometry
from pipeline.device import on_device
from pipeline.hooks import StepMasks, UnitHooks, using_hooks
from pipeline.models.inputs import pad, position_ids, with_cache

DENSE_GRAPHS = True  # dense runs of a batch decode through captured padded steps where possible
MASKED_GROUPS = True  # masked rows of several samples share captured padded steps where possible
GROUP_KV_BYTES = 24 * 2**30  # static cache of one group of masked rows (also at most a quarter of free memory)
GROUP_MAX_ROWS = 2048


@dataclass
class DenseRun:
    """A dense greedy run: its tokens and the keys and values of everything it fed the model."""

    prompt_ids: torch.Tensor  # 1-D, on the model's device
    tokens: list[int]
    # The keys and values of everything it fed the model (prompt + tokens[:-1]): per layer (keys, values)
    # [runs, kv heads, columns, dim] of the batch that decoded it, its row there and its first column;
    # None: recompute when needed. Plain tensors, sliced only when used: building transformers' cache
    # cost ~4 ms of host time per run, and slicing every layer of every run ahead of use ~0.4 s per
    # 256 questions (Phi-2 shape).
    batch_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    row: int = 0
    start: int = 0

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer ``(keys, values)`` ``[1, kv heads, prompt + tokens[:-1], dim]``, or None."""
        return None if self.batch_kv is None else self._columns(len(self.prompt_ids) + len(self.tokens) - 1).layers()

    def prefix(self, model, steps: int) -> tuple[DynamicCache, torch.Tensor]:
        """The cache (batch 1) of the prompt and the first ``steps`` dense tokens but the last one,
        and that last one: the next input ``[1, 1]``."""
        fed = self._fed(steps)
        if self.batch_kv is None:  # a sliding-window layer had dropped early positions: recompute them
            return _encode(model, fed[:-1]), fed[-1:].view(1, 1)
        return _cache_of(model, self._columns(len(fed) - 1).layers()), fed[-1:].view(1, 1)

    def shared_prefix(self, model, steps: int) -> tuple[shared_prefix.Prefix, torch.Tensor]:
        """``prefix`` as a ``Prefix`` of the batch's keys and values (no cache object, nothing sliced):
        ``Prefix.layers()`` gives its per-layer ``(keys, values)``, ``Prefix.length`` its positions."""
        fed = self._fed(steps)
        if self.batch_kv is None:
            return shared_prefix.Prefix(cached_kv(_encode(model, fed[:-1])), 0, 0, len(fed) - 1), fed[-1:].view(1, 1)
        return self._columns(len(fed) - 1), fed[-1:].view(1, 1)

    def _fed(self, steps: int) -> torch.Tensor:
        return torch.cat([self.prompt_ids, torch.tensor(self.tokens[:steps], dtype=torch.long,
                                                        device=self.prompt_ids.device)])

    def _columns(self, length: int) -> shared_prefix.Prefix:
        """The first ``length`` columns of this run in the batch's keys and values."""
        return shared_prefix.Prefix(self.batch_kv, self.row, self.start, length)


def _cache_of(model, kv) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(kv):
        cache.update(keys, values, index)
    return cache


def _encode(model, ids: torch.Tensor) -> DynamicCache:
    """The dense cache of ``ids`` (1-D), batch 1."""
    cache = DynamicCache(config=model.config)
    if len(ids):
        model(input_ids=ids.unsqueeze(0), **with_cache(model, cache))
    return cache


def _eos(eos_token_ids, device) -> torch.Tensor:
    return on_device(list(eos_token_ids), device, torch.long)


def _pad_steps(keep: torch.Tensor, steps: int) -> torch.Tensor:
    """Masks ``[rows, steps, ...]``: cut to ``steps``, or extended with keep-everything steps."""
    keep = keep[:, :steps]
    missing = steps - keep.shape[1]
    return torch.cat([keep, keep.new_ones(keep.shape[0], missing, *keep.shape[2:])], 1) if missing > 0 else keep


def _lengths(tokens: torch.Tensor, eos: torch.Tensor, limits: torch.Tensor) -> list[int]:
    """Per row: up to and including the first end-of-sequence token, at most the row's limit."""
    is_eos = torch.isin(tokens, eos)
    first = is_eos.int().argmax(dim=1) + 1
    return torch.minimum(torch.where(is_eos.any(dim=1), first, tokens.shape[1]), limits).tolist()


def _decode(model, prefix: DynamicCache, first_input: torch.Tensor, rows: int, steps: int, eos: torch.Tensor,
            heads: torch.Tensor | None = None, neurons: torch.Tensor | None = None,
            hooks: UnitHooks | None = None, graphs: CapturedSteps | None = None) -> list[list[int]]:
    """Greedy steps after a batch-1 ``prefix`` for ``rows`` rows, masks ``[rows, steps, layers, units]``
    applied by ``hooks`` (installed); captured steps of ``graphs`` where it allows them."""
    if steps == 0:
        return [[] for _ in range(rows)]
    first_input = first_input.expand(rows, 1)
    tokens = decode_captured(steps_for(model, graphs), prefix, first_input, rows, steps, eos, heads, neurons,
                             hooks=hooks)
    if tokens is None:
        if rows > 1:
            prefix.batch_repeat_interleave(rows)
        return _decode_eager(model, prefix, first_input, eos, [steps] * rows, heads, neurons, hooks=hooks)
    limits = torch.full((rows,), steps, device=tokens.device)
    return [row[:n] for row, n in zip(tokens.tolist(), _lengths(tokens, eos, limits))]


def _decode_eager(model, cache, step_input, eos, limits: list[int], heads=None, neurons=None,
                  attention_mask=None, positions=None, compact: bool = True,
                  hooks: UnitHooks | None = None) -> list[list[int]]:
    """The plain decoding loop: row r stops after ``limits[r]`` tokens or an end-of-sequence token.

    ``heads``/``neurons``: per-step masks, applied by ``hooks`` (installed); None: dense.

    With ``compact``, finished rows leave the batch (their cache rows are dropped), so
    rows of samples with short answers cost nothing once done; without it the cache
    keeps every row to the end. ``attention_mask`` ``[rows, cached]`` and ``positions``
    ``[rows]`` (the next position of each row) are for left-padded rows.
    """
    rows, device = step_input.shape[0], step_input.device
    cached = with_cache(model, cache)  # the cache object stays the same; rows leave it in place
    limit = torch.tensor(limits, device=device)
    tokens = torch.zeros(rows, max(limits), dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)  # batch row -> output row
    # On a GPU, asking which rows have finished waits for the GPU: ask every few steps.
    check_every = 1 if device.type == "cpu" else CHECK_EVERY
    masks = None
    try:
        for step in range(max(limits)):
            if heads is not None:
                if masks is None or masks.rows != len(alive):
                    masks = hooks.masks = StepMasks(len(alive), hooks.layout, device)
                at_step = (heads[:, step], neurons[:, step]) if len(alive) == rows else \
                    (heads[alive, step], neurons[alive, step])
                masks.load(*at_step)
            extra = {}
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], dim=1)
                extra = {"attention_mask": attention_mask, "position_ids": (positions + step).unsqueeze(1)}
            logits = model(input_ids=step_input, **cached, **extra).logits
            step_input = logits[:, -1].argmax(-1, keepdim=True)
            tokens[alive, step] = step_input[:, 0]
            if (step + 1) % check_every and step + 1 < max(limits):
                continue
            ended = torch.isin(tokens[alive, : step + 1], eos).any(1) | (limit[alive] <= step + 1)
            if bool(ended.all()):
                break
            if compact and bool(ended.any()):
                keep = (~ended).nonzero()[:, 0]
                alive, step_input = alive[keep], step_input[keep]
                cache.batch_select_indices(keep)
                if attention_mask is not None:
                    attention_mask, positions = attention_mask[keep], positions[keep]
    finally:
        if hooks is not None:
            hooks.masks = None
    return [row[:n] for row, n in zip(tokens.tolist(), _lengths(tokens, eos, limit))]


@torch.no_grad()
def dense_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_ids,
                   graphs: CapturedSteps | None = None) -> DenseRun:
    """The dense model's greedy output (batch 1), stopping after an end-of-sequence token."""
    return dense_generate_batch(model, [prompt_ids], [max_new_tokens], eos_token_ids, graphs)[0]


@torch.no_grad()
def dense_generate_batch(model, prompts: list[torch.Tensor], max_new_tokens: list[int], eos_token_ids,
                         graphs: CapturedSteps | None = None) -> list[DenseRun]:
    """Dense greedy runs of several prompts in one left-padded batch.

    A batch-1 decoding step reads every weight for one token; a batch of prompts reads
    them once for all. Each run keeps its own rows of the cache, without the padding.
    ``graphs``: the run's captured steps (None: captured for this call only, where allowed).
    """
    device = next(model.parameters()).device
    eos = _eos(eos_token_ids, device)
    # padded on the host and moved in two copies: every copy or wait on the device is a moment in
    # which another thread (building the last batch's records) can hold the GIL
    lengths = torch.tensor([len(p) for p in prompts])
    ids, mask, _ = pad(torch.cat([p.cpu() for p in prompts]), lengths, "left")
    ids, mask = on_device(ids, device), on_device(mask, device)
    width = ids.shape[1]
    prompts = [ids[row, width - len(p):] for row, p in enumerate(prompts)]  # each prompt, on the device
    cache = DynamicCache(config=model.config)
    padded = bool((lengths < width).any())
    if width > 1:
        extra = {"attention_mask": mask[:, :-1], "position_ids": position_ids(mask[:, :-1])} if padded else {}
        model(input_ids=ids[:, :-1], **with_cache(model, cache), **extra)
    captured = None
    graphs = steps_for(model, graphs)
    if DENSE_GRAPHS and graphs.padded_enabled:
        captured = decode_captured_padded(graphs, cached_kv(cache), mask[:, :-1], mask.sum(1) - 1, ids[:, -1:],
                                          max(max_new_tokens), eos)
    if captured is not None:
        tokens, cache = captured
        limits = on_device(max_new_tokens, device)
        rows = [row[:n] for row, n in zip(tokens.tolist(), _lengths(tokens, eos, limits))]
        complete = True
        # the static cache is reused by the next call: the runs share one copy of the columns they use
        used = width - 1 + max(map(len, rows), default=0)
        cache = [(layer.keys[:, :, :used].clone(), layer.values[:, :, :used].clone()) for layer in cache.layers]
    else:
        rows = _decode_eager(model, cache, ids[:, -1:], eos, max_new_tokens, compact=False,
                             attention_mask=mask[:, :-1] if padded else None,
                             positions=mask.sum(1) - 1 if padded else None)
        # a sliding-window layer that dropped columns cannot be cut into rows: recomputed on use
        complete = all(layer.keys.shape[-2] == layer.get_seq_length() for layer in cache.layers)
        cache = [(layer.keys, layer.values) for layer in cache.layers]
    # each run's columns, without its left padding, start at width - len(prompt)
    return [DenseRun(prompt, tokens, cache if complete and len(prompt) - 1 + len(tokens) > 0 else None, row,
                     width - len(prompt)) for row, (prompt, tokens) in enumerate(zip(prompts, rows))]


@dataclass
class _MaskedWork:
    """One sample's rows that switch units off, from the first step where any does."""

    dense: DenseRun
    active: list[int]  # rows (of the sample's rows) that are decoded
    shared: int  # leading steps that are the dense run's in every active row
    heads: torch.Tensor  # [active, T - shared, layers, heads]
    neurons: torch.Tensor


def _masked_works(dense: list[DenseRun], head_keep, neuron_keep) -> list[_MaskedWork]:
    """Each sample's ``_MaskedWork``. Which steps switch nothing off comes to the host in one
    transfer for the whole batch: asking per sample waited for the device twice per sample."""
    heads = [h[:, :len(d.tokens)].to(device=d.prompt_ids.device, dtype=torch.bool) for d, h in zip(dense, head_keep)]
    neurons = [n[:, :len(d.tokens)].to(device=d.prompt_ids.device, dtype=torch.bool) for d, n in zip(dense, neuron_keep)]
    dense_steps = [h.flatten(2).all(2) & n.flatten(2).all(2) for h, n in zip(heads, neurons)]  # [rows, T] each
    if not dense_steps:
        return []
    on_host = torch.cat([step.flatten() for step in dense_steps]).cpu().split([step.numel() for step in dense_steps])
    works = []
    for d, h, n, flat, step in zip(dense, heads, neurons, on_host, dense_steps):
        dense_step = flat.view(step.shape)
        active = (~dense_step.all(1)).nonzero()[:, 0]
        shared = int(dense_step[active].all(0).int().argmin()) if len(active) else len(d.tokens)
        index = on_device(active, h.device)
        works.append(_MaskedWork(d, active.tolist(), shared, h[index, shared:], n[index, shared:]))
    return works


@torch.no_grad()
def masked_after_dense_batch(model, dense: list[DenseRun], head_keep: list[torch.Tensor],
                             neuron_keep: list[torch.Tensor], eos_token_ids,
                             hooks: UnitHooks | None = None,
                             on_queued: Callable[[], None] | None = None,
                             graphs: CapturedSteps | None = None) -> list[list[list[int]]]:
    """Masked greedy outputs of every row of several samples, each at most its dense run's length.

    Per sample, ``head_keep`` ``[rows, steps, layers, heads]`` and ``neuron_keep``
    ``[rows, steps, layers, neurons]`` with ``steps >= len(dense.tokens)``. Steps before the
    first switched-off unit of any row, and rows that never switch a unit off, are the
    dense run's. ``hooks``: the run's ``UnitHooks``; None: installed for this call only. ``graphs``:
    the run's ``CapturedSteps``; None: steps captured for this call only.
    ``on_queued``: called once: after the first group's steps are queued (all but its last few,
    fewer than ``CHECK_EVERY``, may have run by then), from where the host mostly waits for the
    device; before the eager and per-sample paths, which wait step by step; and, with nothing to
    decode or on an error, before returning.

    On a GPU with captured SDPA steps the rows of many samples share each replayed
    step (``_masked_groups_shared``); with captured steps but no SDPA each
    sample decodes on its own; elsewhere one eager batch uses the matrix units better,
    and rows leave the batch as their sample's answer length is reached.
    """
    pending = on_queued

    def once() -> None:
        nonlocal pending
        if pending is not None:
            pending, call = None, pending
            call()

    try:
        with using_hooks(model, hooks) as hooks:
            return _masked_rows(model, dense, head_keep, neuron_keep, eos_token_ids, hooks, once,
                                steps_for(model, graphs))
    finally:
        once()


def _masked_rows(model, dense, head_keep, neuron_keep, eos_token_ids, hooks: UnitHooks,
                 on_queued: Callable[[], None], graphs: CapturedSteps) -> list[list[list[int]]]:
    device = dense[0].prompt_ids.device
    eos = _eos(eos_token_ids, device)
    work = _masked_works(dense, head_keep, neuron_keep)
    outputs = [[list(w.dense.tokens) for _ in range(h.shape[0])] for w, h in zip(work, head_keep)]
    todo = [i for i, w in enumerate(work) if w.active]
    if not todo:
        return outputs
    if MASKED_GROUPS and graphs.padded_enabled and shared_prefix.supports(model):
        try:
            _masked_groups_shared(graphs, work, todo, eos, outputs, hooks, on_queued)
            return outputs
        except Exception as error:  # noqa: BLE001 - whatever fails to capture is decoded without graphs
            graphs.give_up(error)
    on_queued()  # the paths below wait for the device step by step, or run on the CPU
    if graphs.enabled or len(todo) == 1:
        for i in todo:
            w = work[i]
            prefix, first_input = w.dense.prefix(model, w.shared)
            decoded = _decode(model, prefix, first_input, len(w.active), len(w.dense.tokens) - w.shared, eos,
                              w.heads, w.neurons, hooks=hooks, graphs=graphs)
            for row, tokens in zip(w.active, decoded):
                outputs[i][row] = w.dense.tokens[:w.shared] + tokens
        return outputs

    # One batch: each sample's prefix cache, left-padded to the longest and repeated for its rows.
    kv, mask, positions, first = _padded_prefixes(model, [work[i] for i in todo], device)
    cache = _cache_of(model, kv)
    limits = [len(work[i].dense.tokens) - work[i].shared for i in todo for _ in work[i].active]
    heads = torch.cat([_pad_steps(work[i].heads, max(limits)) for i in todo])
    neurons = torch.cat([_pad_steps(work[i].neurons, max(limits)) for i in todo])
    decoded = _decode_eager(model, cache, first, eos, limits, heads, neurons, attention_mask=mask, positions=positions,
                            hooks=hooks)
    rows = iter(decoded)
    for i in todo:
        w = work[i]
        for row in w.active:
            outputs[i][row] = w.dense.tokens[:w.shared] + next(rows)
    return outputs


def _padded_prefixes(model, items: list[_MaskedWork], device):
    """The items' prefix caches left-padded to the longest, each repeated for its active rows.

    Returns per-layer ``(keys, values)`` ``[rows, heads, width, dim]``, the padding mask
    ``[rows, width]``, each row's next position ``[rows]`` and first input ``[rows, 1]``.
    """
    prefixes, firsts = zip(*(w.dense.shared_prefix(model, w.shared) for w in items))
    lengths = [prefix.length for prefix in prefixes]
    layers = [prefix.layers() for prefix in prefixes]
    width = max(lengths)
    counts = [len(w.active) for w in items]
    kv = []
    filled = next((kv for kv in layers if kv), None)
    for layer in range(len(filled) if filled is not None else 0):
        like_keys, like_values = filled[layer]
        parts = []
        for prefix, length, count in zip(layers, lengths, counts):
            if length:
                keys, values = prefix[layer]
            else:  # a one-token prefix: nothing cached
                keys, values = like_keys[:, :, :0], like_values[:, :, :0]
            pad = (0, 0, width - keys.shape[-2], 0)
            parts.append((F.pad(keys, pad).expand(count, -1, -1, -1), F.pad(values, pad).expand(count, -1, -1, -1)))
        kv.append((torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])))
    mask = torch.cat([torch.cat([torch.zeros(count, width - length, dtype=torch.long, device=device),
                                 torch.ones(count, length, dtype=torch.long, device=device)], 1)
                      for length, count in zip(lengths, counts)])
    positions = torch.cat([torch.full((count,), length, device=device) for length, count in zip(lengths, counts)])
    first = torch.cat([first_input.expand(count, 1) for first_input, count in zip(firsts, counts)])
    return kv, mask, positions, first


def _group_samples(model, layout, rows: int, width: int, steps: int) -> int:
    """Samples per shared-prefix group: as many as ``GROUP_KV_BYTES`` hold (cache and step masks)
    and at most ``GROUP_MAX_ROWS`` rows."""
    layers, heads, kv_heads, head_dim = kv_geometry(model.config)
    cache = 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size() * (width + rows * steps)
    masks = rows * steps * layers * (layout.num_heads + layout.num_neurons)  # bool
    budget = GROUP_KV_BYTES
    if torch.cuda.is_available():
        budget = min(budget, torch.cuda.mem_get_info()[0] // 4)
    return max(1, min(GROUP_MAX_ROWS // rows, budget // (cache + masks)))


def _masked_groups_shared(graphs: CapturedSteps, work: list[_MaskedWork], todo: list[int], eos, outputs,
                          hooks: UnitHooks, on_queued: Callable[[], None]) -> None:
    """Decode the masked rows of the samples ``todo``, many samples per step, each sample's
    prefix read once per step (``shared_prefix.py``); ``on_queued`` is called once the first
    group's steps are queued.

    All groups of a call have one shape (samples x rows, prefix width, steps), so one
    captured step serves them: a sample with fewer active rows, and a group with fewer
    samples, leave rows that decode with nothing switched off and are dropped.
    """
    model = graphs.model
    prefixes = {i: work[i].dense.shared_prefix(model, work[i].shared) for i in todo}
    lengths = {i: prefixes[i][0].length for i in todo}
    left = {i: len(work[i].dense.tokens) - work[i].shared for i in todo}  # steps to decode
    rows = max(len(work[i].active) for i in todo)
    width = padded_capacity(max(lengths.values()))
    steps = -(-max(left.values()) // 8) * 8
    # samples of similar prefix length and steps share a group: fewer wasted steps
    order = sorted(todo, key=lambda i: (left[i], lengths[i]))
    count = -(-len(order) // _group_samples(model, hooks.layout, rows, width, steps))
    decoder = decoder_for(graphs, -(-len(order) // count), rows, width, steps, hooks.layout, todo=len(order))
    samples = decoder.cache.samples  # a kept decoder's group size may differ
    device = work[todo[0]].dense.prompt_ids.device

    def per_row(values: list[torch.Tensor], fill) -> torch.Tensor:
        """Each sample's block padded to ``rows`` rows, and the group to ``samples`` blocks."""
        blocks = [torch.cat([v, v.new_full((rows - len(v), *v.shape[1:]), fill)]) for v in values]
        blocks += [blocks[0].new_full(blocks[0].shape, fill)] * (samples - len(values))
        return torch.cat(blocks)

    # Every group is queued before any group's tokens are read: the host prepares group g + 1 while the
    # device runs group g's last steps (the groups share the decoder's buffers, in stream order).
    queued = []  # (group, tokens, limits)
    for start in range(0, len(order), samples):
        group = order[start:start + samples]
        group_steps = max(left[i] for i in group)
        heads = per_row([_pad_steps(work[i].heads, group_steps) for i in group], True)
        neurons = per_row([_pad_steps(work[i].neurons, group_steps) for i in group], True)
        first = per_row([prefixes[i][1].expand(len(work[i].active), 1) for i in group], 0)
        positions = per_row([torch.full((len(work[i].active),), lengths[i], device=device) for i in group], 0)
        limits = per_row([torch.full((len(work[i].active),), left[i], device=device) for i in group], 0)
        tokens = decoder.decode([prefixes[i][0] for i in group], first, positions, group_steps, eos,
                                heads, neurons, hooks)
        queued.append((group, tokens, limits))
        if start == 0:
            on_queued()
    for group, tokens, limits in queued:
        decoded = [row[:n] for row, n in zip(tokens.tolist(), _lengths(tokens, eos, limits))]
        for slot, i in enumerate(group):
            w = work[i]
            for k, row in enumerate(w.active):
                outputs[i][row] = w.dense.tokens[:w.shared] + decoded[slot * rows + k]


@torch.no_grad()
def greedy_generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    head_keep: torch.Tensor | None = None,
    neuron_keep: torch.Tensor | None = None,
    hooks: UnitHooks | None = None,
    graphs: CapturedSteps | None = None,
) -> list[list[int]]:
    """Generate greedily from one prompt, once per mask row.

    Args:
        prompt_ids: 1-D prompt token ids.
        max_new_tokens: at most this many tokens per row.
        eos_token_ids: generation of a row stops after any of these (it is kept).
        head_keep: ``[rows, steps, layers, heads]`` 0/1 keep masks (or None: dense, one row).
        neuron_keep: ``[rows, steps, layers, neurons]``.
        hooks: the ``UnitHooks`` that apply the masks; None: installed for this call only.
        graphs: the ``CapturedSteps`` to decode with and keep; None: captured for this call only.

    Returns: one list of generated token ids per row.
    """
    if head_keep is None:
        return [dense_generate(model, prompt_ids, max_new_tokens, eos_token_ids, graphs).tokens]
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    heads, neurons = (_pad_steps(keep.to(device=device, dtype=torch.bool), max_new_tokens)  # steps without a mask are dense
                      for keep in (head_keep, neuron_keep))
    with using_hooks(model, hooks) as hooks:
        return _decode(model, _encode(model, prompt_ids[:-1]), prompt_ids[-1:].view(1, 1), head_keep.shape[0],
                       max_new_tokens, _eos(eos_token_ids, device), heads, neurons, hooks=hooks, graphs=graphs)


def masked_generate(model, prompt_ids, head_keep, neuron_keep, eos_token_ids, max_new_tokens=None, hooks=None,
                    graphs=None):
    """Masked greedy generation from given keep masks (library entry point).

    ``head_keep`` ``[steps, layers, heads]`` or ``[rows, steps, layers, heads]``, likewise
    ``neuron_keep``; generates at most ``steps`` tokens (or ``max_new_tokens``).
    ``hooks``: a ``UnitHooks`` of ``model`` to reuse; None: installed for this call only.
    ``graphs``: a ``CapturedSteps`` of ``model`` to reuse; None: captured for this call only.
    Returns a list of token-id lists, one per row.
    """
    if head_keep.dim() == 3:
        head_keep, neuron_keep = head_keep.unsqueeze(0), neuron_keep.unsqueeze(0)
    steps = head_keep.shape[1] if max_new_tokens is None else max_new_tokens
    return greedy_generate(model, prompt_ids, steps, list(eos_token_ids), head_keep, neuron_keep, hooks, graphs)
