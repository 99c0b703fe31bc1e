"""One line of ``records.jsonl``: one (sample, metric, allocation, normalisation, level) row.

``Record`` is built by protocol.py, written by store.py (``to_json``), read back by
``store.load_records`` (``from_json``) and read by attribute in summaries, reports and the
runner. Its fields are in the order of the JSON line, so files written before it existed
are byte for byte what it writes (README, "What a run writes").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

# The oracle that deployable scores are measured against (the report's headroom table), and the
# record field in which protocol.py stores label-free rows' mask overlap with its masks.
ORACLE = "cor_gxo"
IOU_FIELD = f"iou_{ORACLE}"


def series_name(metric: str, allocation: str | None = "per_layer", normalize: str | None = None) -> str:
    """``cor_gxo`` (per_layer, the paper's rule), ``cor_gxo/global/mean``, ``magnitude/calibrated``."""
    if allocation in (None, "per_layer"):
        return metric
    return "/".join([metric, allocation] + ([normalize] if normalize else []))


@dataclass(frozen=True)
class Record:
    """One row of a run: a sample's masked output at one (metric, allocation, level) and its measures."""

    sample_id: str
    """The sample's id (``<dataset>:<index>``)."""
    metric: str
    """The score that ranked the units (``SCORES``)."""
    level: float
    """The requested level ``p``: the fraction of units switched off."""
    sparsity: float
    """Achieved sparsity, parameter-weighted (heads by the attention's share, neurons by the MLP's),
    averaged over the decoded steps."""
    kept_heads: list[float]
    """Per layer, the kept fraction of heads over the decoded steps (rounded to 4 places)."""
    kept_neurons: list[float]
    """Per layer, the kept fraction of MLP neurons over the decoded steps (rounded to 4 places)."""
    bleu: float
    """sacreBLEU of the masked output against the dense output (100: identical)."""
    token_agreement: float
    """Fraction of decoding steps that produced the dense token (the longer sequence is the denominator)."""
    task_score: float | None
    """The masked output against the dataset's answer (BLEU, or 100/0 for GSM8K's final number)."""
    dense_task_score: float | None
    """The dense output against the dataset's answer, as ``task_score``."""
    n_tokens: int
    """Tokens the masked row decoded."""
    n_dense_tokens: int
    """Tokens the dense run decoded."""
    output: str
    """The masked output's text."""
    dense_output: str
    """The dense output's text."""
    question: str
    """The question, as given to the prompt template."""
    reference: str
    """The dataset's answer."""
    # allocation and normalize come after the fields of runs before allocations existed, whose
    # lines are byte for byte those fields
    allocation: str = "per_layer"
    """How the level is spread over layers: ``per_layer``, ``global`` or ``calibrated`` (records
    written before allocations existed lack it: per_layer)."""
    normalize: str | None = None
    """The normalisation of ``global`` allocation (``none``, ``mean``, ``l2``, ``rank``); null otherwise."""
    iou_cor_gxo: dict | None = None
    """On label-free scores' rows of runs that also evaluate ``cor_gxo``: {oracle series: {"heads": IoU,
    "neurons": IoU}}, the IoU of the two switched-off sets against cor_gxo at the same level under the
    same allocation (calibrated: per_layer), per token and layer, averaged over the decoded steps and
    layers (pairs where neither switches anything off left out; None where no pair counts).
    Left out of the JSON line when None."""

    @property
    def key(self) -> tuple:
        """What tells records apart: sample, metric, allocation, normalisation, level."""
        return self.sample_id, self.metric, self.allocation, self.normalize, self.level

    @property
    def series(self) -> str:
        """The curve this record belongs to (``series_name``): ``metric`` or ``metric/allocation[/normalize]``."""
        return series_name(self.metric, self.allocation, self.normalize)

    def to_json(self) -> str:
        """The record's line in ``records.jsonl`` (without the newline)."""
        data = {name: getattr(self, name) for name in _FIELDS}
        if self.iou_cor_gxo is None:
            del data[IOU_FIELD]
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: dict) -> Record:
        """A record from a parsed line. Missing ``allocation``/``normalize`` (records written before
        allocations existed) default to per_layer; a missing required field raises ``TypeError``,
        as does a line that is not an object. Fields it does not know are ignored."""
        if not isinstance(data, dict):
            raise TypeError(f"a record is a JSON object, not {type(data).__name__}")
        return cls(**{name: data[name] for name in _FIELDS if name in data})


_FIELDS = tuple(f.name for f in fields(Record))
assert IOU_FIELD in _FIELDS
