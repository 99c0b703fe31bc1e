"""One decoding step captured as a CUDA graph and replayed for every step.

A decoding step of a small model at batch ~64 is bound by Python and kernel launches,
not by the GPU: Phi-2 spends ~30 ms per step on the host for ~1.3 ms of memory
traffic. A captured graph replays the step's kernels without Python. What changes
between steps lives in fixed buffers the graph reads: the input token, the keep masks
(``StepMasks``) and a static KV cache whose length counter is a tensor the model's
cache update advances inside the graph.

Used only on CUDA, for models whose cache has no sliding-window layers (their update
keeps Python-side state a graph cannot replay); anything that fails to capture falls
back to the ordinary loop with one warning. Captured steps are kept in a ``CapturedSteps``
that the caller passes explicitly (one per run); a step is kept per (rows, masked) and
re-captured only when a longer cache is needed.

Rows with different prefixes (a batch of dense runs) decode through a *padded* step
(``decode_captured_padded``): each row's prefix is left-padded into the static cache,
and the step reads a 4-D boolean attention mask and per-row position ids from fixed
buffers that the graph itself advances, so the padding never enters attention. The
masked rows of many samples have a step of their own (``shared_prefix.py``), captured
and replayed by ``capture`` and ``replay_steps`` below.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.hooks import StepMasks, UnitHooks
from pipeline.models.inputs import with_cache

# Attention kernels a captured step of this module may use, in PyTorch's order of preference.
# Not cuDNN's: with a one-query step and a mask it ran a prefill kernel at half its bandwidth,
# and each new shape costs a plan (Phi-2 shape, 256 questions, H200: 29.3 samples/s without,
# 27.1 with; SmolLM2 shape 53.1 vs 46.6; benchmarks/RESULTS.md, session 4).
CAPTURE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CHECK_EVERY = 8  # steps between "has every row finished?" checks on a GPU (each waits for it)


class CapturedDecoder:
    """A static cache of ``capacity`` positions for ``rows`` rows and one captured step."""

    def __init__(self, model, rows: int, capacity: int, masked: bool, hooks: UnitHooks | None = None,
                 padded: bool = False):
        from transformers import StaticCache

        self.model, self.rows, self.capacity = model, rows, capacity
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise NotImplementedError("sliding-window cache layers")
        self.cached = with_cache(model, self.cache)
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.next_token = torch.zeros(rows, dtype=torch.long, device=device)
        self.masks = StepMasks(rows, hooks.layout, device) if masked else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.padded = padded
        if padded:  # which cache columns each row attends to, its next position, the column being written
            self.attention = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
            self.position_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
            self.column = torch.zeros(1, dtype=torch.long, device=device)

    def _start(self, kv, first_input: torch.Tensor, prefix_mask=None, positions=None) -> None:
        """Empty the cache, write the prefix into every row, set the first input.

        Unpadded: ``kv`` holds one batch-1 prefix shared by all rows. Padded: ``kv`` holds
        ``[rows, heads, width, dim]`` left-padded prefixes, ``prefix_mask`` ``[rows, width]``
        marks their real columns and ``positions`` ``[rows]`` is each first input's position.
        """
        self.cache.reset()
        for layer, (keys, values) in enumerate(kv):
            self.cache.update(keys.expand(self.rows, -1, -1, -1), values.expand(self.rows, -1, -1, -1), layer)
        self.input_ids.copy_(first_input)
        if self.padded:
            width = prefix_mask.shape[1]
            self.attention.zero_()
            self.attention[:, 0, 0, :width] = prefix_mask.bool()
            self.column.fill_(width)
            self.position_ids.copy_(positions.view(-1, 1))

    def _step(self, hooks: UnitHooks | None) -> None:
        """One step; masked, ``hooks`` (installed) multiply by ``self.masks``: the capture records that."""
        if hooks is not None:
            hooks.masks = self.masks
        try:
            extra = {}
            if self.padded:  # the column this step writes becomes visible to its own row
                self.attention.index_fill_(3, self.column, True)
                extra = {"attention_mask": self.attention, "position_ids": self.position_ids}
            logits = self.model(input_ids=self.input_ids, **self.cached, **extra).logits[:, -1]
            self.next_token.copy_(logits.argmax(-1))
            self.input_ids.copy_(self.next_token.unsqueeze(-1))
            if self.padded:
                self.column.add_(1)
                self.position_ids.add_(1)
        finally:
            if hooks is not None:
                hooks.masks = None

    def _capture(self, kv, first_input, heads, neurons, hooks, prefix_mask=None, positions=None) -> None:
        if self.masks is not None:
            self.masks.load(heads[:, 0], neurons[:, 0])
        with sdpa_kernel(CAPTURE_BACKENDS):
            self.graph = capture(lambda: self._step(hooks),
                                 lambda: self._start(kv, first_input, prefix_mask, positions))  # undo the warm-up

    def decode(self, kv, first_input, steps: int, eos: torch.Tensor, heads=None, neurons=None,
               hooks: UnitHooks | None = None, prefix_mask=None, positions=None) -> torch.Tensor:
        """Tokens ``[rows, <= steps]``; masks ``[rows, steps, layers, units]`` when masked, which ``hooks``
        (installed) apply while the step is captured."""
        self._start(kv, first_input, prefix_mask, positions)
        if self.graph is None:
            self._capture(kv, first_input, heads, neurons, hooks, prefix_mask, positions)
        return replay_steps(self.graph.replay, self.next_token, self.masks, heads, neurons, steps, eos)


def capture(step, reset) -> torch.cuda.CUDAGraph:
    """``step`` (a callable writing only into fixed buffers) captured as a CUDA graph.

    It is called once first on a side stream (library handles and workspaces are created
    outside the capture, as CUDA graph capture requires); ``reset`` then undoes what that
    warm-up call wrote, before the call that is captured. Each graph has its own memory
    pool: a pool shared by all graphs failed an allocator assertion on the next capture
    once every graph of it had been freed (decoders are dropped and replaced).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def replay_steps(replay, next_token: torch.Tensor, masks: StepMasks | None, heads, neurons, steps: int,
                 eos: torch.Tensor) -> torch.Tensor:
    """Tokens ``[rows, <= steps]`` of ``steps`` calls of ``replay``, each writing ``next_token``;
    ``masks`` (None: dense) is loaded with each step's ``heads``/``neurons`` first. Stops early,
    checked every ``CHECK_EVERY`` steps, once every row has produced an end-of-sequence token.

    Returns without waiting for the last steps (a check after the last step would stop nothing):
    the caller may queue more work before it needs the tokens."""
    tokens = torch.zeros(next_token.shape[0], steps, dtype=torch.long, device=next_token.device)
    for step in range(steps):
        if masks is not None:
            masks.load(heads[:, step], neurons[:, step])
        replay()
        tokens[:, step] = next_token
        if (len(eos) and (step + 1) % CHECK_EVERY == 0 and step + 1 < steps
                and bool(torch.isin(tokens[:, : step + 1], eos).any(1).all())):
            return tokens[:, : step + 1]
    return tokens


def cached_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of a filled cache; empty for a one-token prompt (nothing cached)."""
    return [(layer.keys, layer.values) for layer in cache.layers
            if getattr(layer, "keys", None) is not None and layer.keys.numel()]


class CapturedSteps:
    """The captured decoding steps of one model, kept from one call to the next: passed
    explicitly, like the run's ``UnitHooks`` (one per run, for calibration and every batch).

    A decoder is made and captured at its first use; of each kind (``key[0]``) only the few most
    recently used stay, as their static caches are large. After a capture fails, every call given
    this object decodes without graphs, with one warning. Off the GPU nothing is captured.
    """

    def __init__(self, model):
        self.model = model
        self.decoders: dict[tuple, object] = {}  # by key, least recently used first
        self.failed = False

    @property
    def enabled(self) -> bool:
        """Whether decoding steps are captured: on CUDA, until a capture has failed."""
        return next(self.model.parameters()).device.type == "cuda" and not self.failed

    @property
    def padded_enabled(self) -> bool:
        """Whether rows of different prefixes decode through captured padded steps.

        The padded step hands the model a ready 4-D boolean mask, which the SDPA attention
        takes as it is; other attention implementations keep the ordinary loop.
        """
        return self.enabled and getattr(self.model.config, "_attn_implementation", None) == "sdpa"

    def recent(self, key: tuple, kept: int, make, fits=None):
        """The decoder under ``key``, made by ``make()`` if missing; ``kept``: how many of its kind
        stay. ``fits(other_key)``: whether a kept decoder of another key serves too (e.g. a longer
        cache); the most recently used such one is taken, so a new batch's shape need not capture
        a step again."""
        decoders = self.decoders
        if key not in decoders and fits is not None:
            key = next((k for k in reversed(decoders) if k[0] == key[0] and fits(k)), key)
        decoder = decoders.pop(key, None)  # put back last: dicts keep insertion order, oldest first
        if decoder is None:
            for old in [k for k in decoders if k[0] == key[0]][: -kept + 1 or None]:
                del decoders[old]
            decoder = make()
        decoders[key] = decoder
        return decoder

    def give_up(self, error: Exception) -> None:
        """After a failed capture: warn once, and decode without graphs through this object from now on."""
        warnings.warn(f"decoding without CUDA graphs ({type(error).__name__}: {error})", stacklevel=3)
        self.failed = True
        self.decoders.clear()
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def steps_for(model, graphs: CapturedSteps | None) -> CapturedSteps:
    """``graphs``, or for a call given none, steps captured for that call only."""
    if graphs is None:
        return CapturedSteps(model)
    if graphs.model is not model:  # its decoders would run the other model's weights
        raise ValueError("the CapturedSteps passed belong to another model")
    return graphs


def padded_capacity(positions: int) -> int:
    """Static cache length of a padded decoder: ``positions`` rounded up to a multiple of 64."""
    return -(-positions // 64) * 64


def decode_captured(graphs: CapturedSteps, prefix, first_input, rows: int, steps: int, eos, heads=None, neurons=None,
                    hooks: UnitHooks | None = None):
    """``CapturedDecoder.decode`` with a decoder of ``graphs``, or None where graphs are not used."""
    if not graphs.enabled:
        return None
    masked = heads is not None
    kv = cached_kv(prefix)  # batch 1
    positions = prefix.get_seq_length() + steps
    try:
        decoder = graphs.decoders.get((rows, masked))
        if decoder is None or decoder.capacity < positions:
            graphs.decoders.pop((rows, masked), None)
            capacity = 64
            while capacity < positions:
                capacity *= 2
            decoder = graphs.decoders[(rows, masked)] = CapturedDecoder(graphs.model, rows, capacity, masked, hooks)
        return decoder.decode(kv, first_input, steps, eos, heads, neurons, hooks)
    except Exception as error:  # noqa: BLE001 - whatever fails to capture is decoded without graphs
        graphs.give_up(error)
        return None


PADDED_DECODERS_KEPT = 2  # padded decoders hold large caches: keep the most recent few


def decode_captured_padded(graphs: CapturedSteps, kv, prefix_mask: torch.Tensor, positions: torch.Tensor,
                           first_input: torch.Tensor, steps: int, eos, heads=None, neurons=None,
                           hooks: UnitHooks | None = None):
    """Greedy steps for rows with their own left-padded prefixes, or None where not captured.

    ``kv``: per layer ``(keys, values)`` ``[rows, heads, width, dim]`` (empty list for width 0);
    ``prefix_mask`` ``[rows, width]``; ``positions`` ``[rows]``: the position of each row's
    first input ``[rows, 1]``. Returns ``(tokens [rows, <= steps], static cache)``: cache column
    ``width + s`` holds the input of step s, as columns of a plain cache would.
    """
    if not graphs.padded_enabled:
        return None
    rows, width = first_input.shape[0], prefix_mask.shape[1]
    masked = heads is not None
    capacity = padded_capacity(width + steps)
    try:
        # a kept decoder with a longer cache (up to twice as long) serves too: its extra columns stay
        # invisible, and attending over them costs less than a new capture
        decoder = graphs.recent(("padded", rows, masked, capacity), PADDED_DECODERS_KEPT,
                                lambda: CapturedDecoder(graphs.model, rows, capacity, masked, hooks, padded=True),
                                fits=lambda key: key[1:3] == (rows, masked) and capacity <= key[3] <= 2 * capacity)
        return decoder.decode(kv, first_input, steps, eos, heads, neurons, hooks, prefix_mask, positions), decoder.cache
    except Exception as error:  # noqa: BLE001 - whatever fails to capture is decoded without graphs
        graphs.give_up(error)
        return None
