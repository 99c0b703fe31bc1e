"""One captured masked decoding step: the phase that dominates a GPU run (issue 14).

Builds a random model of a given shape, fills a padded static cache for ``rows`` masked
rows, and times ``decode_captured_padded`` (the code path of ``_masked_groups_captured``)
per replayed step against two limits measured in the same process: the bytes the step
must read (weights once, every row's cache columns) over the copy bandwidth, and its
FLOPs over the bf16 matmul rate. ``--profile`` then runs one step eagerly under
``torch.profiler`` and lists where its GPU time goes, kernel by kernel (a replay runs
the same kernels without the host in between).

    python benchmarks/masked_step.py --config .bench_assets/phi2 --rows 640 --prefix 100 --profile
    python benchmarks/masked_step.py --config .bench_assets/phi2 --rows 320 640 1280 --backends all math
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_rate  # noqa: E402

import pipeline.decoding.cuda_graph as cuda_graph  # noqa: E402
from pipeline.hooks import UnitHooks  # noqa: E402
from pipeline.models.adapters import layout_for  # noqa: E402

BACKENDS = {
    "all": None,  # the default: every kernel, in PyTorch's order of preference
    "math": [SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
}


def rates() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device copy bytes/s), measured."""
    flops = matmul_rate()
    x, y = (torch.empty(2**30, device="cuda", dtype=torch.uint8) for _ in range(2))
    x.copy_(y)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        x.copy_(y)
    torch.cuda.synchronize()
    return flops, 10 * 2 * 2**30 / (time.perf_counter() - start)


def limits(model, rows: int, capacity: int, flop_rate: float, byte_rate: float) -> tuple[float, float]:
    """Seconds per step: (bytes read / bandwidth, FLOPs / matmul rate)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    cache = rows * config.num_hidden_layers * capacity * 2 * kv_heads * head_dim * size
    embedding = model.get_input_embeddings().weight.numel()
    matmul = 2 * rows * (sum(p.numel() for p in model.parameters()) - embedding)
    attention = 4 * rows * config.num_hidden_layers * heads * head_dim * capacity
    return (weights + cache) / byte_rate, (matmul + attention) / flop_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config directory of the model shape")
    parser.add_argument("--rows", type=int, nargs="+", default=[640])
    parser.add_argument("--prefix", type=int, default=100, help="cached prefix width (capacity: + steps, to 64s)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of units kept per step")
    parser.add_argument("--backends", nargs="+", default=["all"], choices=list(BACKENDS))
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config), dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    layout = layout_for(model)
    hooks = UnitHooks(layout).install()
    flop_rate, byte_rate = rates()
    print(f"{torch.cuda.get_device_name()}: matmul {flop_rate / 1e12:.0f} TFLOP/s, copy {byte_rate / 1e12:.2f} TB/s; "
          f"attention {model.config._attn_implementation}")
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    L = config.num_hidden_layers
    for backend in args.backends:
        cuda_graph.CAPTURE_BACKENDS = BACKENDS[backend] or cuda_graph.CAPTURE_BACKENDS_DEFAULT
        for rows in args.rows:
            model.__dict__.pop("_sparseact_decoders", None)
            width = args.prefix
            kv = [(torch.randn(rows, kv_heads, width, head_dim, device="cuda", dtype=torch.bfloat16),
                   torch.randn(rows, kv_heads, width, head_dim, device="cuda", dtype=torch.bfloat16)) for _ in range(L)]
            mask = torch.ones(rows, width, dtype=torch.long, device="cuda")
            mask[::2, : width // 4] = 0  # half the rows left-padded by a quarter
            positions = mask.sum(1)
            first = torch.randint(0, config.vocab_size, (rows, 1), device="cuda")
            heads = torch.rand(rows, args.steps, L, layout.num_heads, device="cuda") < args.keep
            neurons = torch.rand(rows, args.steps, L, layout.num_neurons, device="cuda") < args.keep
            eos = torch.empty(0, dtype=torch.long, device="cuda")
            call = lambda: cuda_graph.decode_captured_padded(model, kv, mask, positions, first, args.steps, eos,  # noqa: E731
                                                             heads, neurons, hooks)
            if call() is None:
                print(f"[{backend}] rows {rows}: the padded step was not captured (see the warning)")
                model.__dict__.pop("_sparseact_no_graphs", None)
                continue
            torch.cuda.synchronize()
            start = time.perf_counter()
            _, cache = call()
            torch.cuda.synchronize()
            per_step = (time.perf_counter() - start) / args.steps
            capacity = cache.layers[0].keys.shape[-2]
            memory, compute = limits(model, rows, capacity, flop_rate, byte_rate)
            print(f"[{backend}] rows {rows}, capacity {capacity}: {per_step * 1e3:.2f} ms per replayed step; "
                  f"limits: bytes {memory * 1e3:.2f} ms, FLOPs {compute * 1e3:.2f} ms -> "
                  f"{max(memory, compute) / per_step:.0%} of the larger")
            if args.profile:
                profile_step(model, hooks, rows, capacity, heads, neurons)
            kv = cache = None  # free the static caches before the next shape
            model.__dict__.pop("_sparseact_decoders", None)
            torch.cuda.empty_cache()


def profile_step(model, hooks, rows: int, capacity: int, heads, neurons) -> None:
    """One eager step of the captured decoder under the profiler: GPU time per kernel."""
    from torch.nn.attention import sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    decoder = next(d for k, d in model.__dict__["_sparseact_decoders"].items() if k[1] == rows and k[3] == capacity)
    decoder.masks.load(heads[:, 0], neurons[:, 0])
    with sdpa_kernel(cuda_graph.CAPTURE_BACKENDS):
        decoder._step(hooks)  # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder._step(hooks)
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    total = sum(getattr(e, key) for e in events)
    print(f"  one eager step: {total / 1e3:.2f} ms of GPU kernels")
    for event in sorted(events, key=lambda e: -getattr(e, key))[:14]:
        time_us = getattr(event, key)
        if time_us <= 0:
            break
        print(f"  {time_us / 1e3:7.2f} ms {time_us / total:6.1%}  x{event.count:<4} {event.key[:110]}")


if __name__ == "__main__":
    main()
