"""Every knob of a run, grouped as the command line and YAML files show them.

``sparseact run --print_config`` prints these dataclasses with their defaults;
``--config file.yaml`` sets any subset. ``validate`` turns impossible values into one
clear error line before anything is loaded or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.measures.task import TASK_MEASURES
from pipeline.scores.metrics import DEFAULT_METRICS, METRICS


@dataclass
class ModelConfig:
    """Which model, in which precision, with which prompt."""

    name: str = "smollm2-135m"
    """Bundled short name (smollm2-135m, gemma3-270m), Hugging Face id, or local directory."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for Hugging Face ids."""
    dtype: str = "float32"
    """float32, bfloat16 or float16 (the last two on GPU)."""
    template: str = "auto"
    """auto (chat template if the tokenizer has one, else instruct), chat, instruct
    (the paper's "Instruct: {question}\\nOutput:"), or any string containing {question}."""
    cache_dir: str | None = None
    """Where dequantised GGUF weights are cached (default ~/.cache/sparseact)."""
    trust_remote_code: bool = False
    """Allow Hub models that ship their own modeling code (e.g. MobiLlama)."""


@dataclass
class DataConfig:
    """Which questions."""

    dataset: str = "demo"
    """demo (built in), truthfulqa, gsm8k, a CSV/JSON/JSONL/Parquet file, or a Hugging Face dataset id."""
    path: str | None = None
    """Local file for truthfulqa/gsm8k instead of the Hub (e.g. ../shared/data/truthfulqa/TruthfulQA.csv)."""
    subset: str | None = None
    """Hub dataset configuration name."""
    split: str | None = None
    """Hub split (default: the preset's, else train)."""
    question_field: str | None = None
    """Column holding the question (default: the preset's, else question)."""
    answer_field: str | None = None
    """Column holding the reference answer (default: the preset's, else answer)."""
    task: str | None = None
    """Task accuracy: bleu_vs_reference, exact_number or none (default: the preset's)."""
    start: int = 0
    """Index of the first question."""
    limit: int | None = None
    """Number of questions (default: all)."""


@dataclass
class ProtocolConfig:
    """The evaluation protocol of SPEC sections 3-6."""

    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    """Scores to evaluate: magnitude, gradient, gxo, snip, ig, cor_gxo (ig costs 2 x layers extra passes),
    and the label-free wina (weight-informed magnitude) and static (magnitude against per-layer
    thresholds calibrated on other rows, TEAL-style)."""
    levels: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)])
    """Sparsity levels p in [0, 1)."""
    ig_steps: int = 20
    """Integrated-gradient steps."""
    max_new_tokens: int = 64
    """Cap on T, the number of generated tokens (T = reference answer length in tokens)."""
    dense_first_step: bool = False
    """Leave decoding step 0 dense, as the authors' scripts did."""
    calibration_samples: int = 16
    """static metric only: calibrate its thresholds on this many rows that follow the
    evaluated slice of the dataset (never on evaluated samples)."""
    save_scores: bool = False
    """Also save every sample's per-token scores (each metric, heads and neurons) as
    safetensors under scores/ in the run directory (load with pipeline.load_scores)."""

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if not self.metrics:
            raise UserError("no metrics given")
        bad = [p for p in self.levels if not 0.0 <= p < 1.0]
        if bad:
            raise UserError(f"sparsity level(s) {bad} outside [0, 1)")
        if not self.levels:
            raise UserError("no sparsity levels given")
        if self.ig_steps < 1:
            raise UserError(f"ig_steps must be >= 1, got {self.ig_steps}")
        if "static" in self.metrics and self.calibration_samples < 1:
            raise UserError("the static metric needs calibration_samples >= 1")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RunConfig:
    """Where results go and what runs them."""

    output_dir: str | None = None
    """Run directory (default: runs/<model>__<dataset>__<config hash>)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int | str = 1
    """Devices (GPUs, or CPU processes) per node."""
    num_nodes: int = 1
    """Nodes (set by the SLURM scripts from the allocation)."""
    strategy: str = "auto"
    """Lightning strategy: auto, or ddp to shard samples over devices and nodes."""
    requeue: bool = True
    """Under SLURM, on SIGUSR1 (the time-limit warning of --signal=USR1@90) stop after the
    batch in flight and requeue the job with scontrol; it resumes where it stopped."""
    batch_size: int | None = None
    """Questions per predict step: their dense runs, attribution and masked rows are batched.
    Default: 4 on CPU, 64 on GPU; a batch that does not fit in GPU memory is split
    automatically. Batches are fixed blocks of consecutive questions, so the number of
    ranks and resuming never change a question's batch-mates. Records are written per
    batch, so a killed run redoes at most one batch."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Write curves.png."""


def validate(model: ModelConfig, data: DataConfig, protocol: ProtocolConfig, run: RunConfig) -> None:
    protocol.validate()
    if model.dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise UserError(f"dtype must be float32, bfloat16, float16 or float64, got {model.dtype!r}")
    if data.task is not None and data.task not in TASK_MEASURES:
        raise UserError(f"unknown task measure {data.task!r}; choose from {', '.join(TASK_MEASURES)}")
    if data.start < 0 or (data.limit is not None and data.limit < 1):
        raise UserError("data.start must be >= 0 and data.limit >= 1")
    if run.batch_size is not None and run.batch_size < 1:
        raise UserError("batch_size must be >= 1")
