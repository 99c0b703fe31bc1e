"""Data: where questions come from (sources.py) and how they reach the predict loop (datamodule.py)."""
