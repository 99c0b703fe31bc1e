"""The score table: one row per score, read by the engine, config validation, the run and the report.

Every property that used to be a string comparison somewhere (which scores need a
backward pass, which need integrated gradients, which are label-free and therefore
deployable, which read the output projections, which mask by calibrated thresholds,
which allocations they support, which are on by default) is a field of the row, so
adding a score is one ``Score`` row plus its test. The formulas themselves are in
``formulas.py``, imported when a score is first computed: the table needs no torch, so
``pipeline.config`` reads it without loading one. The allocation names are those of
``pipeline/masks/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from pipeline.scores.formulas import Terms

# the names of pipeline.masks.ALLOCATIONS (masks/ imports scores/, so not imported from there;
# tests/test_allocation.py checks the two agree)
EVERY_ALLOCATION = ("per_layer", "global", "calibrated")
# Calibrated levels are searched on calibration rows and then applied to other rows: a
# score that needs the other rows' labels (their dense outputs) has nothing to apply them to.
WITH_LABELS = ("per_layer", "global")


@dataclass(frozen=True)
class Score:
    """One score: how to compute it and what it may be combined with."""

    name: str
    description: str  # one line, shown in ``--help``
    heads: Callable[[Terms], torch.Tensor]  # Terms of x, g [..., heads, head_dim] -> [..., heads]
    neurons: Callable[[Terms], torch.Tensor]  # Terms of x, g [..., neurons] -> [..., neurons]
    gradient: str | None = "plain"  # None: forward only; "plain": dL_t/dx; "integrated": IG's step-averaged gradient
    needs_labels: bool = True  # an attribution oracle (needs the dense output); False: label-free, deployable
    allocations: tuple[str, ...] = WITH_LABELS
    default: bool = False  # evaluated when --protocol.metrics is not given
    weights: bool = False  # reads the output projections (Terms.weights)
    thresholds: bool = False  # masks by per-layer thresholds calibrated on other rows instead of top-k

    @property
    def needs_gradient(self) -> bool:
        return self.gradient is not None

    @property
    def label_free(self) -> bool:
        return not self.needs_labels


def _table(*rows: Score) -> dict[str, Score]:
    return {row.name: row for row in rows}


def _formula(name: str) -> Callable:
    """``formulas.<name>``, imported on the first call."""
    def apply(terms):
        from pipeline.scores import formulas

        return getattr(formulas, name)(terms)

    apply.__name__ = apply.__qualname__ = name
    return apply


def _formulas(score: str) -> tuple[Callable, Callable]:
    """The head and neuron formulas of ``score`` (``formulas.<score>_heads``, ``formulas.<score>_neurons``)."""
    return _formula(f"{score}_heads"), _formula(f"{score}_neurons")


SCORES: dict[str, Score] = _table(
    Score("magnitude", "|x_i|, ||x_h||: the unit's output size (label-free)", *_formulas("magnitude"),
          gradient=None, needs_labels=False, allocations=EVERY_ALLOCATION, default=True),
    Score("gradient", "-g: the loss gradient alone", *_formulas("gradient"), default=True),
    Score("gxo", "-g*x: gradient x output, first-order loss change of removing the unit", *_formulas("gxo"),
          default=True),
    Score("snip", "|g*x|", *_formulas("snip"), default=True),
    Score("ig", "integrated gradients from a zero baseline (ig_steps steps; 2 x layers extra passes)",
          *_formulas("gxo"), gradient="integrated"),
    Score("cor_gxo", "-g*x + |x|*||G_l||/2: the paper's corrected GxO", *_formulas("cor_gxo"), default=True),
    Score("wina", "|x_i|*||W_down[:,i]||, ||W_o[:,h] x_h||: weight-informed magnitude (label-free)",
          *_formulas("wina"), gradient=None, needs_labels=False, allocations=EVERY_ALLOCATION, weights=True),
    # Its own per-layer thresholds are its allocation: the count per token varies, so
    # neither a global ranking nor calibrated top-k levels apply to it.
    Score("static", "magnitude against per-layer thresholds calibrated on other rows, TEAL-style (label-free)",
          *_formulas("magnitude"), gradient=None, needs_labels=False, allocations=("per_layer",), thresholds=True),
)

METRICS = tuple(SCORES)
DEFAULT_METRICS = tuple(name for name, row in SCORES.items() if row.default)
NEEDS_GRADIENT = frozenset(name for name, row in SCORES.items() if row.needs_gradient)


def describe() -> str:
    """The table as one help line per score."""
    return "; ".join(f"{name}: {row.description}" + (" [default]" if row.default else "")
                     for name, row in SCORES.items())


def _row(metric: str) -> Score:
    if metric not in SCORES:
        raise ValueError(f"unknown metric {metric!r}")
    return SCORES[metric]


def head_scores(metric: str, x: torch.Tensor, g: torch.Tensor | None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``metric``'s head importances from ``x``, ``g`` ``[..., heads, head_dim]`` (wina: ``weights``)."""
    from pipeline.scores.formulas import Terms

    return _row(metric).heads(Terms(x, g, weights))


def neuron_scores(metric: str, x: torch.Tensor, g: torch.Tensor | None, terms: dict | None = None,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """``terms``: where ``|x|``, ``-g`` and ``-g * x`` are kept for other metrics of the same ``x`` and ``g``."""
    from pipeline.scores.formulas import Terms

    return _row(metric).neurons(Terms(x, g, weights, terms))


def neuron_score_set(metrics, x: torch.Tensor, g: torch.Tensor | None, g_ig: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> dict:
    """``neuron_scores`` of several metrics at once, sharing their terms (integrated-gradient scores use ``g_ig``)."""
    from pipeline.scores.formulas import Terms

    plain, integrated = Terms(x, g, weights), Terms(x, g_ig, weights)
    return {m: _row(m).neurons(integrated if _row(m).gradient == "integrated" else plain) for m in metrics}
