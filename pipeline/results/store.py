"""The run directory: a fingerprinted config, append-only records, atomic summaries.

* ``run.json`` holds the configuration and its *fingerprint*, a hash of
  ``numbers_affecting``: everything that changes numbers, identified by content (the
  selected questions' text, the weights' hash or resolved commit, template, protocol,
  batch size, device type, and ``NUMBERS_VERSION``, the code's own version of its numbers).
  A run directory only ever holds one fingerprint: another
  configuration is refused before anything is written, naming the fields that differ.
  A ``run.json`` whose contents no longer match its fingerprint (edited by hand) is
  refused too.
* ``records.jsonl`` gets one line per (sample, metric, allocation, level), appended, flushed and
  fsynced after every batch, so a killed run loses at most the batch in flight (on a GPU, whose
  records are written in a background thread, also the batch before it until that is written,
  ``runner/callbacks.py``). A torn
  line is skipped on reading (and reported once), and a rerun skips samples already
  complete.
* Summaries are written to a temporary file and renamed into place; a write that fails
  (a full disk) removes its temporary file, and files named ``*.partial`` or ``.lock*``
  never count as results.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.results.record import Record

RECORDS = "records.jsonl"
RUN_INFO = "run.json"


# The code's share of a run's identity, in ``numbers_affecting``: raise it with every change that
# alters a recorded number for the same inputs and settings, so that a rerun of newer code never
# appends to a directory of older records (the refusal names it: ``numbers_version: 2 -> 3``).
#   (absent) runs made before this field existed
#   2        an oracle IoU at a 4-place tie rounds as its exact mean does (measures/mask_stats.py)
NUMBERS_VERSION = 2


def fingerprint(numbers_affecting: dict) -> str:
    blob = json.dumps(numbers_affecting, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_error(path: Path, error: OSError) -> UserError:
    """An OS error while writing the run directory, as one line that names the file."""
    return UserError(f"cannot write {path}: {error.strerror or error}")


def atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # ranks may write the same file
    try:
        with partial.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    except OSError as error:
        partial.unlink(missing_ok=True)  # a full disk must not leave a file that blocks the next run
        raise write_error(path, error) from None


def is_bookkeeping(path: Path) -> bool:
    """Lock files and temporary files of interrupted writes: never results."""
    return path.name.startswith(".lock") or path.name.endswith(".partial")


_ABSENT = object()  # a field one of the two dicts lacks


def differences(old, new, prefix: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two ``numbers_affecting`` dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
        return found
    if old == new:
        return []

    def short(value) -> str:
        if value is _ABSENT:
            return "(absent)"
        return text if len(text := json.dumps(value, default=str)) <= 40 else text[:37] + "..."
    return [f"{prefix.rstrip('.')}: {short(old)} -> {short(new)}"]


def check_run_dir(run_dir: Path, info: dict) -> None:
    """Refuse a directory that holds another configuration's results (writes nothing)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output directory {run_dir} is a file; choose another --run.output_dir")
    existing = run_dir / RUN_INFO
    if existing.exists():
        try:
            previous = json.loads(existing.read_text())
            stored, recorded = previous["numbers_affecting"], previous["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{existing} is not a run description; choose another output directory") from None
        if fingerprint(stored) != recorded:
            raise UserError(f"{existing} was edited (its contents no longer match its fingerprint {recorded}); "
                            "choose another output directory")
        if recorded != info["fingerprint"]:
            changed = differences(stored, info["numbers_affecting"])
            raise UserError(f"{run_dir} holds results of a different configuration ({'; '.join(changed[:3])}"
                            f"{f'; and {len(changed) - 3} more' if len(changed) > 3 else ''}); "
                            "choose another --run.output_dir")
    elif run_dir.is_dir() and any(not is_bookkeeping(p) for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty and holds no {RUN_INFO}; choose another output directory")


def open_run_dir(run_dir: Path, info: dict) -> None:
    check_run_dir(run_dir, info)
    if not (run_dir / RUN_INFO).exists():
        atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")


@dataclass
class Records:
    """The records of a run directory, and the lines that could not be read."""

    rows: list[Record]
    unreadable: list[str] = field(default_factory=list)  # "records.jsonl line 37"

    def warning(self) -> str | None:
        if not self.unreadable:
            return None
        where = ", ".join(self.unreadable[:3]) + (", ..." if len(self.unreadable) > 3 else "")
        return (f"skipped {len(self.unreadable)} unreadable line{'s' * (len(self.unreadable) > 1)} ({where}); "
                "a run killed while writing leaves one, and its samples are recomputed")


def load_records(run_dir: Path) -> Records:
    """One record per (sample, metric, allocation, level).

    A torn (partially written) line is skipped and reported. A sample cut off mid-write
    and redone on resume appears twice on disk; the later copy wins, so nothing is
    counted twice.
    """
    records: dict[tuple, Record] = {}
    unreadable = []
    # Published runs keep their records gzipped (records.jsonl.gz); live runs append to .jsonl.
    for path in sorted(run_dir.glob("records*.jsonl.gz")) + sorted(run_dir.glob("records*.jsonl")):
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            try:
                record = Record.from_json(json.loads(line))
                records[record.key] = record
            except (ValueError, KeyError, TypeError):
                unreadable.append(f"{path.name} line {number}")
    return Records(list(records.values()), unreadable)


def read_records(run_dir: Path) -> list[Record]:
    return load_records(run_dir).rows


def completed_samples(records: list[Record], rows_per_sample: int) -> set[str]:
    """Samples whose records are all present."""
    counts: dict[str, set] = {}
    for record in records:
        counts.setdefault(record.sample_id, set()).add(record.key)
    return {sample for sample, rows in counts.items() if len(rows) >= rows_per_sample}


def append_records(path: Path, records: list[Record]) -> None:
    try:
        with path.open("a") as handle:
            # A torn line from a killed writer must not swallow the next record.
            if handle.tell() > 0:
                with path.open("rb") as check:
                    check.seek(-1, os.SEEK_END)
                    if check.read(1) != b"\n":
                        handle.write("\n")
            handle.write("".join(r.to_json() + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # the torn line it may leave is skipped on reading and recomputed
        raise write_error(path, error) from None
