"""Masks: which units are switched off (masks.py), where that happens (hooks.py), masked decoding (generation.py)."""
