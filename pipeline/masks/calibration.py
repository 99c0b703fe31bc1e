"""Calibrated allocation: per-layer levels from a greedy search on calibration rows (TEAL's recipe).

Start with every layer dense; at each step raise the level of the one layer whose
increase costs the least loss per unit of sparsity gained; record each step. One
greedy path gives the per-layer levels of every ``p``: the first state on the path
whose parameter-weighted sparsity (docs/protocol.md §5.2) reaches ``p``.

* **Loss.** Mean KL(dense || masked) of the next-token distributions over the
  calibration rows' generated positions, teacher-forced on the dense greedy
  continuation, with every position masked by the score at that position (as the
  protocol masks each decoding step by its own token's scores). The rows are the ones
  right after the evaluated slice, so calibration never sees an evaluated question.
* **Why a table.** The loss of raising layer ``l`` to level ``q`` is measured with only
  layer ``l`` masked (``loss_table``: layers x grid passes), and the greedy adds these
  up. A greedy that re-measured every candidate jointly after each step would need
  layers x steps passes, about 8,000 for 30 layers at step 0.1: hours on a CPU, where
  the table takes a few minutes (SmolLM2-135M, 16 rows). TEAL measures each block's
  error on its own as well. With a separable loss whose per-layer costs grow convexly,
  this greedy is optimal at every step (``tests/test_allocation.py`` checks it against an
  exhaustive search).
* **Steps.** Levels are multiples of ``step`` below 1; one level per layer applies to its
  heads and its neurons alike (``floor(q * n)`` of each), which halves the passes. A step
  that switches off no further unit (few heads) is merged into the next one.

``calibrate_levels`` returns the levels document that ``levels_file.py`` saves in the run
directory and reads back (``--protocol.allocation_levels``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from pipeline.masks.masks import keep_masks, units_off
from pipeline.models.adapters import UnitLayout
from pipeline.models.inputs import with_cache

FORMAT = "sparseact-calibrated-levels/1"
LOGIT_BUDGET = 2**26  # logits per masked pass (256 MB in fp32): candidates are batched up to it


def level_grid(step: float) -> list[float]:
    """``0, step, 2 step, ...`` below 1."""
    return [round(k * step, 10) for k in range(int(1 / step + 1e-9) + 1) if k * step < 1 - 1e-9]


def layer_gain(layout: UnitLayout, grid: list[float]) -> list[float]:
    """Parameter-weighted sparsity one layer at each grid level adds to the model's average."""
    H, N = layout.num_heads, layout.num_neurons
    return [(layout.attention_share * units_off(q, H) / H + layout.mlp_share * units_off(q, N) / N)
            / layout.num_layers for q in grid]


def greedy_path(table: list[list[float]], gain: list[float]) -> list[tuple[int, int]]:
    """Moves ``(layer, grid index)`` from all layers at 0 until every layer is at the top.

    ``table[l][j]``: loss with layer ``l`` at grid level ``j`` (``table[l][0]`` dense);
    ``gain[j]``: the sparsity a layer at level ``j`` adds. Each move raises one layer to
    its next level that adds sparsity, choosing the smallest loss increase per sparsity
    gained (ties: the lower layer).
    """
    state = [0] * len(table)
    moves = []
    while True:
        best = None
        for layer, j in enumerate(state):
            after = next((k for k in range(j + 1, len(gain)) if gain[k] > gain[j]), None)
            if after is None:
                continue
            cost = (table[layer][after] - table[layer][j]) / (gain[after] - gain[j])
            if best is None or cost < best[0]:
                best = (cost, layer, after)
        if best is None:
            return moves
        state[best[1]] = best[2]
        moves.append((best[1], best[2]))


def levels_for(moves: list[tuple[int, int]], layers: int, grid: list[float], gain: list[float],
               targets: list[float]) -> torch.Tensor:
    """Per-layer levels ``[targets, layers]``: the first state on the path whose sparsity reaches
    each target (the last state where none does)."""
    states, state = [[0] * layers], [0] * layers
    for layer, j in moves:
        state = list(state)
        state[layer] = j
        states.append(state)
    sparsity = [sum(gain[j] for j in s) for s in states]
    rows = []
    for p in targets:
        index = next((i for i, s in enumerate(sparsity) if s >= p - 1e-12), len(states) - 1)
        rows.append([grid[j] for j in states[index]])
    return torch.tensor(rows, dtype=torch.float64)


class CalibrationRows:
    """Calibration rows prepared once for many masked passes.

    Masks apply at the positions that predict the labels, each with its own token's
    mask; the prompt before them stays dense (docs/protocol.md §6), so it runs once and every
    masked pass starts from a copy of its cache. Rows of similar answer length share a
    padded batch (``_Group``): a batch is as long as its longest answer, and one long
    answer would make every short one pay for its length.
    """

    WASTE = 1.25  # a group's padded label positions may exceed its real ones by this factor

    def __init__(self, model, layout: UnitLayout, prompts: list[torch.Tensor], labels: list[torch.Tensor]):
        from pipeline.models.adapters import ADAPTERS

        layers = list(model.get_submodule(ADAPTERS[layout.model_type].layers))
        starts = [0]
        for y in labels:
            starts.append(starts[-1] + len(y))
        self.tokens = starts[-1]  # N: label positions over all rows, sample by sample
        self.groups = []
        for members in _similar_lengths([len(y) for y in labels], self.WASTE):
            index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members])
            self.groups.append(_Group(model, layers, [prompts[i] for i in members], [labels[i] for i in members], index))

    def kl(self, keeps: dict, dense_below: int = 0) -> torch.Tensor:
        """Mean KL(dense || masked) over all label positions, per copy ``[copies]``.

        ``keeps`` ``{module: [copies, N, units]}``: per-token keep masks at that hook point.
        """
        total = sum(group.kl_sum({m: keep[:, group.index.to(keep.device)] for m, keep in keeps.items()}, dense_below)
                    for group in self.groups)
        return total / self.tokens

    def copies_per_pass(self) -> int:
        """Copies of the widest group that fit ``LOGIT_BUDGET`` logits."""
        vocab = self.groups[0].vocab
        return max(1, LOGIT_BUDGET // max(g.rows * g.seq * vocab for g in self.groups))


def _similar_lengths(lengths: list[int], waste: float) -> list[list[int]]:
    """Row indices grouped by length (shortest first) so that ``rows x longest <= waste x sum``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups, current = [], []
    for i in order:
        candidate = current + [i]
        if current and len(candidate) * lengths[i] > waste * sum(lengths[j] for j in candidate):
            groups.append(current)
            candidate = [i]
        current = candidate
    return groups + ([current] if current else [])


class _Group:
    """Rows in one left-padded batch: the dense prompt cache, the dense next-token log-probs,
    and the dense output of every layer.

    A pass that masks layer ``l`` only leaves layers before ``l`` dense: they return their
    recorded dense output instead of computing it (about half the work, averaged over ``l``).
    """

    def __init__(self, model, layers, prompts: list[torch.Tensor], labels: list[torch.Tensor], index: torch.Tensor):
        from pipeline.scores.attribution import pack

        self.model, self.layers, self.index = model, layers, index  # index: this group's rows of the N positions
        device = next(model.parameters()).device
        packed = pack(prompts, labels, "left", device)
        self.cache = None
        if packed.input_ids.shape[1] > packed.positions.shape[1]:
            prefix, packed = packed.split()
            self.cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(**prefix, **with_cache(model, self.cache))
        self.packed = packed
        self.selected = packed.selected()  # flat [rows * seq] indices of the label positions
        self.outputs = [None] * len(layers)

        def record(index):
            def hook(module, args, output):
                self.outputs[index] = output
            return hook

        handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
        try:
            self.dense = self._log_probs(1, {})[0]  # [positions, vocab]
        finally:
            for handle in handles:
                handle.remove()
        self.vocab = self.dense.shape[-1]

    @property
    def rows(self) -> int:
        return self.packed.input_ids.shape[0]

    @property
    def seq(self) -> int:
        return self.packed.input_ids.shape[1]

    @torch.no_grad()
    def _log_probs(self, copies: int, masks: dict, dense_below: int = 0) -> torch.Tensor:
        """Log-probs ``[copies, positions, vocab]``; ``masks`` ``{module: [copies, rows, seq, units]}``
        multiply the units at every position (copy ``c`` of row ``b`` is batch row ``b * copies + c``);
        layers below ``dense_below`` return their recorded dense output."""
        inputs = {k: v.repeat_interleave(copies, 0) if torch.is_tensor(v) else v
                  for k, v in self.packed.model_inputs().items()}
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            if copies > 1:
                cache.batch_repeat_interleave(copies)
            inputs.update(with_cache(self.model, cache, last_position_only=False))
        handles = [module.register_forward_pre_hook(_masking_hook(mask.transpose(0, 1).flatten(0, 1)))
                   for module, mask in masks.items()]
        for index in range(dense_below):
            self.layers[index].forward = _replay(self.outputs[index], copies)
        try:
            logits = self.model(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()
            for index in range(dense_below):
                del self.layers[index].forward
        logits = logits.view(self.rows, copies, self.seq, -1).transpose(0, 1).flatten(1, 2)
        picked = logits[:, self.selected]
        return F.log_softmax(picked.to(torch.promote_types(picked.dtype, torch.float32)), dim=-1)

    def kl_sum(self, keeps: dict, dense_below: int) -> torch.Tensor:
        """Summed KL(dense || masked) over this group's label positions, per copy ``[copies]``;
        ``keeps`` ``{module: [copies, positions, units]}``."""
        masks = {module: self._spread(keep) for module, keep in keeps.items()}
        copies = next(iter(keeps.values())).shape[0]
        masked = self._log_probs(copies, masks, dense_below)
        return (self.dense.exp() * (self.dense - masked)).sum(-1).sum(-1)

    def _spread(self, keep: torch.Tensor) -> torch.Tensor:
        """Per-token keep masks ``[copies, positions, units]`` -> per-position ``[copies, rows, seq, units]``
        (positions that predict no label keep everything)."""
        full = keep.new_ones(keep.shape[0], self.rows * self.seq, keep.shape[-1])
        full[:, self.selected.to(keep.device)] = keep.to(full.device)
        return full.view(keep.shape[0], self.rows, self.seq, -1)


def _replay(output, copies: int):
    """A decoder layer's ``forward`` that returns its recorded dense ``output``, repeated for the copies
    (whatever the layer returns: a tensor, or a tuple holding tensors)."""
    def repeat(value):
        if torch.is_tensor(value) and value.dim() > 0:
            return value.repeat_interleave(copies, 0) if copies > 1 else value.clone()  # never the record itself
        if isinstance(value, tuple):
            return tuple(repeat(v) for v in value)
        return value

    repeated = repeat(output)
    return lambda *args, **kwargs: repeated


def _masking_hook(mask: torch.Tensor):
    """Pre-hook multiplying the hook point's units by ``mask`` ``[batch, seq, units]`` (a head's whole vector)."""
    def hook(module, args):
        x = args[0]
        shaped = x.view(mask.shape[0], mask.shape[1], mask.shape[2], -1)  # OPT feeds [batch * seq, width]
        return ((shaped * mask.unsqueeze(-1).to(x.dtype)).view_as(x), *args[1:])
    return hook


def loss_table(rows: CalibrationRows, layout: UnitLayout, heads: torch.Tensor, neurons: torch.Tensor,
               grid: list[float]) -> list[list[float]]:
    """``table[l][j]``: the calibration loss with only layer ``l`` at ``grid[j]`` (``grid[0]`` = 0: no pass).

    ``heads`` ``[N, layers, heads]`` and ``neurons`` ``[N, layers, neurons]`` are the score at each
    label position. The levels of one layer are batched, up to ``LOGIT_BUDGET`` logits per pass.
    """
    per_pass = rows.copies_per_pass()
    table = []
    for layer in range(layout.num_layers):
        losses = [0.0]
        raised = grid[1:]
        for start in range(0, len(raised), per_pass):
            levels = raised[start:start + per_pass]
            keeps = {layout.head_inputs[layer]: keep_masks(heads[:, layer], levels),
                     layout.neuron_inputs[layer]: keep_masks(neurons[:, layer], levels)}
            losses += rows.kl(keeps, dense_below=layer).tolist()
        table.append(losses)
    return table


def search(rows: CalibrationRows, layout: UnitLayout, heads: torch.Tensor, neurons: torch.Tensor,
           step: float) -> dict:
    """One score's loss table and greedy path, as saved in ``LEVELS_FILE``."""
    grid = level_grid(step)
    table = loss_table(rows, layout, heads, neurons, grid)
    gain = layer_gain(layout, grid)
    state, path = [0] * layout.num_layers, []
    for layer, j in greedy_path(table, gain):
        state[layer] = j
        path.append({"layer": layer, "level": grid[j], "sparsity": sum(gain[i] for i in state),
                     "loss_sum": sum(table[l][i] for l, i in enumerate(state))})
    return {"table": table, "path": path}


def calibrate_levels(model, tokenizer, template: str, samples, metrics: list[str], layout: UnitLayout,
                     max_new_tokens: int, stop_ids: list[int], step: float, graphs=None) -> dict:
    """The levels document (``levels_file.LEVELS_FILE``) of every score in ``metrics``, from the calibration ``samples``;
    ``graphs``: the run's ``CapturedSteps`` for the dense runs (None: captured for this call)."""
    from pipeline.decoding.generation import dense_generate_batch
    from pipeline.models.prompts import answer_length, prompt_ids
    from pipeline.scores.attribution import attribute_batch

    prompts = [torch.tensor(prompt_ids(tokenizer, template, s.question)) for s in samples]
    dense = dense_generate_batch(model, prompts, [answer_length(tokenizer, s.reference, max_new_tokens)
                                                  for s in samples], stop_ids, graphs)
    labels = [torch.tensor(d.tokens) for d in dense]
    rows = CalibrationRows(model, layout, prompts, labels)
    scores = attribute_batch(model, prompts, labels, metrics=metrics)
    document = {"format": FORMAT, "layers": layout.num_layers, "heads": layout.num_heads,
                "neurons": layout.num_neurons, "attention_share": layout.attention_share, "step": step,
                "grid": level_grid(step), "calibration_rows": [s.id for s in samples],
                "loss": "mean KL(dense || masked) over the calibration rows' generated positions, one layer masked",
                "scores": {}}
    for metric in metrics:
        heads = torch.cat([s[metric].heads for s in scores])
        neurons = torch.cat([s[metric].neurons for s in scores])
        document["scores"][metric] = search(rows, layout, heads, neurons, step)
    return document
