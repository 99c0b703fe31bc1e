"""Print the numbers behind the README's "Results" section from the published runs.

For every (model, dataset) under results/paper_slm (CPU) and results/paper_ig (GPU, adds
IG): the highest achieved sparsity within 5% BLEU loss against the dense output per
score, with its 95% bootstrap interval over questions, and fidelity and task score at
level 0.5. Run from the repository root: python results/claims.py
"""

from pathlib import Path

from pipeline.errors import UserError
from pipeline.results.report import RunData, find_runs, load_runs, text_report
from pipeline.results.summary import LOSS_LABEL

ROOT = Path(__file__).resolve().parent


def fmt(point, low, high, digits=3):
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def main() -> None:
    cells: dict[tuple, dict] = {}
    for run_dir in find_runs([str(ROOT / "paper_slm"), str(ROOT / "paper_ig")]):
        try:
            run = RunData(run_dir)
        except UserError as error:  # a run still starting
            print(f"skipped: {error}")
            continue
        cell = cells.setdefault((run.model, run.dataset), {})
        for m, metric in enumerate(run.metrics):
            # the CPU run is the reference; the GPU run only adds the scores it lacks (IG)
            if metric in cell:
                continue
            level = run.at_level(m, 0.5)
            cell[metric] = {"headline": run.headline(m), "samples": len(run.samples), "at_half": level,
                            "where": run_dir.parent.name}
    print(f"| model | dataset | score | questions | max sparsity within {LOSS_LABEL} loss [95%] "
          "| at p=0.5: achieved sparsity, BLEU vs dense [95%], task score [95%] (dense) |")
    print("|---|---|---|---|---|---|")
    for (model, dataset), cell in sorted(cells.items()):
        for metric, row in sorted(cell.items(), key=lambda kv: -kv[1]["headline"][0]):
            half = row["at_half"]
            at_half = (f"{half['sparsity']:.3f}, {fmt(*half['bleu'], digits=1)}, "
                       f"{fmt(*half['task'], digits=1)} ({half['dense_task'][0]:.1f})") if half else "-"
            gpu = " (GPU)" if row["where"] == "paper_ig" else ""
            print(f"| {model} | {dataset} | {metric}{gpu} | {row['samples']} | {fmt(*row['headline'])} | {at_half} |")
    # scores x allocations (README "How sparse can these SLMs get?"): the report's matrix and headroom table
    allocation = (load_runs([str(ROOT / "allocation")])  # loaded once, used twice
                  if any((ROOT / "allocation").rglob("run.json")) else [])
    if allocation:
        print()
        print(text_report(allocation))
    if any((ROOT / "lm_eval" / "runs").rglob("run.json")):
        print()
        lm_eval_table(allocation)


def lm_eval_table(allocation: list[RunData]) -> None:
    """README "lm-eval results": TruthfulQA MC1/MC2 accuracy (lm-eval, first 200 questions) and the
    agreement of the MC1 choice with the dense model's, next to the BLEU of the generated answer
    against the dense one (``sparseact run``, per_layer, first 100 questions) for the same model,
    score and level (``allocation``: the loaded results/allocation runs); then GSM8K (first 50) exact match next to the BLEU of lm-eval's own
    generations against the dense model's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", ROOT / "lm_eval" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    cells = summarize.collect(ROOT / "lm_eval" / "runs")
    generation = {run.model: run for run in allocation}
    print("| model | score | p | MC1 acc [95%] | MC2 acc [95%] | MC1 same choice as dense [95%] "
          "| BLEU vs dense, generated answers [95%] |")
    print("|---|---|---|---|---|---|---|")
    for model in sorted({m for m, _ in cells}):
        mc1, mc2 = cells.get((model, "truthfulqa_mc1_local"), {}), cells.get((model, "truthfulqa_mc2_local"), {})
        for key in sorted(mc1, key=lambda k: (k[0] != "dense", k)):
            acc1 = fmt(*summarize.interval([d["score"] for d in mc1[key].values()]))
            acc2 = fmt(*summarize.interval([d["score"] for d in mc2[key].values()])) if key in mc2 else "-"
            dense = mc1.get(("dense", 0.0))
            same = fmt(*summarize.interval(summarize.fidelity("truthfulqa_mc1_local", mc1[key], dense))) if dense else "-"
            run, bleu = generation.get(model), "-"
            score, level = key
            if run is not None and score != "dense" and score in run.metrics:
                half = run.at_level(run.metrics.index(score), level)
                bleu = fmt(*half["bleu"], digits=1) if half and half["bleu"] else "-"
            print(f"| {model} | {score} | {level} | {acc1} | {acc2} | {same} | {bleu} |")
    print()
    print("| model | score | p | GSM8K exact match [95%] | BLEU vs dense, lm-eval's GSM8K generations [95%] |")
    print("|---|---|---|---|---|")
    for model in sorted({m for m, _ in cells}):
        gsm8k = cells.get((model, "gsm8k_local"), {})
        dense = gsm8k.get(("dense", 0.0))
        for key in sorted(gsm8k, key=lambda k: (k[0] != "dense", k)):
            acc = fmt(*summarize.interval([d["score"] for d in gsm8k[key].values()]))
            bleu = fmt(*summarize.interval(summarize.fidelity("gsm8k_local", gsm8k[key], dense)), digits=1) if dense else "-"
            print(f"| {model} | {key[0]} | {key[1]} | {acc} | {bleu} |")


if __name__ == "__main__":
    main()
