"""Question sources: the built-in demo set, TruthfulQA, GSM8K, any local file or Hub dataset.

Every source becomes a list of ``Sample``: a stable id (dataset name + row index, so
resumed runs match rows), the question, and the reference answer when there is one.
``run_name`` names a run directory after the model and the dataset (``lmeval_run_name``
an lm-eval run's after the model, task set, score and level). ``content_digest``
identifies a selection by its text, not by where it was read from: an edited file
changes it, the same file through a symlink does not.

Local files are checked before ``datasets`` parses them, so that a broken line, a file
that is not UTF-8 or a CSV with only a header is reported with the file, the line and
the cause rather than as a generic dataset-generation error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import UserError

DEMO_FILE = Path(__file__).with_name("demo.jsonl")
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Preset:
    hub: tuple[str, str | None, str]  # (dataset id, configuration, split)
    question_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]
    task: str


PRESETS = {
    "truthfulqa": Preset(("truthful_qa", "generation", "validation"), ("Question", "question"),
                         ("Best Answer", "best_answer"), "bleu_vs_reference"),
    "gsm8k": Preset(("gsm8k", "main", "test"), ("question",), ("answer",), "exact_number"),
    "demo": Preset(("", None, ""), ("question",), ("answer",), "bleu_vs_reference"),
}
GENERIC = Preset(("", None, "train"), ("question",), ("answer",), "bleu_vs_reference")


@dataclass
class Sample:
    id: str
    question: str
    reference: str | None


def dataset_name(config: DataConfig) -> str:
    """Short name used in sample ids and run directory names."""
    if config.dataset in PRESETS:
        return config.dataset
    path = Path(config.dataset)
    if path.suffix:  # a file: named after the file read, whichever link led to it
        return (path.resolve() if path.exists() else path).stem
    return config.dataset.replace("/", "_")


def run_name(model_name: str, data: DataConfig, suffix: str) -> str:
    """A run directory's name, ``<model>__<dataset><suffix>``: a run's suffix is ``__`` and its
    fingerprint's first 8 characters, a sweep cell's the slice of rows it evaluates."""
    return f"{Path(model_name).name}__{dataset_name(data)}{suffix}"


def lmeval_run_name(model_name: str, tasks_label: str, score: str, level: float, allocation: str,
                    suffix: str = "") -> str:
    """An lm-eval run directory's name, ``<model>[__<tasks_label>]__<score>-<level>-<allocation><suffix>``,
    or ``<model>[__<tasks_label>]__dense<suffix>`` at level 0 (the dense model, whatever the
    score): a sweep cell's label names its task set, a ``sparseact lmeval`` run's suffix is
    ``__`` and its fingerprint. The model is a local directory's name or the Hub id with
    ``--`` for ``/``."""
    model = Path(model_name).name if Path(model_name).exists() else model_name.replace("/", "--")
    cell = "dense" if level == 0 else f"{score}-{level}-{allocation}"
    return "__".join(part for part in (model, tasks_label, cell) if part) + suffix


def content_digest(samples: list[Sample]) -> str:
    """SHA-256 over the selected rows' ids, questions and references."""
    blob = json.dumps([[s.id, s.question, s.reference] for s in samples], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_file(path: Path) -> None:
    """One clear line for a file ``datasets`` would fail on with a generic error."""
    if path.suffix.lower() == ".parquet":
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                        "save the file as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = sum(1 for row in csv.reader(io.StringIO(text)) if row)
        if rows <= 1:
            raise UserError(f"{path} has a header but no rows")
    elif suffix in (".json", ".jsonl"):
        if suffix == ".json":
            try:
                json.loads(text)
                return
            except json.JSONDecodeError as error:
                first = next((line for line in text.splitlines() if line.strip()), "")
                if not first.strip().startswith("{") or not _parses(first):
                    raise UserError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
        for number, line in enumerate(text.splitlines(), 1):  # JSON lines
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {number}: expected a JSON object with the question and answer fields")


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _read_rows(config: DataConfig, preset: Preset):
    """Rows as a sequence of dicts, from a file or the Hub."""
    if config.dataset == "demo" and config.path is None:
        return [json.loads(line) for line in DEMO_FILE.read_text().splitlines() if line.strip()]
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    source = config.path or (config.dataset if config.dataset not in PRESETS else None)
    if source is not None and (Path(source).suffix.lower() in FILE_BUILDERS or Path(source).exists()):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        if path.stat().st_size == 0:
            raise UserError(f"dataset '{dataset_name(config)}' is empty ({path} has no rows)")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"unsupported data file type {path.suffix!r}: use .csv, .json, .jsonl or .parquet")
        check_file(path)
        try:
            return datasets.load_dataset(builder, data_files=str(path.resolve()), split="train")
        except Exception as error:  # malformed CSV/JSON surfaces from pandas/pyarrow with many types
            raise UserError(f"could not read {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    hub_id, subset, split = preset.hub if config.dataset in PRESETS else (config.dataset, None, "train")
    subset, split = config.subset or subset, config.split or split
    from pipeline.hub import hub_reachable

    if not hub_reachable():  # a dataset already in the local cache still loads, without any network call
        return _load_cached(datasets, hub_id, subset, split)
    try:
        return datasets.load_dataset(hub_id, subset, split=split, revision=None)
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"could not load dataset '{hub_id}' from the Hugging Face Hub ({first}); "
                        f"pass a local file with --data.path")


def _load_cached(datasets, hub_id: str, subset, split):
    """A Hub dataset from the local cache only (offline mode for this call), or one clear line."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(hub_id, subset, split=split, revision=None)
    except Exception:
        raise UserError(f"could not load dataset '{hub_id}': it is not in the local cache and the Hugging Face Hub "
                        "cannot be reached (offline); pass a local file with --data.path") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _pick_field(columns, configured: str | None, candidates: tuple[str, ...], what: str, required: bool):
    if configured is not None:
        if configured not in columns:
            raise UserError(f"{what} field '{configured}' not in the data; columns are {', '.join(columns)}")
        return configured
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise UserError(f"no {what} column found (looked for {', '.join(candidates)}); "
                        f"set --data.{what}_field; columns are {', '.join(columns)}")
    return None


def load_samples(config: DataConfig) -> tuple[list[Sample], str]:
    """The selected questions and the task measure to score them with."""
    preset = PRESETS.get(config.dataset, GENERIC)
    rows = _read_rows(config, preset)
    name = dataset_name(config)
    if len(rows) == 0:
        raise UserError(f"dataset '{name}' is empty")
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0].keys())
    q_field = _pick_field(columns, config.question_field, preset.question_fields, "question", True)
    a_field = _pick_field(columns, config.answer_field, preset.answer_fields, "answer", False)
    task = config.task or (preset.task if a_field else "none")
    stop = len(rows) if config.limit is None else min(len(rows), config.start + config.limit)
    samples = []
    for index in range(config.start, stop):
        row = rows[index]
        question = row.get(q_field)
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"row {index} of dataset '{name}' has no question in field '{q_field}'")
        reference = row.get(a_field) if a_field else None
        if a_field and reference is not None and not isinstance(reference, str):
            reference = str(reference)
        samples.append(Sample(id=f"{name}:{index}", question=question.strip(), reference=reference))
    if not samples:
        raise UserError(f"no questions selected from dataset '{name}' ({len(rows)} rows, start={config.start})")
    return samples, task
