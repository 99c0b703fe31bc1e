"""Results: the run directory and its records (store.py), summaries (summary.py), plots (plot.py)."""
