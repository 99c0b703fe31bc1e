"""Masked rows of many samples in one captured step, each sample's prefix read once.

The masked rows of a sample share everything before their first masked step: the
prompt and the dense tokens before it (``generation._MaskedWork``). A padded step
(``cuda_graph.decode_captured_padded``) gives every row its own copy of that prefix,
and attention reads all the copies: at Phi-2 shape 640 rows x 128 cache columns are
27 GB per step, and a prefill attention kernel run for one query per row took 58% of
the step (benchmarks/RESULTS.md, session 3).

Here the rows of a sample are the *queries of one attention call*. Each sample owns one
run of cache columns: its prefix, then one column per row and step, step by step::

    sample s:  [ prefix (width) | step 0: rows 0..R-1 | step 1: rows 0..R-1 | ... ]

so a step writes one contiguous block of columns per sample (``index_copy_``), and a
boolean mask lets row r's query see the prefix and its own columns only. That is
the attention each row would compute alone (same keys, same values, the rest weighted
zero), computed by the model's SDPA kernel over ``[samples, kv heads, R x group, columns]``:
the prefix is read once per sample and step instead of once per row.

The model keeps its own code: its attention modules project, rotate and hand this
step's key and value to the function registered below (``AttentionInterface``), which
writes them into the sample's columns and attends. The group's ``SharedPrefixCache`` is
passed explicitly, as a keyword argument of the model call that transformers hands down
to the attention function; the model is called without a cache of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.decoding.cuda_graph import CapturedSteps, capture, replay_steps
from pipeline.device import on_device
from pipeline.hooks import StepMasks, UnitHooks
from pipeline.models.inputs import attention_implementation, forward_arguments

IMPLEMENTATION = "sparseact_shared_prefix"
# Attention kernels of the captured step, in PyTorch's order of preference; not cuDNN's. With it a step
# was 5% faster (30.5 against 31.9 ms, Phi-2 shape, 1440 rows, H200), whole warm runs equal, but the
# first capture of a process took ~1 s longer (loading cuDNN, building a plan): cold Phi-2-shape runs
# 26.0 samples/s with it, 28.9 without (benchmarks/RESULTS.md, session 5).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def kv_geometry(config) -> tuple[int, int, int, int]:
    """``(layers, query heads, key/value heads, head dim)`` of a model's attention."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, kv_heads, head_dim


def supports(model) -> bool:
    """Whether the shared-prefix step computes this model's attention: SDPA, and no sliding-window
    layer (the step attends to every column of a sample; a window would drop early ones)."""
    from transformers import DynamicCache

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    return not any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers)


@dataclass
class Prefix:
    """A sample's prefix: columns ``[first, first + length)`` of row ``row`` of per-layer ``(keys, values)``
    ``[runs, kv heads, columns, dim]``, typically the cache of the batch whose dense runs made it."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # empty for a one-token prompt (nothing cached)
    row: int = 0
    first: int = 0
    length: int = 0

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix alone: per layer ``(keys, values)`` ``[1, kv heads, length, dim]`` (empty if length 0)."""
        row, columns = slice(self.row, self.row + 1), slice(self.first, self.first + self.length)
        return [(keys[row, :, columns], values[row, :, columns]) for keys, values in self.kv] if self.length else []


class SharedPrefixCache:
    """Keys and values of a group of ``samples`` samples with ``rows`` rows each.

    Per layer ``[samples, kv heads, width + steps * rows, head dim]``, row r's key at step t in
    column ``width + t * rows + r``; ``visible`` ``[samples, rows, group, columns]`` (group =
    query heads per key/value head) is the attention mask, as the 4-D
    ``[samples, 1, rows * group, columns]`` the kernel takes. Row ``s * rows + r`` of the
    model's batch is row r of sample s.
    """

    def __init__(self, config, samples: int, rows: int, width: int, steps: int, dtype, device):
        layers, heads, kv_heads, head_dim = kv_geometry(config)
        self.samples, self.rows, self.width, self.steps = samples, rows, width, steps
        self.group = heads // kv_heads
        columns = width + rows * steps
        shape = (samples, kv_heads, columns, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.visible = torch.zeros(samples, rows, self.group, columns, dtype=torch.bool, device=device)
        self.mask = self.visible.view(samples, 1, rows * self.group, columns)
        self._sample = torch.arange(samples, device=device)
        self._slot = torch.arange(rows, device=device)
        self._group_head = torch.arange(self.group, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)  # a Python True would be copied from the host
        self._first_columns = width + self._slot
        self.columns = self._first_columns.clone()  # [rows]: the column row r of every sample writes at this step

    def start(self, prefixes: list[Prefix]) -> None:
        """Sample s's prefix is ``prefixes[s]`` (fewer prefixes than samples leave slots empty).

        Samples whose prefixes come from the same tensors (a batch's cache) are gathered in one
        indexing per layer: copying each sample's layers one by one took ~4000 copies per group
        at Phi-2 shape. A gathered row reads columns past its prefix too (the last prefix
        column again, a finite value): they stay invisible, so they get no weight.
        """
        device = self.visible.device
        lengths = on_device([p.length for p in prefixes] + [0] * (self.samples - len(prefixes)), device)
        self.visible.zero_()
        self.visible[..., :self.width] = (torch.arange(self.width, device=device) < lengths[:, None])[:, None, None]
        sources = {}  # id of the source tensors -> (source, samples)
        for sample, prefix in enumerate(prefixes):
            if prefix.length:
                sources.setdefault(id(prefix.kv), (prefix.kv, []))[1].append((sample, prefix))
        for kv, members in sources.values():
            samples = on_device([sample for sample, _ in members], device)
            rows = on_device([p.row for _, p in members], device)
            width = max(p.length for _, p in members)
            offsets = torch.arange(width)
            columns = on_device(torch.stack([p.first + offsets.clamp(max=p.length - 1) for _, p in members]), device)
            for layer, (keys, values) in enumerate(kv):
                for cache, source in ((self.keys[layer], keys), (self.values[layer], values)):
                    # [samples, width, kv heads, dim] (indexed dimensions first), stored heads first
                    cache[samples, :, :width] = source[rows[:, None], :, columns].transpose(1, 2)
        self.columns.copy_(self._first_columns)

    def open_columns(self) -> None:
        """Each row sees the column it writes at this step (before the step)."""
        where = (self._sample[:, None, None], self._slot[None, :, None], self._group_head[None, None, :],
                 self.columns[None, :, None])
        self.visible.index_put_(where, self._true)

    def advance(self) -> None:
        self.columns.add_(self.rows)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Store this step's ``key``/``value`` ``[batch rows, kv heads, 1, dim]`` and attend with
        ``query`` ``[batch rows, heads, 1, dim]``; returns ``[batch rows, 1, heads, dim]``."""
        samples, rows, group = self.samples, self.rows, self.group
        for cache, new in ((self.keys[layer], key), (self.values[layer], value)):
            cache.index_copy_(2, self.columns, new[:, :, -1].view(samples, rows, new.shape[1], -1).transpose(1, 2))
        heads, dim = query.shape[1], query.shape[-1]
        # query head h reads key/value head h // group, as transformers' repeat_kv pairs them
        queries = query.reshape(samples, rows, -1, group, dim).transpose(1, 2).reshape(samples, -1, rows * group, dim)
        out = F.scaled_dot_product_attention(queries, self.keys[layer], self.values[layer], attn_mask=mask,
                                             scale=scaling)
        return out.view(samples, -1, rows, group, dim).transpose(1, 2).reshape(samples * rows, 1, heads, dim)


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix: SharedPrefixCache | None = None, **kwargs):
    if shared_prefix is None:
        raise RuntimeError(f"{type(module).__name__} did not pass shared_prefix to its attention function")
    return shared_prefix.attend(module.layer_idx, query, key, value, attention_mask, scaling), None


AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # unused: the step passes its own 4-D mask


class SharedPrefixDecoder:
    """Greedy masked steps of ``samples`` x ``rows`` rows over a ``SharedPrefixCache``.

    The step is captured once (``capture``), at the first ``decode``, and replayed.
    """

    def __init__(self, model, samples: int, rows: int, width: int, steps: int, layout):
        if not supports(model):
            raise NotImplementedError("the shared-prefix step needs SDPA attention without sliding windows")
        parameter = next(model.parameters())
        device = parameter.device
        self.model = model
        self.cache = SharedPrefixCache(model.config, samples, rows, width, steps, parameter.dtype, device)
        batch = samples * rows
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.next_token = torch.zeros(batch, dtype=torch.long, device=device)
        self.masks = StepMasks(batch, layout, device)
        keep = forward_arguments(model)[1]
        self._arguments = {"use_cache": False, **({keep: 1} if keep else {})}
        self.graph: torch.cuda.CUDAGraph | None = None

    def _start(self, prefixes, first_input: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache.start(prefixes)
        self.input_ids.copy_(first_input)
        self.position_ids.copy_(positions.view(-1, 1))

    def _step(self, hooks: UnitHooks) -> None:
        """One step; ``hooks`` (installed) multiply by ``self.masks``: a capture records that."""
        hooks.masks = self.masks
        try:
            self.cache.open_columns()
            with attention_implementation(self.model, IMPLEMENTATION):
                logits = self.model(input_ids=self.input_ids, position_ids=self.position_ids,
                                    attention_mask=self.cache.mask, shared_prefix=self.cache,
                                    **self._arguments).logits[:, -1]
            self.next_token.copy_(logits.argmax(-1))
            self.input_ids.copy_(self.next_token.unsqueeze(-1))
            self.cache.advance()
            self.position_ids.add_(1)
        finally:
            hooks.masks = None

    def _capture(self, prefixes, first_input, positions, heads, neurons, hooks: UnitHooks) -> None:
        def reset():  # the warm-up step wrote a column and moved the counters
            self._start(prefixes, first_input, positions)

        self.masks.load(heads[:, 0], neurons[:, 0])
        with sdpa_kernel(ATTENTION_BACKENDS):
            self.graph = capture(lambda: self._step(hooks), reset)

    def decode(self, prefixes, first_input: torch.Tensor, positions: torch.Tensor, steps: int,
               eos: torch.Tensor, heads: torch.Tensor, neurons: torch.Tensor, hooks: UnitHooks) -> torch.Tensor:
        """Tokens ``[samples * rows, <= steps]``.

        ``prefixes``: per sample its ``Prefix`` (fewer samples than the group holds leave slots empty); ``first_input`` ``[batch, 1]``,
        ``positions`` ``[batch]`` (each row's first position), masks ``[batch, steps, layers, units]``
        that ``hooks`` (installed) apply.
        """
        if steps > self.cache.steps:
            raise ValueError(f"{steps} steps do not fit the group's {self.cache.steps} columns per row")
        self._start(prefixes, first_input, positions)
        if self.graph is None:
            self._capture(prefixes, first_input, positions, heads, neurons, hooks)
        return replay_steps(self.graph.replay, self.next_token, self.masks, heads, neurons, steps, eos)


DECODERS_KEPT = 2  # a group's cache is large: keep the most recently used few


def decoder_for(graphs: CapturedSteps, samples: int, rows: int, width: int, steps: int, layout,
                todo: int | None = None) -> SharedPrefixDecoder:
    """The decoder of ``graphs`` of this group shape (made, and captured at its first use, once), or a kept
    one of as many rows with room for as wide a prefix and as many steps, up to twice as many (the
    extra columns stay invisible, and a capture costs more than they do).

    A kept decoder of another group size serves ``todo`` samples too (the caller groups by the
    decoder's ``samples``) when it needs no more groups than ``samples`` would, its groups hold
    at most a quarter more sample slots, and it is at most twice as large (a group's masks grow
    with it). The group size follows the device's free memory, which moves from batch to batch
    (the kept decoder's own cache counts as used), and each new size is a capture with its own
    memory pool."""
    todo = todo or samples
    groups = lambda size: -(-todo // size)  # noqa: E731

    def fits(key) -> bool:
        kept = key[1]
        return (key[2] == rows and width <= key[3] <= 2 * width and steps <= key[4] <= 2 * steps
                and kept <= 2 * samples and groups(kept) <= groups(samples)
                and 4 * groups(kept) * kept <= 5 * groups(samples) * samples)

    return graphs.recent(("shared", samples, rows, width, steps), DECODERS_KEPT,
                         lambda: SharedPrefixDecoder(graphs.model, samples, rows, width, steps, layout), fits=fits)
