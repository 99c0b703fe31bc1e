"""Masks: from scores to which units are switched off (docs/protocol.md §5).

* ``masks.py``: the per-layer rule (``keep_masks``: floor(p * n) lowest units off) and the
  parameter-weighted sparsity a mask achieves;
* ``allocation.py``: how a level p becomes per-layer counts (per_layer, global, calibrated):
  ``allocate`` is the one call from scores to keep masks;
* ``calibration.py`` and ``levels_file.py``: the calibrated allocation's greedy search and its file;
* ``static.py``: TEAL-style per-layer magnitude thresholds.

The names below are the choices the command line offers; they live here, free of torch,
so that ``pipeline.config`` can validate and document them without loading a model
library. Masks are applied by ``pipeline/hooks.py``.
"""

ALLOCATIONS = {
    "per_layer": "floor(p*n) lowest units of every layer, per token (the paper's rule)",
    "global": "lowest floor(p*layers*n) units of all layers together, per token, after --protocol.normalize",
    "calibrated": "per-layer levels from a greedy search on calibration rows (label-free scores)",
}

NORMALIZATIONS = {
    "none": "raw scores",
    "mean": "each layer's scores divided by the layer's mean |score| at that token",
    "l2": "each layer's scores divided by the layer's L2 norm at that token",
    "rank": "each unit's rank within its layer at that token, (rank + 1) / units (ties: lower index lower)",
}
