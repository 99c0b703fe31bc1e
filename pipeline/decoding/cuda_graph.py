"""One decoding step captured as a CUDA graph and replayed for every step.

A decoding step of a small model at batch ~64 is bound by Python and kernel launches,
not by the GPU: Phi-2 spends ~30 ms per step on the host for ~1.3 ms of memory
traffic. A captured graph replays the step's kernels without Python. What changes
between steps lives in fixed buffers the graph reads: the input token, the keep masks
(``StepMasks``) and a static KV cache whose length counter is a tensor the model's
cache update advances inside the graph.

Used only on CUDA, for models whose cache has no sliding-window layers (their update
keeps Python-side state a graph cannot replay); anything that fails to capture falls
back to the ordinary loop with one warning. A captured step is kept per (rows,
masked) and re-captured only when a longer cache is needed.
"""

from __future__ import annotations

import warnings

import torch

from pipeline.hooks import StepMasks, UnitHooks
from pipeline.models.inputs import with_cache

_POOL = None  # one memory pool shared by all captured graphs
CHECK_EVERY = 8  # steps between "has every row finished?" checks on a GPU (each waits for it)


class CapturedDecoder:
    """A static cache of ``capacity`` positions for ``rows`` rows and one captured step."""

    def __init__(self, model, rows: int, capacity: int, masked: bool, hooks: UnitHooks | None = None):
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

    def _start(self, kv, first_input: torch.Tensor) -> None:
        """Empty the cache, write the shared prefix into every row, set the first input."""
        self.cache.reset()
        for layer, (keys, values) in enumerate(kv):
            self.cache.update(keys.expand(self.rows, -1, -1, -1), values.expand(self.rows, -1, -1, -1), layer)
        self.input_ids.copy_(first_input)

    def _step(self, hooks: UnitHooks | None) -> None:
        """One step; masked, ``hooks`` (installed) multiply by ``self.masks``: the capture records that."""
        if hooks is not None:
            hooks.masks = self.masks
        try:
            logits = self.model(input_ids=self.input_ids, **self.cached).logits[:, -1]
            self.next_token.copy_(logits.argmax(-1))
            self.input_ids.copy_(self.next_token.unsqueeze(-1))
        finally:
            if hooks is not None:
                hooks.masks = None

    def _capture(self, kv, first_input, heads, neurons, hooks) -> None:
        global _POOL
        # Warm up on a side stream (library handles, workspaces), as CUDA graph capture requires.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if self.masks is not None:
                self.masks.load(heads[:, 0], neurons[:, 0])
            self._step(hooks)
        torch.cuda.current_stream().wait_stream(stream)
        self._start(kv, first_input)  # the warm-up step wrote into the cache
        _POOL = _POOL or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_POOL):
            self._step(hooks)
        self.graph = graph

    def decode(self, kv, first_input, steps: int, eos: torch.Tensor, heads=None, neurons=None,
               hooks: UnitHooks | None = None) -> torch.Tensor:
        """Tokens ``[rows, <= steps]``; masks ``[rows, steps, layers, units]`` when masked, which ``hooks``
        (installed) apply while the step is captured."""
        self._start(kv, first_input)
        if self.graph is None:
            self._capture(kv, first_input, heads, neurons, hooks)
        tokens = torch.zeros(self.rows, steps, dtype=torch.long, device=self.input_ids.device)
        for step in range(steps):
            if self.masks is not None:
                self.masks.load(heads[:, step], neurons[:, step])
            self.graph.replay()
            tokens[:, step] = self.next_token
            if len(eos) and (step + 1) % CHECK_EVERY == 0 and bool(torch.isin(tokens[:, : step + 1], eos).any(1).all()):
                return tokens[:, : step + 1]
        return tokens


def graphs_enabled(model) -> bool:
    """Whether decoding steps of ``model`` are captured: on CUDA, until a capture has failed."""
    return next(model.parameters()).device.type == "cuda" and not getattr(model, "_sparseact_no_graphs", False)


def decode_captured(model, prefix, first_input, rows: int, steps: int, eos, heads=None, neurons=None,
                    hooks: UnitHooks | None = None):
    """``CapturedDecoder.decode`` with the model's decoder, or None where graphs are not used."""
    if not graphs_enabled(model):
        return None
    masked = heads is not None
    kv = [(layer.keys, layer.values) for layer in prefix.layers if getattr(layer, "keys", None) is not None
          and layer.keys.numel()]  # batch 1; empty for a one-token prompt
    positions = prefix.get_seq_length() + steps
    decoders = model.__dict__.setdefault("_sparseact_decoders", {})
    decoder = decoders.get((rows, masked))
    try:
        if decoder is None or decoder.capacity < positions:
            decoders.pop((rows, masked), None)
            capacity = 64
            while capacity < positions:
                capacity *= 2
            decoder = decoders[(rows, masked)] = CapturedDecoder(model, rows, capacity, masked, hooks)
        return decoder.decode(kv, first_input, steps, eos, heads, neurons, hooks)
    except Exception as error:  # noqa: BLE001 - whatever fails to capture is decoded without graphs
        warnings.warn(f"decoding without CUDA graphs for this model ({type(error).__name__}: {error})", stacklevel=2)
        model._sparseact_no_graphs = True
        model.__dict__.pop("_sparseact_decoders", None)
        torch.cuda.synchronize()
        return None
