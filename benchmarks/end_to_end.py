"""A whole ``sparseact run``, in-process, timed phase by phase.

Calls ``pipeline.runner.run.evaluate`` (what ``sparseact run`` calls) with the
functions of each phase wrapped by a timer, and prints per phase its seconds and
share of the run, the GPU busy fraction over the prediction (NVML, sampled in a
thread), samples/s, and the ratio of the prediction time to its FLOP limit (issue 14:
per sample (T dense steps + 3 x attributed positions + decoded masked rows x T) x 2 x
non-embedding parameters, over the measured bf16 matmul rate).

Phases: ``load`` (questions, model), ``start-up`` (Lightning's strategy: with DDP the process
group), ``dense labels``, ``attribution``, ``masks``,
``masked decoding``, ``records`` (row numbers on the device: ``measures/mask_stats.py``; records on the host),
``writing`` (records, summary, plot), ``host wait`` (for the record writer's thread,
which on a GPU builds and writes batch k while batch k+1 computes; what that thread
spends is listed apart), ``teardown`` (Lightning's end of predict), ``barrier`` (DDP: waiting
for the other ranks), ``other`` (the rest: Lightning, calibration). With ``--sync`` (default on a
GPU) the timer synchronises CUDA at each phase edge, so GPU work is charged to the
phase that queued it.

    python benchmarks/end_to_end.py --questions 4 --max-new-tokens 4            # CPU, bundled SmolLM2, demo
    python benchmarks/end_to_end.py --config .bench_assets/phi2 --tokenizer .bench_assets/tokenizer \
        --data .bench_assets/TruthfulQA.csv --questions 256 --max-new-tokens 16 --dtype bfloat16
    ... --metrics ig            # the five default scores and IG
    ... --gpus 2                # Lightning DDP over two GPUs (each rank times its own phases)
    ... --per-block --json F    # each block's device time; benchmarks/block_deal.py replays them on N ranks
    ... --variants all off:masked_groups off:dense_graphs none   # several runs, levers switched off
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

_STARTED = time.perf_counter()
import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CUDNN_FIRST, machine, make_model, matmul_rate, record  # noqa: E402

import pipeline.protocol as protocol_module  # noqa: E402
import pipeline.runner.callbacks as callbacks_module  # noqa: E402
import pipeline.runner.run as run_module  # noqa: E402

IMPORT_S = time.perf_counter() - _STARTED
RANK = int(os.environ.get("LOCAL_RANK", "0"))  # this process's rank on its machine (a DDP run's ranks each time theirs)
LAUNCH = os.environ.get("TORCHELASTIC_RUN_ID", "")  # the same on every rank of one torchrun launch
PHASES = ["load", "start-up", "dense labels", "attribution", "masks", "masked decoding", "records", "writing", "host wait",
          "teardown", "barrier"]
# lever name -> (module, attribute, value when switched off)
LEVERS = {
    "dense_graphs": ("pipeline.decoding.generation", "DENSE_GRAPHS", False),
    "masked_groups": ("pipeline.decoding.generation", "MASKED_GROUPS", False),
    "background_records": ("pipeline.runner.callbacks", "BACKGROUND_ON_ACCELERATORS", False),
    "switch_interval": ("pipeline.runner.callbacks", "RECORD_THREAD_SWITCH_S", None),  # off: Python's 5 ms
    "records_after_launches": ("pipeline.runner.callbacks", "RECORDS_AFTER_LAUNCHES", False),
    "keep_on_device": ("pipeline.runner.module", "KEEP_ON_DEVICE_AT_TEARDOWN", False),
    "no_cudnn": ("pipeline.runner.module", "NO_CUDNN_ATTENTION", False),
    "no_cudnn_attribution": ("pipeline.scores.exact_attention", "CUDNN_ATTENTION", True),
    "batch64": None,  # off: the former default GPU block of 16 samples
    # attention kernels of the captured decoding steps: off = cuDNN's first in the dense (padded) step,
    # or in the masked (shared-prefix) step; or the unfused (math) one only in the dense step
    "capture_without_cudnn": ("pipeline.decoding.cuda_graph", "CAPTURE_BACKENDS", CUDNN_FIRST),
    "shared_no_cudnn": ("pipeline.decoding.shared_prefix", "ATTENTION_BACKENDS", CUDNN_FIRST),
    "capture_fused": ("pipeline.decoding.cuda_graph", "CAPTURE_BACKENDS", [SDPBackend.MATH]),
    "gc_freeze": ("pipeline.runner.run", "FREEZE_OBJECTS_IN_PREDICT", False),
    # off: --run.strategy ddp is Lightning's own DDPStrategy (NCCL, rank 0's weights sent to the
    # other ranks) instead of runner/strategy.py's
    "predict_ddp": ("pipeline.runner.run", "strategy_for", lambda name: name),
}


class Timer:
    """Seconds per phase; wraps module attributes so that every call of them is charged."""

    def __init__(self, sync: bool):
        self.sync = sync and torch.cuda.is_available()
        self.seconds = {p: 0.0 for p in PHASES}
        self.background = {}  # phases run in the record writer's thread, overlapping the others
        self.depth = 0
        self.first_batch = None
        self.teardown_start = None
        self.shapes = []  # per sample: (prompt tokens, dense tokens)
        self.captures = [0, 0.0]  # CUDA graphs captured, and their seconds (inside the phases above)
        self.detail = {}  # --detail: seconds of named steps inside the phases
        self.blocks = []  # --per-block: each predict step's device work, synchronised at its edges
        self._undo = []

    def _edge(self):
        if self.sync:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name):
        if threading.current_thread() is not threading.main_thread():  # the writer's host work: not synchronised
            start = time.perf_counter()
            try:
                yield
            finally:
                self.background[name] = self.background.get(name, 0.0) + time.perf_counter() - start
            return
        if self.depth:  # nested (e.g. records inside writing): charged to the outer phase
            yield
            return
        self.depth += 1
        self._edge()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase: {name}"):  # a no-op unless a profiler runs (--trace)
                yield
        finally:
            self._edge()
            self.seconds[name] += time.perf_counter() - start
            self.depth -= 1

    def wrap(self, owner, attribute: str, name: str, before=None, after=None):
        if not hasattr(owner, attribute):
            return
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            if before:
                before(*args, **kwargs)
            with self.phase(name):
                result = original(*args, **kwargs)
            if after:
                after(result, *args, **kwargs)
            return result

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original))

    def wrap_timed(self, owner, attribute: str, add):
        """Also time every call of ``owner.attribute`` on its own (synchronised at its edges), inside its
        phase; ``add(seconds)`` records each."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            self._edge()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._edge()
                add(time.perf_counter() - start)

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original))

    def add_detail(self, name: str, seconds: float) -> None:
        self.detail[name] = self.detail.get(name, 0.0) + seconds

    def add_capture(self, seconds: float) -> None:
        self.captures[0] += 1
        self.captures[1] += seconds

    def undo(self):
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)
        self._undo.clear()


# --detail: steps inside the phases, each timed on its own: (module, attribute (dotted within it), name)
DETAIL = [
    ("pipeline.decoding.generation", "decode_captured_padded", "dense labels: padded steps incl. capture"),
    ("pipeline.decoding.generation", "_masked_works", "masked: per-sample work"),
    ("pipeline.decoding.shared_prefix", "SharedPrefixCache.start", "masked: prefixes gathered"),
    ("pipeline.decoding.shared_prefix", "SharedPrefixDecoder._capture", "masked: capture"),
    ("pipeline.decoding.cuda_graph", "replay_steps", "decoding: replayed steps"),
    ("pipeline.decoding.shared_prefix", "replay_steps", "decoding: replayed steps"),  # imported by name there
    ("pipeline.measures.mask_stats", "oracle_overlaps", "records: oracle pairs"),
    ("pipeline.protocol", "prompt_ids", "prompts: tokenised"),
    ("pipeline.protocol", "answer_length", "prompts: answer lengths"),
]


def install_detail(timer: Timer) -> None:
    import functools
    import importlib

    for module_name, dotted, name in DETAIL:
        *owners, attribute = dotted.split(".")
        owner = functools.reduce(getattr, owners, importlib.import_module(module_name))
        timer.wrap_timed(owner, attribute, functools.partial(timer.add_detail, name))


def install(timer: Timer) -> None:
    import lightning.pytorch.strategies.strategy as strategy_module

    def first(*args, **kwargs):
        if timer.first_batch is None:
            timer._edge()
            timer.first_batch = time.perf_counter()

    def shapes(result, model, prompts, *_):
        timer.shapes += [(len(p), len(d.tokens)) for p, d in zip(prompts, result)]

    def teardown_start(*args, **kwargs):
        timer._edge()
        timer.teardown_start = time.perf_counter()

    timer.wrap(run_module, "load_model", "load")
    timer.wrap(run_module, "load_samples", "load")
    timer.wrap(protocol_module, "dense_generate_batch", "dense labels", before=first, after=shapes)
    timer.wrap(protocol_module, "_attribute_fitting", "attribution")
    timer.wrap(protocol_module, "_keep_masks", "masks")
    timer.wrap(protocol_module, "masked_after_dense_batch", "masked decoding")
    timer.wrap(protocol_module, "row_stats", "records")
    timer.wrap(protocol_module, "_records", "records")
    timer.wrap(callbacks_module, "append_records", "writing")
    timer.wrap(callbacks_module, "save_scores", "writing")
    timer.wrap(callbacks_module.RecordWriter, "wait", "host wait")  # for the writer thread's previous batch
    timer.wrap(run_module, "read_records", "writing")
    timer.wrap(run_module, "write_summary", "writing")
    timer.wrap(run_module, "plot_curves", "writing")
    timer.wrap(strategy_module.Strategy, "teardown", "teardown", before=teardown_start)
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from pipeline.runner.strategy import PredictDDPStrategy

    for strategy in (strategy_module.Strategy, SingleDeviceStrategy, DDPStrategy, PredictDDPStrategy):  # own overrides
        for attribute in ("setup_environment", "setup"):
            if attribute in vars(strategy):
                timer.wrap(strategy, attribute, "start-up")
    timer.wrap(DDPStrategy, "barrier", "barrier")
    import pipeline.decoding.cuda_graph as cuda_graph_module
    import pipeline.decoding.shared_prefix as shared_prefix_module

    for owner in (cuda_graph_module, shared_prefix_module):  # each imported `capture` by name
        timer.wrap_timed(owner, "capture", timer.add_capture)


class GarbageCollections:
    """Seconds Python's cyclic garbage collector ran during the run (any thread), by generation:
    a full collection scans every tracked object of the process (the model's modules included)."""

    def __init__(self):
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self.full = []  # (start, seconds) of each full collection
        self._start = 0.0

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1
            if info["generation"] == 2:
                self.full.append((self._start, time.perf_counter() - self._start))

    def in_window(self, start: float, end: float) -> list[float]:
        return [seconds for begun, seconds in self.full if start <= begun <= end]

    def __enter__(self):
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._callback)


class GpuBusy:
    """NVML utilisation (fraction of time a kernel ran) sampled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.05):
        self.samples: list[tuple[float, int]] = []
        self.interval = interval
        self._stop = threading.Event()
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                index = int(visible.split(",")[index])
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        except Exception as error:  # noqa: BLE001 - no NVML: no busy fraction
            print(f"no GPU busy fraction ({type(error).__name__}: {error})")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter(), self._read()))

    def __enter__(self):
        if self.handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def fraction(self, start, end) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return sum(inside) / len(inside) / 100 if inside else None


def set_levers(off: set[str]) -> dict:
    """Switch off the named levers; returns what to restore."""
    import importlib

    previous = {}
    for name in off:
        if LEVERS.get(name) is None:
            continue
        module_name, attribute, value = LEVERS[name]
        module = importlib.import_module(module_name)
        if hasattr(module, attribute):
            previous[(module_name, attribute)] = getattr(module, attribute)
            setattr(module, attribute, value)
    return previous


def restore_levers(previous: dict) -> None:
    import importlib

    for (module_name, attribute), value in previous.items():
        setattr(importlib.import_module(module_name), attribute, value)


def attribution_flops(shapes, metrics, parameters, ig_steps, layers) -> float:
    """FLOPs of the attribution passes: a forward and a backward over every attributed position
    (3 x 2N per position), and with ig, that again per layer, unit kind and IG step."""
    total = 0.0
    for prompt, T in shapes:
        positions = prompt + T - 1
        passes = 1 + (2 * layers * ig_steps if "ig" in metrics else 0)
        total += passes * 3 * positions * 2 * parameters
    return total


def flop_limit(shapes, metrics, levels, parameters, ig_steps, layers) -> float:
    """FLOPs of one run as issue 14 counts them (forward 2N per token, backward twice that): the
    dense steps, the attribution passes and every masked row's steps."""
    masked_rows = sum(1 for m in metrics for p in levels if p > 0 or m == "static")
    decoded = sum((1 + masked_rows) * T for _, T in shapes) * 2 * parameters
    return decoded + attribution_flops(shapes, metrics, parameters, ig_steps, layers)


def one_run(args, label: str, off: set[str], model_name: str, rate, gpus: int, first_question: int = 0,
            last: bool = True) -> dict:
    from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig
    from pipeline.scores.metrics import DEFAULT_METRICS

    metrics = list(DEFAULT_METRICS) + [m for m in args.metrics if m not in DEFAULT_METRICS]
    out = Path(args.workdir) / f"run_{_file_label(label)}_{gpus}gpu"
    if out.exists() and RANK == 0:  # an earlier variant of this process (one GPU: see main)
        shutil.rmtree(out)
    data = (DataConfig(dataset="demo", start=first_question, limit=args.questions) if args.data == "demo" else
            DataConfig(dataset="truthfulqa", path=args.data, start=first_question, limit=args.questions))
    batch = args.batch_size or (16 if "batch64" in off and torch.cuda.is_available() else None)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    run_config = RunConfig(output_dir=str(out), accelerator=accelerator, devices=gpus, progress=False,
                           plot=args.plot, batch_size=batch, strategy="ddp" if gpus > 1 else "auto")
    model_config = ModelConfig(name=model_name, dtype=args.dtype,
                               template="instruct" if args.config else "auto")
    protocol = ProtocolConfig(metrics=metrics, max_new_tokens=args.max_new_tokens, ig_steps=args.ig_steps)

    previous = set_levers(off)
    timer = Timer(args.sync)
    install(timer)
    if args.detail:
        install_detail(timer)
    if args.per_block:
        import pipeline.runner.module as module_module

        timer.wrap_timed(module_module, "decode_batch", timer.blocks.append)
    profiler = None
    if args.profile and RANK == 0:
        import cProfile

        profiler = cProfile.Profile()
    tracer = None
    if args.trace and RANK == 0 and last:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        tracer = torch.profiler.profile(activities=activities)
    try:
        with GpuBusy() as busy, GarbageCollections() as collections, tracer or nullcontext():
            allocator = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            run_module.evaluate(model_config, data, protocol, run_config)
            if profiler:
                profiler.disable()
            total = time.perf_counter() - start
    finally:
        timer.undo()
        restore_levers(previous)
        import gc

        gc.collect()  # the run's model and captured graphs, before the next variant loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if allocator:  # the caching allocator's calls to the driver during the run
        after = torch.cuda.memory_stats()
        allocator = {key: after.get(key, 0) - allocator.get(key, 0)
                     for key in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
        allocator["reserved_peak_gib"] = after.get("reserved_bytes.all.peak", 0) / 2**30
    end_of_prediction = timer.teardown_start or time.perf_counter()
    prediction = end_of_prediction - (timer.first_batch or start)
    samples = len(timer.shapes)
    result = {"label": label, "off": sorted(off), "total_s": total, "prediction_s": prediction, "samples": samples,
              "phases": dict(timer.seconds), "background": dict(timer.background), "busy": busy.fraction(timer.first_batch or start, end_of_prediction),
              "shapes": timer.shapes, "metrics": metrics, "levels": protocol.levels, "captures": timer.captures,
              "gc": [collections.counts, collections.seconds], "allocator": allocator,
              "gc_in_prediction": collections.in_window(timer.first_batch or start, end_of_prediction),
              "first_question": first_question, "detail": dict(timer.detail), "blocks": timer.blocks}
    if profiler:
        write_profile(profiler, Path(args.profile), label)
    if tracer:
        result["device_idle"] = write_trace(tracer, Path(args.trace), label)
    if rate:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name).get_text_config() if Path(model_name).is_dir() else None
        parameters = args.parameters or (_non_embedding_parameters(config) if config is not None else None)
        if parameters:
            flops = flop_limit(timer.shapes, metrics, protocol.levels, parameters, args.ig_steps,
                               config.num_hidden_layers)
            result["flop_limit_s"] = flops / rate
            result["parameters"] = parameters
            # the attribution phase's own rate (its passes and, with ig, the IG passes)
            attribution = attribution_flops(timer.shapes, metrics, parameters, args.ig_steps, config.num_hidden_layers)
            result["attribution_share"] = attribution / max(result["phases"]["attribution"], 1e-9) / rate
    return result


def _file_label(label: str) -> str:
    return label.replace(":", "_").replace("+", "_")


def _numbered_file(folder: Path, kind: str, label: str) -> Path:
    """``folder/<kind>_<n>_<label>.txt``, n counting the runs of this kind written there."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}_{len(list(folder.glob(f'{kind}_*.txt')))}_{_file_label(label)}.txt"


def write_profile(profiler, folder: Path, label: str) -> None:
    """The run's functions by cumulative and by own time (main thread), as text files, and the
    statistics themselves (``.prof``, for ``pstats``: who called what)."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(50)
    path = _numbered_file(folder, "profile", label)
    path.write_text(text.getvalue())
    profiler.dump_stats(path.with_suffix(".prof"))


def write_trace(tracer, folder: Path, label: str) -> dict[str, float]:
    """torch.profiler's operators of the run by device time and by host time, phases included."""
    events = tracer.key_averages()
    device = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = (events.table(sort_by=device, row_limit=45, max_name_column_width=70)
            + "\n\n" + events.table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=70))
    _numbered_file(folder, "trace", label).write_text(text)
    return device_idle(tracer)


def device_idle(tracer) -> dict[str, float]:
    """Seconds the device sat idle between its first and last kernel, by the main thread's phase
    at that moment ("outside phases": Lightning's loop, start of a batch, ...)."""
    from collections import defaultdict

    from torch.autograd import DeviceType

    events = tracer.events()
    # device events, without the device-side spans of annotated ranges (record_function: the phases)
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
                     and not getattr(e, "is_user_annotation", False) and not e.name.startswith("phase: "))
    phases = sorted((e.time_range.start, e.time_range.end, e.name[len("phase: "):]) for e in events
                    if e.device_type == DeviceType.CPU and e.name.startswith("phase: "))
    idle = defaultdict(float)
    if not kernels:
        return {}
    end = kernels[0][1]
    for start, stop in kernels[1:]:
        if start > end:  # a gap: nothing ran on the device from end to start
            covered = 0.0
            for first, last, phase in phases:
                overlap = min(start, last) - max(end, first)
                if overlap > 0:
                    idle[phase] += overlap / 1e6
                    covered += overlap
            idle["outside phases"] += (start - end - covered) / 1e6
        end = max(end, stop)
    return dict(sorted(idle.items(), key=lambda item: -item[1]))


def _non_embedding_parameters(config) -> float:
    """Parameters of a model of this config, minus the input embedding (issue 14: 2.65e9 for Phi-2)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def report(result: dict, rate) -> list[str]:
    total = result["total_s"]
    phases = dict(result["phases"])
    phases["other"] = max(0.0, total - sum(phases.values()))
    lines = [f"[{result['label']}]{' (new questions)' if result.get('first_question') else ''} levers switched: {', '.join(result['off']) or 'none'}; {result['samples']} samples; "
             f"run {total:.1f} s, prediction {result['prediction_s']:.2f} s = "
             f"{result['samples'] / result['prediction_s']:.2f} samples/s"]
    lines.append("    " + "  ".join(f"{name} {seconds:.2f} s ({seconds / total:.0%})" for name, seconds in phases.items()))
    if result.get("background"):
        lines.append("    in the record writer's thread, overlapping the above: "
                     + "  ".join(f"{name} {seconds:.2f} s" for name, seconds in result["background"].items()))
    if result.get("device_idle"):
        lines.append("    device idle (traced run, host slowed by the tracer), by the phase the main thread was in: "
                     + "  ".join(f"{name} {seconds:.2f} s" for name, seconds in result["device_idle"].items()))
    if result.get("detail"):
        lines.append("    inside them, each synchronised: "
                     + "  ".join(f"{name} {seconds:.2f} s" for name, seconds in result["detail"].items()))
    if result.get("blocks"):
        lines.append("    per block (each synchronised): " + " ".join(f"{seconds:.3f}" for seconds in result["blocks"]))
    extra = []
    if result.get("captures", [0])[0]:
        extra.append(f"{result['captures'][0]} CUDA graphs captured in {result['captures'][1]:.2f} s")
    if result.get("gc"):
        (_, _, full), (_, _, full_s) = result["gc"]
        inside = result.get("gc_in_prediction", [])
        extra.append(f"Python's garbage collector {sum(result['gc'][1]):.2f} s ({full} full collections, {full_s:.2f} s; "
                     f"{len(inside)} in the prediction, {sum(inside):.2f} s)")
    if result.get("allocator"):
        a = result["allocator"]
        extra.append(f"CUDA allocator: {a['num_device_alloc']} cudaMalloc, {a['num_device_free']} cudaFree, "
                     f"{a['num_alloc_retries']} cache flushes after out-of-memory; reserved peak {a['reserved_peak_gib']:.1f} GiB")
    if result.get("busy") is not None:
        extra.append(f"GPU busy {result['busy']:.0%} over the prediction (NVML)")
    if result.get("flop_limit_s"):
        extra.append(f"FLOP limit {result['flop_limit_s']:.2f} s at {rate / 1e12:.0f} TFLOP/s "
                     f"({result['parameters'] / 1e9:.2f} B non-embedding params) = "
                     f"{result['flop_limit_s'] / result['prediction_s']:.1%} of it")
    if result.get("attribution_share") is not None:
        extra.append(f"attribution{' incl. IG' if 'ig' in result['metrics'] else ''} at "
                     f"{result['attribution_share']:.0%} of the matmul rate")
    if extra:
        lines.append("    " + "; ".join(extra))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name, HF id or directory")
    parser.add_argument("--config", default=None, help="config directory: a random model of this shape (saved once)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for --config")
    parser.add_argument("--data", default="demo", help="demo, or a TruthfulQA CSV file")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's own default")
    parser.add_argument("--metrics", nargs="*", default=[], help="scores beyond the five defaults, e.g. ig")
    parser.add_argument("--ig-steps", type=int, default=20)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=["all"],
                        help="runs in this process: 'all' (every lever on), 'off:LEVER[+LEVER...]' "
                             f"(levers {', '.join(LEVERS)}), or 'none' (every lever off)")
    parser.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True,
                        help="synchronise CUDA at phase edges")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--parameters", type=float, default=None, help="non-embedding parameters (else counted)")
    parser.add_argument("--workdir", default="/tmp/sparseact-e2e")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--new-questions", action="store_true",
                        help="each run of the process takes the next questions (no shape seen before)")
    parser.add_argument("--detail", action="store_true", help="also time steps inside the phases (DETAIL)")
    parser.add_argument("--per-block", action="store_true",
                        help="also time each predict step's device work (synchronised at its edges)")
    parser.add_argument("--trace", default=None,
                        help="folder: torch.profiler's operator tables of the last run (phases as ranges), and "
                             "the device's idle time by phase")
    parser.add_argument("--profile", default=None, help="folder: a cProfile of each run (rank 0's main thread)")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    model_name = args.model
    if args.config:
        model_name = str(Path(args.workdir) / f"model_{Path(args.config).name}_{args.dtype}")
        # written once the model and its tokenizer are saved and an earlier launch's run directories and
        # phases are gone (removed while another rank had started, they took its records: session 11)
        ready = Path(model_name) / "complete"
        if RANK == 0:
            make_model(args.config, args.tokenizer, Path(model_name), args.dtype)
            for stale in [*Path(args.workdir).glob("run_*"), *Path(args.workdir).glob("phases_*.json")]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            ready.write_text(LAUNCH)
        else:
            deadline = time.time() + 900
            while not (ready.exists() and ready.read_text() == LAUNCH):
                if time.time() > deadline:
                    raise SystemExit(f"rank {RANK}: rank 0 did not save {model_name} within 900 s")
                time.sleep(1)
    if args.gpus > 1 and len(set(args.variants)) < len(args.variants):
        raise SystemExit("with several GPUs each variant runs once: a repeated one would remove its run directory "
                         "while another rank writes it")
    rate = matmul_rate()
    print(f"pipeline from {Path(protocol_module.__file__).parent}; imports {IMPORT_S:.1f} s")
    results, lines = [], []
    for number, variant in enumerate(args.variants):
        off = set(LEVERS) if variant == "none" else set(variant.split(":", 1)[1].split("+")) \
            if variant.startswith("off:") else set()
        if variant.startswith("on:"):  # switch on levers that are off by default
            off = {f"on_{v}" for v in variant.split(":", 1)[1].split("+")}
        unknown = off - set(LEVERS)
        if unknown:
            raise SystemExit(f"unknown lever(s) {sorted(unknown)}; choose from {', '.join(LEVERS)}")
        result = one_run(args, variant, off, model_name, rate, args.gpus,
                         number * args.questions if args.new_questions else 0, last=number == len(args.variants) - 1)
        if RANK != 0:
            Path(args.workdir, f"phases_{variant}.rank{RANK}.json").write_text(json.dumps(result))
            continue
        results.append(result)
        lines += report(result, rate)
        print("\n".join(report(result, rate)), flush=True)
    if RANK != 0:
        return
    if args.gpus > 1:  # the other ranks' phases, once they have written them
        deadline = time.time() + 120
        for variant in args.variants:
            for rank in range(1, args.gpus):
                path = Path(args.workdir, f"phases_{variant}.rank{rank}.json")
                while not path.exists() and time.time() < deadline:
                    time.sleep(0.5)
                if path.exists():
                    other = json.loads(path.read_text())
                    lines.append(f"    rank {rank}: " + "  ".join(f"{k} {v:.2f} s" for k, v in other["phases"].items())
                                 + (f"; GPU busy {other['busy']:.0%}" if other.get("busy") is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    head = (f"model {args.config or args.model} ({args.dtype}), {args.questions} questions ({args.data}), "
            f"T <= {args.max_new_tokens}, scores {', '.join(results[0]['metrics'])} x {len(results[0]['levels'])} levels, "
            f"{args.gpus} device(s); imports {IMPORT_S:.1f} s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record(f"End to end: {Path(args.config or args.model).name}, {args.dtype}, {machine(device).split(',')[0]}",
           [head] + lines, device, args.no_record)


if __name__ == "__main__":
    main()
