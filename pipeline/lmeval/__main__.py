"""``python -m pipeline.lmeval ARGS``: lm-eval's own command line with the ``sparseact`` model registered.

lm-eval 0.4.x finds models only in its registry (no entry points, and ``--include_path``
loads tasks, not models), so the plain ``lm_eval`` command cannot see a model defined
outside its source tree. This runs ``lm_eval``'s CLI unchanged (same arguments, same
output) after importing ``pipeline.lmeval.model``, and adds ``--include_path
configs/lm_eval/tasks`` (the offline tasks) when no include path is given.

    python -m pipeline.lmeval --model sparseact \\
        --model_args pretrained=smollm2-135m,score=wina,level=0.5,allocation=per_layer \\
        --tasks truthfulqa_mc1_local --limit 20 --device cpu --batch_size 4
"""

from __future__ import annotations

import sys

from pipeline.errors import UserError


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pipeline.lmeval.run import TASKS_DIR, require_lm_eval

    try:
        require_lm_eval()
        import pipeline.lmeval.model  # noqa: F401  (registers "sparseact")
        from lm_eval.__main__ import cli_evaluate

        if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv) and \
                (not argv or argv[0] not in ("-h", "--help")):
            argv += ["--include_path", str(TASKS_DIR)]
        sys.argv = ["lm-eval", *argv]
        cli_evaluate()
    except UserError as error:
        print(f"sparseact: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
