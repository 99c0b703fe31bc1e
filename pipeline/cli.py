"""The ``sparseact`` command. Subcommands are typed functions; jsonargparse turns their
signatures and docstrings into flags, ``--config`` YAML files and ``--print_config``."""

from __future__ import annotations

import sys

from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig
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
    models: list[ModelConfig] = [ModelConfig(name="smollm2-135m"), ModelConfig(name="gemma3-270m")],  # noqa: B006
    datasets: list[DataConfig] = [DataConfig()],  # noqa: B006
    protocol: ProtocolConfig = ProtocolConfig(),
    run: RunConfig = RunConfig(),
    root: str = "runs/sweep",
    slurm: bool = False,
) -> None:
    """Run every model on every dataset, one run directory per cell under ``root``.

    A killed sweep rerun with the same file finishes only what is missing.

    Args:
        models: Models, each as in ``sparseact run --model``.
        datasets: Datasets, each as in ``sparseact run --data``.
        protocol: One protocol for every cell.
        run: Hardware and batch options for every cell (output_dir is set per cell).
        root: Directory that holds one run directory per (model, dataset) cell.
        slurm: Write one config per cell and the job-array command instead of running.
    """
    from pipeline.sweep import run_sweep

    run_sweep(models, datasets, protocol, run, root, slurm)


def report(runs: list[str] | str, output: str | None = None, heatmap_metric: str = "static", heatmap_level: float = 0.5) -> None:
    """Summarise run directories (or sweep roots) in one report.html and report.md.

    Args:
        runs: A run directory, a directory of runs (a sweep root), or a list of them.
        output: Directory for report.html and report.md (default: the first argument).
        heatmap_metric: Score whose per-layer kept fractions the heatmap shows (a run without it
            shows its first score). Default static: its thresholds are calibrated per layer, while
            the top-k scores keep the same fraction of every layer by construction.
        heatmap_level: Sparsity level the heatmap shows.
    """
    from pipeline.results.report import write_report

    write_report([runs] if isinstance(runs, str) else runs, output, heatmap_metric, heatmap_level)


def main(argv: list[str] | None = None) -> None:
    import jsonargparse
    from jsonargparse import CLI

    try:
        # field docstrings in config.py become the --help text
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (AttributeError, TypeError):  # older jsonargparse
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    try:
        CLI({"run": run, "sweep": sweep, "report": report}, args=argv, as_positional=False)
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
