"""Results: one records.jsonl line (record.py), the run directory (store.py), summaries (summary.py), plots (plot.py), the report over runs (report.py)."""
