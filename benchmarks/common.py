"""Shared set-up for the benchmarks: models, prompts, labels, and RESULTS.md entries."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

ROOT = Path(__file__).resolve().parents[1]
TRUTHFULQA = ROOT / ".." / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m", help="bundled name, HF id/path, or random:<config.json>")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for random models")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--data", default=str(TRUTHFULQA))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return parser


def load(args):
    """(model, tokenizer, template) on the requested device and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import ModelConfig
    from pipeline.models.loading import DTYPES, load_model
    from pipeline.models.prompts import resolve_template

    dtype = DTYPES[args.dtype]
    if args.model.startswith("random:"):
        config = AutoConfig.from_pretrained(args.model.split(":", 1)[1])
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return model, tokenizer, "Instruct: {question}\nOutput:"
    loaded = load_model(ModelConfig(name=args.model, dtype=args.dtype), device=args.device)
    return loaded.model, loaded.tokenizer, resolve_template("auto", loaded.tokenizer)


def prompts_and_labels(model, tokenizer, template, args):
    """TruthfulQA prompts and the dense greedy labels (T = Best Answer length, capped)."""
    import csv

    from pipeline.decoding.cuda_graph import CapturedSteps
    from pipeline.decoding.generation import greedy_generate
    from pipeline.models.prompts import answer_length, prompt_ids, stop_token_ids

    # csv rather than the datasets library: GPU images often lack it
    with open(args.data, newline="") as handle:
        rows = list(csv.DictReader(handle))[: args.questions]
    stop = stop_token_ids(tokenizer, model)
    prompts, labels = [], []
    graphs = CapturedSteps(model)  # the labels' captured steps, kept from one question to the next
    for row in rows:
        prompt = torch.tensor(prompt_ids(tokenizer, template, row["Question"]))
        steps = answer_length(tokenizer, row["Best Answer"], args.max_new_tokens)
        # Random models never say end-of-sequence; real ones stop where they stop.
        labels.append(torch.tensor(greedy_generate(model, prompt, steps, stop, graphs=graphs)[0]))
        prompts.append(prompt)
    return prompts, labels


def synchronize(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def machine(device) -> str:
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch {torch.__version__}"
    cores = len(__import__("os").sched_getaffinity(0))
    return f"CPU {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}"


def record(title: str, lines: list[str], device, skip: bool) -> None:
    text = "\n".join(lines)
    print(text)
    if skip:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    entry = (f"\n## {title}\n\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
             f"- command: `{' '.join(['python'] + sys.argv)}`\n- machine: {machine(device)}\n- commit: {commit or 'n/a'}\n\n"
             f"```\n{text}\n```\n")
    with (ROOT / "benchmarks" / "RESULTS.md").open("a") as handle:
        handle.write(entry)


def dump(obj) -> str:
    return json.dumps(obj, indent=1)


# Attention kernels in PyTorch's order of preference, cuDNN's included (the levers that put it back)
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def matmul_rate(device="cuda") -> float | None:
    """Measured bf16 matrix-product rate (FLOP/s) of ``device`` on random data, the limit speed
    figures are compared with; None on a CPU."""
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(10)], device)
    return 10 * 2 * 8192**3 / seconds


def make_model(config_dir: str, tokenizer_dir: str, target: Path, dtype: str = "bfloat16") -> None:
    """A randomly initialised model of ``config_dir``'s shape saved with a tokenizer at ``target``
    (once: an existing one is kept), made on the GPU where there is one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=getattr(torch, dtype))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    del model
