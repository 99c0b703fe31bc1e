"""Multi-GPU scaling of a whole evaluation: the same run on 1 and on N GPUs (Lightning DDP).

Makes a randomly initialised model from a config (e.g. Phi-2's) once, saves it with a
tokenizer, then runs ``sparseact run`` on 1 GPU and on N GPUs over the same prompts
and reports samples/s, the speed-up, and whether both runs wrote the same records.

    python benchmarks/scaling.py --config .bench_assets/phi2 --tokenizer .bench_assets/tokenizer \
        --data .bench_assets/TruthfulQA.csv --questions 256 --gpus 2
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_model, record  # noqa: E402


def evaluate(model: Path, args, gpus: int, out: Path, launcher_name: str = "lightning") -> tuple[float, float, float | None]:
    """(rank 0's evaluation seconds, the command's wall seconds, rank 0's wait for the other ranks to
    load before the evaluation: None where not reported, i.e. one process or Lightning's launcher)."""
    # Lightning's launcher starts rank 1.. from rank 0 when the predict loop begins, so their
    # imports and model load come after rank 0's; torchrun (like srun) starts every rank at once
    launcher = [sys.executable, "-m", "pipeline"]
    if gpus > 1 and launcher_name == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                    "-m", "pipeline"]
    command = launcher + ["run", "--model.name", str(model), "--model.dtype", "bfloat16",
               "--model.template", "instruct", "--data.dataset", "truthfulqa", "--data.path", args.data,
               "--data.limit", str(args.questions), "--protocol.max_new_tokens", str(args.max_new_tokens),
               "--run.accelerator", "gpu", "--run.devices", str(gpus), "--run.output_dir", str(out),
               "--run.progress", "false"] + (["--run.strategy", "ddp"] if gpus > 1 else [])
    if out.exists():  # an earlier benchmark's run: it would be resumed, with nothing left to evaluate
        shutil.rmtree(out)
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - started
    (out.parent / f"{out.name}.log").write_text(result.stdout + result.stderr)
    for line in (result.stdout + result.stderr).splitlines():  # e.g. a capture that fell back to eager decoding
        if "Warning" in line and "CUDA graph" in line:
            print(f"{gpus} GPU(s): {line.strip()}")
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    predict = float(re.search(r"evaluated \d+ samples in ([\d.]+) s", result.stdout).group(1))
    waited = re.search(r"before that, ([\d.]+) s waiting for the other ranks", result.stdout)
    return predict, wall, float(waited.group(1)) if waited else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--launcher", nargs="+", choices=["lightning", "torchrun"], default=["lightning"],
                        help="who starts the ranks of the multi-GPU run (several: one run each)")
    parser.add_argument("--workdir", default="/tmp/sparseact-scaling")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    model = work / "model"
    make_model(args.config, args.tokenizer, model)

    one = evaluate(model, args, 1, work / "one")
    from pipeline.results.store import read_records

    keyed = lambda d: {(r.sample_id, r.metric, r.level): r.output for r in read_records(d)}  # noqa: E731
    a = keyed(work / "one")
    lines = [
        f"random {Path(args.config).name} (bf16), {args.questions} TruthfulQA prompts, T <= {args.max_new_tokens}, "
        "5 default scores x 10 levels",
        f"1 GPU:  predict {one[0]:.1f} s ({args.questions / one[0]:.2f} samples/s), wall {one[1]:.1f} s",
    ]
    for launcher in args.launcher:
        many = evaluate(model, args, args.gpus, work / f"many_{launcher}", launcher)
        b = keyed(work / f"many_{launcher}")
        same = sum(a[k] == b.get(k) for k in a)
        lines += [
            f"{args.gpus} GPUs ({launcher}): predict {many[0]:.1f} s ({args.questions / many[0]:.2f} samples/s), "
            + (f"after {many[2]:.1f} s waiting for the other ranks to load" if many[2] is not None else
               "the wait for the other ranks not measured (inside the prediction)") + f"; wall {many[1]:.1f} s",
            f"  speed-up {one[0] / many[0]:.2f}x (predict), {one[0] / (many[0] + (many[2] or 0.0)):.2f}x (predict and the wait), "
            f"{one[1] / many[1]:.2f}x (wall, incl. start-up and model load)",
            f"  records: {len(a)} vs {len(b)}; identical outputs for {same}/{len(a)} (bf16 kernels may differ by batch)",
        ]
    record(f"Scaling: 1 vs {args.gpus} GPUs", lines, "cuda", args.no_record)


if __name__ == "__main__":
    main()
