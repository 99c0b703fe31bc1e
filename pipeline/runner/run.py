"""One evaluation run: validate, load, predict with Lightning, summarise."""

from __future__ import annotations

import logging
import signal
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment

from pipeline.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig, validate
from pipeline.data.datamodule import SampleDataModule
from pipeline.data.sources import dataset_name, load_samples
from pipeline.errors import UserError
from pipeline.models.adapters import layout_for
from pipeline.masking.static import calibrate
from pipeline.models.loading import load_model
from pipeline.models.prompts import resolve_template, stop_token_ids
from pipeline.results.plot import plot_curves
from pipeline.results.store import check_run_dir, completed_samples, fingerprint, open_run_dir, read_records
from pipeline.results.summary import format_table, summarize, write_summary
from pipeline.runner.callbacks import MaskingCallback, RecordWriter
from pipeline.runner.module import SparseActivationModule
from pipeline.runner.preemption import Preempted, PreemptionCallback, requeue_slurm_job


def calibration_samples(data: DataConfig, count: int):
    """The rows right after the evaluated slice: calibration never sees evaluated samples."""
    evaluated, _ = load_samples(data)
    after = int(evaluated[-1].id.rsplit(":", 1)[1]) + 1
    try:
        samples, _ = load_samples(replace(data, start=after, limit=count))
    except UserError:
        samples = []
    if len(samples) < count:
        raise UserError(f"the static metric calibrates on the {count} rows after the evaluated ones, but only "
                        f"{len(samples)} remain; lower protocol.calibration_samples or data.limit")
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
    layout_for(loaded.model)  # unsupported architectures fail here, before any file is written
    template = resolve_template(model.template, loaded.tokenizer)

    numbers_affecting = {
        "model": loaded.name, "weights": loaded.weights_id, "dtype": model.dtype, "template": template,
        "data": asdict(data), "task": task,
        "protocol": {k: v for k, v in asdict(protocol).items() if k != "save_scores"},  # output only
    }
    info = {
        "fingerprint": fingerprint(numbers_affecting),
        "dataset": dataset_name(data),
        "config": {"model": asdict(model), "data": asdict(data), "protocol": asdict(protocol), "run": asdict(run)},
        "numbers_affecting": numbers_affecting,
    }
    default_name = f"{Path(model.name).name}__{dataset_name(data)}__{info['fingerprint'][:8]}"
    run_dir = Path(run.output_dir) if run.output_dir else Path("runs") / default_name
    check_run_dir(run_dir, info)

    rows_per_sample = len(protocol.metrics) * len(protocol.levels)
    done = completed_samples(run_dir, rows_per_sample) if run_dir.exists() else set()
    pending = [s for s in samples if s.id not in done]
    open_run_dir(run_dir, info)
    if done:
        print(f"resuming {run_dir}: {len(samples) - len(pending)} of {len(samples)} samples already done")

    if pending:
        stop_ids = stop_token_ids(loaded.tokenizer, loaded.model)
        thresholds = None
        if "static" in protocol.metrics:
            calibration = calibration_samples(data, protocol.calibration_samples)
            thresholds = calibrate(loaded.model, loaded.tokenizer, template, calibration, protocol.levels,
                                   protocol.max_new_tokens, stop_ids)
        module = SparseActivationModule(loaded.model, loaded.tokenizer, template, protocol, task, stop_ids, thresholds)
        preemption = PreemptionCallback()
        trainer = L.Trainer(
            accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes, strategy=run.strategy,
            logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=run.progress,
            inference_mode=False,  # attribution needs autograd inside predict_step
            use_distributed_sampler=False,  # the data module deals whole blocks of samples to the ranks
            # tqdm rather than rich: it also leaves readable progress lines in batch-job logs
            callbacks=[MaskingCallback(), RecordWriter(run_dir), preemption]
            + ([TQDMProgressBar()] if run.progress else []),
            # Lightning's own SLURM requeue saves a training checkpoint; prediction needs none
            plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
        )
        batch_size = run.batch_size or (64 if trainer.accelerator.__class__.__name__ == "CUDAAccelerator" else 4)
        started = time.time()
        try:
            trainer.predict(module, datamodule=SampleDataModule(samples, batch_size, done), return_predictions=False)
        except Preempted as stop:
            requeued = stop.signum == signal.SIGUSR1 and run.requeue and requeue_slurm_job()
            print(f"stopped by {stop}: finished samples are saved in {run_dir}; "
                  + ("the job is requeued and will resume" if requeued else "rerun the same command to resume"))
            raise SystemExit(128 + stop.signum) from None
        trainer.strategy.barrier()  # every rank's shard is complete before rank 0 merges
        if trainer.global_rank != 0:
            return run_dir
        print(f"evaluated {len(pending)} samples in {time.time() - started:.1f} s, peak memory {peak_memory_gib():.2f} GiB")

    records = [r for r in read_records(run_dir) if r["sample_id"] in {s.id for s in samples}]
    if not records:
        raise UserError(f"no records in {run_dir}")
    rows = summarize(records)
    best = write_summary(run_dir, rows, info, session_info(session_started, loaded.model))
    if run.plot:
        plot_curves(rows, run_dir / "curves.png", f"{model.name} on {dataset_name(data)} ({len(samples)} samples)")
    print(format_table(best, rows))
    print(f"results in {run_dir}")
    return run_dir
