"""The ``sparseact`` command. Subcommands are typed functions; jsonargparse turns their
signatures and docstrings into flags, ``--config`` YAML files and ``--print_config``."""

from __future__ import annotations

import sys

from pipeline.config import DataConfig, LmEvalCells, ModelConfig, ProtocolConfig, RunConfig
from pipeline.errors import UserError


def run(
    model: ModelConfig = ModelConfig(),
    data: DataConfig = DataConfig(),
    protocol: ProtocolConfig = ProtocolConfig(),
    run: RunConfig = RunConfig(),
) -> None:
    """Measure how far one model can be sparsified on one dataset, per score.

    Args:
        model: Model, precision and prompt template.
        data: Questions to evaluate.
        protocol: Scores, sparsity levels and decoding protocol.
        run: Output directory and hardware.
    """
    from pipeline.runner.run import evaluate

    evaluate(model, data, protocol, run)


def sweep(
    models: list[ModelConfig] | None = None,
    datasets: list[DataConfig] | None = None,
    protocol: ProtocolConfig = ProtocolConfig(),
    run: RunConfig = RunConfig(),
    root: str = "runs/sweep",
    slurm: bool = False,
    lmeval: list[LmEvalCells] | None = None,
) -> None:
    """Run every model on every dataset (or lm-eval tasks), one run directory per cell under ``root``.

    With ``lmeval``, every model runs lm-eval tasks, one ``sparseact lmeval`` run per cell.
    A killed sweep rerun with the same file finishes only what is missing. Every cell is
    checked before the first one runs.

    Args:
        models: Models, each as in ``sparseact run --model`` (default: the two bundled SLMs).
        datasets: Datasets, each as in ``sparseact run --data`` (default: the built-in demo set).
        protocol: One protocol for every cell.
        run: Hardware and batch options for every cell (output_dir is set per cell).
        root: Directory that holds one run directory per cell.
        slurm: Write one config per cell and the job-array command instead of running.
        lmeval: Task sets for lm-eval cells instead of datasets (needs the [lmeval] extra): per model,
            task set, score and level above 0 one cell <model>__<name>__<score>-<level>-<allocation>, and
            one dense cell <model>__<name>__dense when levels hold 0. A cell with results.json is skipped.
            datasets, protocol and run are then left unset.
    """
    from pipeline.sweep import run_sweep

    if models is None:
        models = [ModelConfig(name="smollm2-135m"), ModelConfig(name="gemma3-270m")]
    run_sweep(models, datasets, protocol, run, root, slurm, lmeval)


def report(runs: list[str] | str, output: str | None = None, heatmap_metric: str | None = None,
           heatmap_level: float = 0.5) -> None:
    """Summarise run directories (or sweep roots) in one report.html and report.md.

    Args:
        runs: A run directory, a directory of runs (a sweep root), or a list of them.
        output: Directory for report.html and report.md (default: the first argument).
        heatmap_metric: Series whose per-layer kept fractions the heatmap shows (e.g. static,
            cor_gxo/global/mean). Default (and for a run without it): a calibrated series, else a
            global one, else static, else the run's first: per_layer top-k scores keep the same
            fraction of every layer by construction.
        heatmap_level: Sparsity level the heatmap shows.
    """
    from pipeline.results.report import write_report

    write_report([runs] if isinstance(runs, str) else runs, output, heatmap_metric, heatmap_level)


def lmeval(
    model: ModelConfig = ModelConfig(),
    tasks: list[str] = ["truthfulqa_mc1_local"],  # noqa: B006
    score: str = "wina",
    level: float = 0.5,
    allocation: str = "per_layer",
    dense_first_step: bool = False,
    batch_size: int = 4,
    limit: float | None = None,
    num_fewshot: int | None = None,
    gen_kwargs: str | None = None,
    include_path: list[str] = [],  # noqa: B006
    data_dir: str | None = None,
    output_dir: str | None = None,
    device: str = "auto",
    ig_steps: int = 20,
    apply_chat_template: bool = False,
    progress: bool = True,
) -> None:
    """Run lm-eval tasks on the model with units switched off per position (needs the [lmeval] extra).

    Writes run.json, results.json (lm-eval's) and samples_<task>.jsonl into the run
    directory; a killed run rerun with the same arguments redoes no finished request.

    Args:
        model: Model and precision (name, revision, dtype, cache_dir, trust_remote_code; template is unused:
            lm-eval's tasks bring their prompts).
        tasks: lm-eval task names: the offline truthfulqa_mc1_local, truthfulqa_mc2_local, gsm8k_local
            (configs/lm_eval/tasks), tasks under include_path, or any task of lm-eval's registry (needs network).
        score: magnitude or wina (label-free), or gradient, gxo, snip, ig, cor_gxo (labels from the dense model).
        level: Sparsity level p in [0, 1); 0 is the dense model (lm-eval's hf numbers).
        allocation: How a level becomes keep masks: per_layer (floor(p * n) units off in every layer).
        dense_first_step: Keep every unit at the first position of each continuation (the authors' scripts).
        batch_size: Requests per forward pass (as lm-eval's --batch_size; no auto).
        limit: Documents per task (an integer), or a fraction below 1.
        num_fewshot: Few-shot examples (default: the task's).
        gen_kwargs: Generation arguments for generate_until tasks, as lm-eval's --gen_kwargs (e.g. max_gen_toks=64).
        include_path: More directories of lm-eval task YAMLs.
        data_dir: Directory holding truthfulqa/TruthfulQA.csv and gsm8k/test.jsonl (default ../shared/data,
            or $SPARSEACT_DATA_DIR).
        output_dir: Run directory (default runs/lmeval/<model>__<score>-<level>-<allocation>__<fingerprint>;
            level 0: runs/lmeval/<model>__dense__<fingerprint>).
        device: auto, cpu, cuda or cuda:N.
        ig_steps: Integrated-gradient steps (score ig).
        apply_chat_template: Format prompts with the tokenizer's chat template (lm-eval's option).
        progress: Show progress bars.
    """
    from pipeline.lmeval.run import run_lmeval

    run_lmeval(model, tasks, score, level, allocation, dense_first_step, batch_size, limit, num_fewshot, gen_kwargs,
               include_path, data_dir, output_dir, device, ig_steps, apply_chat_template, progress)


def main(argv: list[str] | None = None) -> None:
    import jsonargparse
    from jsonargparse import CLI

    try:
        # field docstrings in config.py become the --help text
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (AttributeError, TypeError):  # older jsonargparse
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    try:
        CLI({"run": run, "sweep": sweep, "report": report, "lmeval": lmeval}, args=argv, as_positional=False)
    except UserError as error:
        print(f"sparseact: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # the file system or the device said no: nothing the code can do about it
        where = f"{error.filename}: " if error.filename else ""
        print(f"sparseact: error: {where}{error.strerror or error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sparseact: interrupted; finished samples are saved, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
