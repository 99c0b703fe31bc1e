"""One captured masked decoding step: the phase that dominates a GPU run (issue 14).

Builds a random model of a given shape and times one replayed masked step for ``rows``
rows two ways, in the same process: ``shared`` (the run's path,
``generation._masked_groups_shared``: the rows of a sample read its prefix once) and
``padded`` (the path before it, ``cuda_graph.decode_captured_padded``: every row holds
and reads its own copy of the prefix). Each is set against two limits measured in the
same process: the bytes the step must read (weights once, the cache columns) over the
copy bandwidth, and its FLOPs over the bf16 matmul rate. ``--profile`` then runs one
step eagerly under ``torch.profiler`` and lists where its GPU time goes, kernel by
kernel (a replay runs the same kernels without the host in between).

    python benchmarks/masked_step.py --config .bench_assets/phi2 --rows 640 --prefix 100 --profile
    python benchmarks/masked_step.py --config .bench_assets/phi2 --rows 640 1440 --paths shared --backends all math
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CUDNN_FIRST, matmul_rate  # noqa: E402

import pipeline.decoding.cuda_graph as cuda_graph  # noqa: E402
import pipeline.decoding.shared_prefix as shared_prefix  # noqa: E402
from pipeline.decoding.shared_prefix import Prefix, decoder_for, kv_geometry  # noqa: E402
from pipeline.hooks import UnitHooks  # noqa: E402
from pipeline.models.adapters import layout_for  # noqa: E402

BACKENDS = {
    "all": CUDNN_FIRST,
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


def limits(model, rows: int, cache_columns: int, attended: int, flop_rate: float,
           byte_rate: float) -> tuple[float, float]:
    """Seconds per step: (bytes read / bandwidth, FLOPs / matmul rate); ``cache_columns``: key/value
    columns read in all, ``attended``: columns each row's attention computes over."""
    layers, heads, kv_heads, head_dim = kv_geometry(model.config)
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    cache = layers * cache_columns * 2 * kv_heads * head_dim * size
    embedding = model.get_input_embeddings().weight.numel()
    matmul = 2 * rows * (sum(p.numel() for p in model.parameters()) - embedding)
    attention = 4 * rows * layers * heads * head_dim * attended
    return (weights + cache) / byte_rate, (matmul + attention) / flop_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config directory of the model shape")
    parser.add_argument("--rows", type=int, nargs="+", default=[640])
    parser.add_argument("--rows-per-sample", type=int, default=45, help="masked rows per sample (shared path)")
    parser.add_argument("--prefix", type=int, default=100, help="cached prefix width (capacity: + steps, to 64s)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of units kept per step")
    parser.add_argument("--paths", nargs="+", default=["shared", "padded"], choices=["shared", "padded"])
    parser.add_argument("--backends", nargs="+", default=["all"], choices=list(BACKENDS),
                        help="attention kernels of both captured steps (all: cuDNN first)")
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
    for backend in args.backends:
        cuda_graph.CAPTURE_BACKENDS = shared_prefix.ATTENTION_BACKENDS = BACKENDS[backend]
        for rows in args.rows:
            times = {}
            for path in args.paths:
                times[path] = time_step(model, hooks, path, rows, args, flop_rate, byte_rate, backend)
            if len(times) == 2 and None not in times.values():
                print(f"[{backend}] rows {rows}: shared / padded step time = {times['shared'] / times['padded']:.2f}")


def time_step(model, hooks, path: str, rows: int, args, flop_rate: float, byte_rate: float, backend: str):
    """Seconds per replayed step of one path, printed against its limits (None: not captured)."""
    layers, _, kv_heads, head_dim = kv_geometry(model.config)
    layout = hooks.layout
    graphs = cuda_graph.CapturedSteps(model)  # this shape's own
    width, steps = args.prefix, args.steps
    per_sample = args.rows_per_sample if path == "shared" else 1
    samples = rows // per_sample
    rows = samples * per_sample
    shape = (samples if path == "shared" else rows, kv_heads, width, head_dim)
    kv = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16), torch.randn(shape, device="cuda", dtype=torch.bfloat16))
          for _ in range(layers)]
    first = torch.randint(0, model.config.vocab_size, (rows, 1), device="cuda")
    heads = torch.rand(rows, steps, layers, layout.num_heads, device="cuda") < args.keep
    neurons = torch.rand(rows, steps, layers, layout.num_neurons, device="cuda") < args.keep
    eos = torch.empty(0, dtype=torch.long, device="cuda")
    if path == "shared":
        capacity = cuda_graph.padded_capacity(width)
        decoder = decoder_for(graphs, samples, per_sample, capacity, steps, layout)
        prefixes = [Prefix(kv, s, 0, width) for s in range(samples)]
        positions = torch.full((rows,), width, device="cuda")
        call = lambda: decoder.decode(prefixes, first, positions, steps, eos, heads, neurons, hooks)  # noqa: E731
        read = samples * capacity + rows * steps  # every sample's prefix once, every row's own columns
        attended = capacity + per_sample * steps
    else:
        mask = torch.ones(rows, width, dtype=torch.long, device="cuda")
        mask[::2, : width // 4] = 0  # half the rows left-padded by a quarter
        positions = mask.sum(1)
        call = lambda: cuda_graph.decode_captured_padded(graphs, kv, mask, positions, first, steps, eos,  # noqa: E731
                                                         heads, neurons, hooks)
        capacity = cuda_graph.padded_capacity(width + steps)
        decoder = None
        read, attended = rows * capacity, capacity
    try:
        if call() is None:
            raise RuntimeError("not captured (see the warning)")
    except Exception as error:  # noqa: BLE001 - a benchmark reports and goes on
        print(f"[{backend}] {path} rows {rows}: {type(error).__name__}: {error}")
        return None
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    memory, compute = limits(model, rows, read, attended, flop_rate, byte_rate)
    print(f"[{backend}] {path} rows {rows} ({samples} samples), prefix capacity {capacity}: "
          f"{per_step * 1e3:.2f} ms per replayed step; limits: bytes {memory * 1e3:.2f} ms, "
          f"FLOPs {compute * 1e3:.2f} ms -> {max(memory, compute) / per_step:.0%} of the larger")
    if args.profile:
        if decoder is None:
            decoder = next(d for k, d in graphs.decoders.items() if k[0] == "padded")
            reset = lambda: decoder._start(kv, first, mask, positions)  # noqa: E731
        else:
            reset = lambda: decoder._start(prefixes, first, positions)  # noqa: E731
        profile_step(decoder, hooks, heads, neurons, reset)
    kv = decoder = graphs = None  # free the caches before the next shape
    torch.cuda.empty_cache()
    return per_step


def profile_step(decoder, hooks, heads, neurons, reset) -> None:
    """One eager step of a captured decoder under the profiler: GPU time per kernel. ``reset``
    puts the decoder back at its first step (its cache has no columns past the last)."""
    from torch.nn.attention import sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    decoder.masks.load(heads[:, 0], neurons[:, 0])
    with sdpa_kernel(shared_prefix.ATTENTION_BACKENDS):
        reset()
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
