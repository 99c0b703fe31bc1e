"""Scores: per-token unit importances (docs/protocol.md §4).

``attribution.py`` is the engine that runs the passes (the file to open); ``metrics.py``
holds the score table (one row per score, free of torch), ``formulas.py`` the formulas,
``exact_attention.py`` the attention function that makes one backward pass give every
token its own gradient. Scores use ``pipeline/hooks.py`` to read unit outputs and never
import ``masks/`` or ``decoding/``.
"""
