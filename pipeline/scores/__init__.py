"""Scores: per-token unit importances (docs/protocol.md §4).

``metrics.py`` holds the formulas, ``exact_attention.py`` the attention function that
makes one backward pass give every token its own gradient, ``attribution.py`` the
engine that runs the passes.
"""
