"""One evaluation run: validate, load, predict with Lightning, summarise."""

from __future__ import annotations

import copy
import gc
import logging
import signal
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.plugins.environments import SLURMEnvironment

from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig, validate
from pipeline.data.datamodule import SampleDataModule
from pipeline.data.sources import Sample, content_digest, dataset_name, load_samples, run_name
from pipeline.decoding.cuda_graph import CapturedSteps
from pipeline.errors import UserError
from pipeline.models.adapters import layout_for
from pipeline.masks.levels_file import RunLevels
from pipeline.masks.static import calibrate
from pipeline.models.loading import LoadedModel, load_model
from pipeline.models.prompts import answer_length, prompt_ids, resolve_template, stop_token_ids
from pipeline.results.plot import plot_curves
from pipeline.results.store import (NUMBERS_VERSION, check_run_dir, completed_samples, fingerprint, load_records,
                                    open_run_dir, read_records)
from pipeline.results.summary import format_table, summarize, write_summary
from pipeline.runner.callbacks import MaskingCallback, RecordWriter, RunProgressBar
from pipeline.runner.module import SparseActivationModule
from pipeline.runner.lock import RunLock, process_rank
from pipeline.runner.preemption import Interrupted, Preempted, PreemptionCallback, requeue_slurm_job
from pipeline.runner.strategy import strategy_for, wait_for_ranks
from pipeline.scores.metrics import SCORES


def calibration_samples(data: DataConfig, evaluated: list[Sample], count: int):
    """The rows right after the evaluated slice: calibration never sees evaluated samples."""
    after = int(evaluated[-1].id.rsplit(":", 1)[1]) + 1
    try:
        samples, _ = load_samples(replace(data, start=after, limit=count))
    except UserError:
        samples = []
    if len(samples) < count:
        raise UserError(f"the static metric or calibrated allocation calibrates on the {count} rows after the "
                        f"evaluated ones, but only {len(samples)} remain; lower protocol.calibration_samples or data.limit")
    return samples


def session_info(started: float, model) -> dict:
    import datetime
    import importlib.metadata as metadata

    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    versions = {}
    for package in ("sparseact", "torch", "transformers", "lightning"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.time() - started, 1), "device": name, "versions": versions}


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*srun.* command is available.*")  # login nodes have srun too
    # blocks of samples are dealt by the data module; the writer does not use batch indices
    warnings.filterwarnings("ignore", message=".*infer the batch indices.*")


def device_type(run: RunConfig) -> str:
    """cuda or cpu, as Lightning's accelerator choice will make it (numbers differ between the two)."""
    if run.accelerator in ("gpu", "cuda") or (run.accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def check_context(loaded, template: str, samples, protocol: ProtocolConfig) -> None:
    """Refuse a prompt that, with its answer, would not fit the model's context window."""
    config = loaded.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return
    for sample in samples:
        needed = len(prompt_ids(loaded.tokenizer, template, sample.question)) + answer_length(
            loaded.tokenizer, sample.reference, protocol.max_new_tokens)
        if needed > limit:
            raise UserError(f"sample {sample.id} needs {needed} positions (prompt and answer), more than the "
                            f"{limit} of {loaded.name}'s context; shorten it or leave it out with --data.start/--data.limit")


def evaluate(
    model: ModelConfig | None = None,
    data: DataConfig | None = None,
    protocol: ProtocolConfig | None = None,
    run: RunConfig | None = None,
) -> Path:
    """Run the protocol and write the run directory; returns its path."""
    model, data, protocol, run = model or ModelConfig(), data or DataConfig(), protocol or ProtocolConfig(), run or RunConfig()
    _quiet()
    session_started = time.time()
    validate(model, data, protocol, run)
    samples, task = load_samples(data)
    loaded = load_model(model)
    layout = layout_for(loaded.model)  # unsupported architectures fail here, before any file is written
    template = resolve_template(model.template, loaded.tokenizer)
    # what the static thresholds and the calibrated allocation read, checked before anything is written
    calibration = calibration_samples(data, samples, protocol.calibration_samples) if protocol.needs_calibration_rows() else []
    levels = RunLevels(protocol, layout)  # a given levels file must fit the model: checked now, before any write
    check_context(loaded, template, samples + calibration, protocol)
    device = device_type(run)
    batch_size = run.batch_size or (64 if device == "cuda" else 4)

    # Everything that changes a number, identified by content (docs: "Resuming").
    numbers_affecting = {
        "model": loaded.name, "weights": loaded.weights_id, "dtype": model.dtype, "template": template,
        "data": {"dataset": dataset_name(data), "questions": len(samples), "content_sha256": content_digest(samples)},
        "calibration_sha256": content_digest(calibration) if calibration else None,
        "task": task,
        "protocol": protocol.numbers_affecting(),
        # batch-mates share padded computations, and CPU and GPU kernels round differently
        "batch_size": batch_size, "device": device,
        "numbers_version": NUMBERS_VERSION,  # what the code computes from all of the above
    }
    info = {
        "fingerprint": fingerprint(numbers_affecting),
        "dataset": dataset_name(data),
        "config": {"model": asdict(model), "data": asdict(data), "protocol": asdict(protocol), "run": asdict(run)},
        "numbers_affecting": numbers_affecting,
    }
    run_dir = Path(run.output_dir) if run.output_dir else Path("runs") / run_name(model.name, data,
                                                                                 f"__{info['fingerprint'][:8]}")
    check_run_dir(run_dir, info)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {run_dir}: {error.strerror or error}") from None
    rank = process_rank(run.devices)
    with RunLock(run_dir, rank):
        job = Job(run_dir, info, rank, loaded, template, task, samples, calibration, batch_size, levels)
        return _evaluate_locked(job, model, data, protocol, run, session_started)


FREEZE_OBJECTS_IN_PREDICT = True  # off: a lever of benchmarks/end_to_end.py (gc_freeze)


@contextmanager
def _long_lived_objects_frozen():
    """Python's garbage collector leaves the objects that exist when prediction starts (the
    libraries', the model's modules: ~500k) out of its collections until it ends. They are not
    garbage, and a full collection inside the predict loop scanned them all: 0.28-0.45 s each on
    an H200 host, with the device waiting (``benchmarks/RESULTS.md``, sessions 6 and 7).

    Objects someone froze before (a caller, or the interpreter's start-up: 375 on the H200
    image's Python) do not stop this freeze, and afterwards every object is the collector's
    again, theirs too: ``gc.unfreeze`` cannot tell whose objects it releases, and left frozen,
    the run's own objects (model, trainer and module hold one another in reference cycles)
    would never be collected. Releasing a caller's objects costs it only scanning time."""
    if not FREEZE_OBJECTS_IN_PREDICT:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class Job:
    """What the run resolved before it took the directory's lock: passed on explicitly."""

    run_dir: Path
    info: dict  # run.json: fingerprint, config, numbers_affecting
    rank: int
    loaded: LoadedModel
    template: str
    task: str
    samples: list[Sample]
    calibration: list[Sample]  # rows after the evaluated slice (static metric, calibrated allocation), else empty
    batch_size: int
    levels: object  # the calibrated allocation's levels (masks/levels_file.py)


def _evaluate_locked(job: Job, model: ModelConfig, data: DataConfig, protocol: ProtocolConfig, run: RunConfig,
                     session_started: float) -> Path:
    run_dir, info, rank, loaded, samples = job.run_dir, job.info, job.rank, job.loaded, job.samples
    template, task, calibration, batch_size, levels = job.template, job.task, job.calibration, job.batch_size, job.levels
    check_run_dir(run_dir, info)  # again: another run may have written it before we held the lock
    rows_per_sample = len(protocol.variants()) * len(protocol.levels)
    existing = load_records(run_dir)
    if existing.warning() and rank == 0:
        print(f"{run_dir}: {existing.warning()}")
    done = completed_samples(existing.rows, rows_per_sample)
    pending = [s for s in samples if s.id not in done]
    if done and rank == 0:
        print(f"resuming {run_dir}: {len(samples) - len(pending)} of {len(samples)} samples already done")

    if pending:
        preemption = PreemptionCallback()
        writer = RecordWriter(run_dir)
        try:
            trainer = L.Trainer(
                accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes,
                strategy=strategy_for(run.strategy),
                logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=run.progress,
                inference_mode=False,  # attribution needs autograd inside predict_step
                use_distributed_sampler=False,  # the data module deals whole blocks of samples to the ranks
                # tqdm rather than rich: it also leaves readable progress lines in batch-job logs
                callbacks=[MaskingCallback(), writer, preemption]
                + ([RunProgressBar()] if run.progress else []),
                # Lightning's own SLURM requeue saves a training checkpoint; prediction needs none
                plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
            )
        except MisconfigurationException as error:
            raise UserError(f"cannot run on the requested hardware: {str(error).splitlines()[0]}") from None
        open_run_dir(run_dir, info)
        stop_ids = stop_token_ids(loaded.tokenizer, loaded.model)
        with ThreadPoolExecutor(1) as pool:  # the record thread's tokenizer (module.py), copied meanwhile
            host_tokenizer = pool.submit(copy.deepcopy, loaded.tokenizer)
            if trainer.accelerator.__class__.__name__ == "CUDAAccelerator":
                # calibration runs before Lightning places the model: on this rank's GPU, not the CPU
                loaded.model.to(torch.device("cuda", trainer.local_rank))
            host_tokenizer = host_tokenizer.result()
        graphs = CapturedSteps(loaded.model)  # the run's captured decoding steps: calibration's serve the batches too
        thresholds = None
        if any(SCORES[m].thresholds for m in protocol.metrics):
            thresholds = calibrate(loaded.model, loaded.tokenizer, template, calibration, protocol.levels,
                                   protocol.max_new_tokens, stop_ids, graphs)
        layer_levels = levels.tensors(loaded.model, loaded.tokenizer, template, calibration, stop_ids, run_dir,
                                      write=trainer.global_rank == 0, graphs=graphs)
        module = SparseActivationModule(loaded.model, loaded.tokenizer, template, protocol, task, stop_ids, thresholds,
                                        layer_levels, info["fingerprint"], host_tokenizer, writer.device_busy, graphs)
        waited = wait_for_ranks(trainer)
        started = time.time()
        try:
            with _long_lived_objects_frozen():
                trainer.predict(module, datamodule=SampleDataModule(samples, batch_size, done), return_predictions=False)
        except Preempted as stop:
            requeued = stop.signum == signal.SIGUSR1 and run.requeue and requeue_slurm_job()
            if trainer.global_rank == 0:
                print(f"stopped by {stop}: finished samples are saved in {run_dir}; "
                      + ("the job is requeued and will resume" if requeued else "rerun the same command to resume"))
            raise SystemExit(128 + stop.signum) from None
        except Interrupted:
            if trainer.global_rank == 0:
                raise KeyboardInterrupt from None  # the command line prints what was saved
            raise SystemExit(130) from None
        trainer.strategy.barrier()  # every rank's shard is complete before rank 0 merges
        if trainer.global_rank != 0:
            return run_dir
        print(f"evaluated {len(pending)} samples in {time.time() - started:.1f} s, peak memory {peak_memory_gib():.2f} GiB"
              + (f"; before that, {waited:.1f} s waiting for the other ranks to load" if waited is not None else ""))
    else:
        open_run_dir(run_dir, info)

    evaluated = {s.id for s in samples}
    records = [r for r in (read_records(run_dir) if pending else existing.rows) if r.sample_id in evaluated]
    if not records:
        raise UserError(f"no records in {run_dir}")
    rows = summarize(records)
    best = write_summary(run_dir, rows, info, session_info(session_started, loaded.model))
    if run.plot:
        plot_curves(rows, run_dir / "curves.png", f"{model.name} on {dataset_name(data)} ({len(samples)} samples)")
    print(format_table(best, rows))
    print(f"results in {run_dir}")
    return run_dir
