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


def main(argv: list[str] | None = None) -> None:
    import jsonargparse
    from jsonargparse import CLI

    try:
        # field docstrings in config.py become the --help text
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (AttributeError, TypeError):  # older jsonargparse
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    try:
        CLI({"run": run}, args=argv, as_positional=False)
    except UserError as error:
        print(f"sparseact: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sparseact: interrupted; finished samples are saved, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
