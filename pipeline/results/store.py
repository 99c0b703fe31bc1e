"""The run directory: a fingerprinted config, append-only records, atomic summaries.

* ``run.json`` holds the configuration and its *fingerprint*, a hash of everything
  that changes numbers (model and weights, dataset and slice, template, protocol).
  A run directory only ever holds one fingerprint: a different configuration is
  refused before anything is written.
* ``records.jsonl`` gets one line per (sample, metric, allocation, level), appended, flushed and
  fsynced after every batch, so a killed run loses at most the batch in flight. A torn
  last line is ignored on reading, and a rerun skips samples already complete.
* Summaries are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from pipeline.errors import UserError

RECORDS = "records.jsonl"
RUN_INFO = "run.json"


def fingerprint(numbers_affecting: dict) -> str:
    blob = json.dumps(numbers_affecting, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # ranks may write the same file
    with partial.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def check_run_dir(run_dir: Path, info: dict) -> None:
    """Refuse a directory that holds another configuration's results (writes nothing)."""
    existing = run_dir / RUN_INFO
    if existing.exists():
        try:
            previous = json.loads(existing.read_text())["fingerprint"]
        except (ValueError, KeyError):
            raise UserError(f"{existing} is not a run description; choose another output directory") from None
        if previous != info["fingerprint"]:
            raise UserError(
                f"{run_dir} holds results of a different configuration (fingerprint {previous}, "
                f"this run {info['fingerprint']}); choose another --run.output_dir"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty and holds no {RUN_INFO}; choose another output directory")


def open_run_dir(run_dir: Path, info: dict) -> None:
    check_run_dir(run_dir, info)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_INFO).exists():
        atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")


def read_records(run_dir: Path) -> list[dict]:
    """One record per (sample, metric, allocation, level).

    A torn (partially written) line is skipped. A sample cut off mid-write and redone
    on resume appears twice on disk; the later copy wins, so nothing is counted twice.
    """
    records: dict[tuple, dict] = {}
    # Published runs keep their records gzipped (records.jsonl.gz); live runs append to .jsonl.
    for path in sorted(run_dir.glob("records*.jsonl.gz")) + sorted(run_dir.glob("records*.jsonl")):
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for line in text.splitlines():
            try:
                record = json.loads(line)
                records[(record["sample_id"], *row_key(record))] = record
            except (ValueError, KeyError, TypeError):
                continue
    return list(records.values())


def row_key(record: dict) -> tuple:
    """What tells a sample's records apart: metric, allocation, normalisation, level (records
    written before allocations existed are per_layer)."""
    return record["metric"], record.get("allocation", "per_layer"), record.get("normalize"), record["level"]


def completed_samples(run_dir: Path, rows_per_sample: int) -> set[str]:
    """Samples whose records are all present."""
    counts: dict[str, set] = {}
    for record in read_records(run_dir):
        counts.setdefault(record["sample_id"], set()).add(row_key(record))
    return {sample for sample, rows in counts.items() if len(rows) >= rows_per_sample}


def append_records(path: Path, records: list[dict]) -> None:
    with path.open("a") as handle:
        # A torn line from a killed writer must not swallow the next record.
        if handle.tell() > 0:
            with path.open("rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    handle.write("\n")
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())
