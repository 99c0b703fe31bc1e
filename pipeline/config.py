"""Every knob of a run, grouped as the command line and YAML files show them.

``sparseact run --print_config`` prints these dataclasses with their defaults;
``--config file.yaml`` sets any subset. ``validate`` turns impossible values into one
clear error line before anything is loaded or written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.errors import UserError
from pipeline.measures.task import TASK_MEASURES
from pipeline.masks import ALLOCATIONS, NORMALIZATIONS
from pipeline.scores.metrics import DEFAULT_METRICS, SCORES, describe


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
    """The evaluation protocol of docs/protocol.md §3-§6."""

    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    levels: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)])
    """Sparsity levels p in [0, 1)."""
    allocation: str | list[str] = "per_layer"
    normalize: str | list[str] = "mean"
    ig_steps: int = 20
    """Integrated-gradient steps."""
    max_new_tokens: int = 64
    """Cap on T, the number of generated tokens (T = reference answer length in tokens)."""
    dense_first_step: bool = False
    """Leave decoding step 0 dense, as the authors' scripts did."""
    calibration_samples: int = 16
    """static metric and calibrated allocation: calibrate on this many rows that follow the
    evaluated slice of the dataset (never on evaluated samples)."""
    calibration_step: float = 0.1
    """calibrated allocation: per-layer levels are multiples of this step; the greedy search
    measures layers x (1/step - 1) masked passes over the calibration rows."""
    allocation_levels: str | None = None
    """calibrated allocation: reuse the allocation_levels.json of an earlier run instead of
    calibrating (its content, not its path, enters the fingerprint)."""
    save_scores: bool = False
    """Also save every sample's per-token scores (each metric, heads and neurons) as
    safetensors under scores/ in the run directory (load with pipeline.load_scores)."""

    @property
    def allocations(self) -> list[str]:
        listed = [self.allocation] if isinstance(self.allocation, str) else list(self.allocation)
        return list(dict.fromkeys(listed))

    @property
    def normalizations(self) -> list[str]:
        listed = [self.normalize] if isinstance(self.normalize, str) else list(self.normalize)
        return list(dict.fromkeys(listed))

    def variants(self) -> list[tuple[str, str, str | None]]:
        """The (metric, allocation, normalisation) of every record row, in record order: each
        metric with each requested allocation its score supports (``global`` once per normalisation)."""
        rows = []
        for metric in self.metrics:
            for allocation in self.allocations:
                if allocation not in SCORES[metric].allocations:
                    continue
                for normalize in (self.normalizations if allocation == "global" else [None]):
                    rows.append((metric, allocation, normalize))
        return rows

    def calibrated_metrics(self) -> list[str]:
        return list(dict.fromkeys(m for m, a, _ in self.variants() if a == "calibrated"))

    def needs_calibration_rows(self) -> bool:
        """static thresholds, or calibrated levels not read from a file."""
        return (any(SCORES[m].thresholds for m in self.metrics)
                or (bool(self.calibrated_metrics()) and self.allocation_levels is None))

    def numbers_affecting(self) -> dict:
        """The protocol as the fingerprint sees it.

        Without a global or calibrated allocation the dict is the one of the code before
        allocations existed, so the run directories it fingerprinted keep their names and
        resume; otherwise it holds the allocations and what they read (the normalisations,
        the step, the levels file's content).
        """
        values = {k: v for k, v in asdict(self).items() if k != "save_scores"}  # output only
        for key in ("allocation", "normalize", "calibration_step", "allocation_levels"):
            values.pop(key)
        if self.allocations != ["per_layer"]:
            values["allocation"] = self.allocations
        if "global" in self.allocations:
            values["normalize"] = self.normalizations
        if "calibrated" in self.allocations:
            values["calibration_step"] = self.calibration_step
            if self.allocation_levels is not None:
                from pipeline.masks.levels_file import file_digest

                values["allocation_levels"] = file_digest(self.allocation_levels)
        return values

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in SCORES]
        if unknown:
            raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(SCORES)}")
        if not self.metrics:
            raise UserError("no metrics given")
        for name, values in (("metric", self.metrics), ("level", self.levels)):
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:  # rows are keyed by (metric, level): a repeat would be computed and counted twice
                raise UserError(f"{name}(s) given more than once: {', '.join(map(str, repeated))}")
        bad = [p for p in self.levels if not 0.0 <= p < 1.0]
        if bad:
            raise UserError(f"sparsity level(s) {bad} outside [0, 1)")
        if not self.levels:
            raise UserError("no sparsity levels given")
        if self.ig_steps < 1:
            raise UserError(f"ig_steps must be >= 1, got {self.ig_steps}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self._validate_allocation()
        if self.needs_calibration_rows() and self.calibration_samples < 1:
            raise UserError("the static metric and the calibrated allocation need calibration_samples >= 1")

    def _validate_allocation(self) -> None:
        unknown = [a for a in self.allocations if a not in ALLOCATIONS]
        if unknown or not self.allocations:
            raise UserError(f"unknown allocation(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(ALLOCATIONS)}")
        unknown = [n for n in self.normalizations if n not in NORMALIZATIONS]
        if unknown or not self.normalizations:
            raise UserError(f"unknown normalisation(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(NORMALIZATIONS)}")
        for metric in self.metrics:
            supported = SCORES[metric].allocations
            if not set(self.allocations) & set(supported):
                raise UserError(f"score {metric} does not support allocation {', '.join(self.allocations)} "
                                f"(it supports {', '.join(supported)})")
        for allocation in self.allocations:
            if not any(allocation in SCORES[m].allocations for m in self.metrics):
                able = [name for name, row in SCORES.items() if allocation in row.allocations]
                raise UserError(f"allocation {allocation} applies to none of the metrics given "
                                f"({', '.join(self.metrics)}); it supports {', '.join(able)}")
        if "calibrated" in self.allocations:
            if not 0 < self.calibration_step < 1:
                raise UserError(f"calibration_step must be in (0, 1), got {self.calibration_step}")
            if self.allocation_levels is not None:
                from pipeline.masks.levels_file import read_levels

                read_levels(self.allocation_levels)


ProtocolConfig.__doc__ += f"""
    Args:
        metrics: Scores to evaluate. {describe()}.
        allocation: How a level p becomes per-layer counts; one name or a list (one run, one
            attribution pass, rows = scores x allocations x levels; a score is evaluated under
            each listed allocation it supports). {'; '.join(f'{k}: {v}' for k, v in ALLOCATIONS.items())}.
        normalize: global allocation only: how each layer's scores are made comparable before
            ranking all layers together; one name or a list. {'; '.join(f'{k}: {v}' for k, v in NORMALIZATIONS.items())}.
"""


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


@dataclass
class LmEvalCells:
    """lm-eval cells of ``sparseact sweep``: these tasks for every model x score x level
    (``sparseact lmeval``'s options, with lists of scores and levels)."""

    name: str = "truthfulqa"
    """Label of this task set in the cells' directory names, <model>__<name>__<score>-<level>-<allocation>
    (level 0: <model>__<name>__dense)."""
    tasks: list[str] = field(default_factory=lambda: ["truthfulqa_mc1_local"])
    """lm-eval task names, all run in each cell (as sparseact lmeval --tasks)."""
    scores: list[str] = field(default_factory=lambda: ["wina"])
    """Scores, each run at every level above 0."""
    levels: list[float] = field(default_factory=lambda: [0.0, 0.5])
    """Sparsity levels p in [0, 1). Level 0 (the dense model, whatever the score) is one cell per model."""
    allocation: str = "per_layer"
    """How a level becomes keep masks (as sparseact lmeval --allocation)."""
    dense_first_step: bool = False
    """Keep every unit at the first position of each continuation."""
    batch_size: int = 4
    """Requests per forward pass."""
    limit: float | None = None
    """Documents per task (an integer), or a fraction below 1."""
    num_fewshot: int | None = None
    """Few-shot examples (default: the task's)."""
    gen_kwargs: str | None = None
    """Generation arguments for generate_until tasks (e.g. max_gen_toks=256)."""
    include_path: list[str] = field(default_factory=list)
    """More directories of lm-eval task YAMLs."""
    data_dir: str | None = None
    """Directory holding truthfulqa/TruthfulQA.csv and gsm8k/test.jsonl (default ../shared/data)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    ig_steps: int = 20
    """Integrated-gradient steps (score ig)."""
    apply_chat_template: bool = False
    """Format prompts with the tokenizer's chat template."""
    progress: bool = True
    """Show progress bars."""


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
    devices = run.devices
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        raise UserError(f"run.devices must be >= 1, -1 (all) or auto, got {run.devices}")
    if run.num_nodes < 1:
        raise UserError(f"run.num_nodes must be >= 1, got {run.num_nodes}")
