"""``sparseact lmeval``: one model x score x level x allocation on lm-eval tasks, in a run directory.

The run directory holds ``run.json`` (configuration and fingerprint), ``results.json``
(lm-eval's results, without samples), ``samples_<task>.jsonl`` (lm-eval's per-document
samples) and ``cache/requests_rank<r>.db``.

Resume: lm-eval's request cache (``use_cache``, a SQLite file per rank, written with
autocommit as every request finishes). A killed run rerun with the same command finds
every finished request in the cache and sends only the rest to the model. The cache is
keyed by the request alone, not by the model, so it lives in the run directory, whose
fingerprint covers everything that changes numbers; a different configuration aimed at
the same directory is refused.

Several GPUs: lm-eval's own data parallelism (``accelerate launch -m pipeline ...
lmeval ...``): lm-eval splits each task's documents over ranks and gathers results and
samples on rank 0; each rank keeps its own cache file. The project's Lightning DDP is not
used here: lm-eval builds, filters and scores the requests, and would have to be
re-implemented around Lightning's sampler.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.data.sources import lmeval_run_name
from pipeline.errors import UserError
from pipeline.results.store import NUMBERS_VERSION, atomic_write_text, fingerprint

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "lm_eval" / "tasks"


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("lm-eval is not installed: pip install -e '.[lmeval]'") from None


def task_manager(tasks: list[str], include_path: list[str], data_dir: str | None):
    """lm-eval's TaskManager over the shipped offline tasks (and ``include_path``); lm-eval's
    own task registry is indexed too only when a task is not found locally."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + [str(Path(p).resolve()) for p in include_path]
    for p in paths[1:]:
        if not Path(p).exists():
            raise UserError(f"include_path {p} does not exist")
    metadata = {"data_dir": str(Path(data_dir).resolve())} if data_dir else None
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if set(manager.match_tasks(tasks)) != set(tasks) or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; shipped offline tasks: "
                        f"{', '.join(sorted(p.stem for p in TASKS_DIR.glob('*.yaml')))} (or any lm-eval task, "
                        "with network)")
    return manager


def check_arguments(model: ModelConfig, tasks: list[str], score: str, level: float, allocation: str, batch_size: int,
                    limit: float | None, ig_steps: int) -> None:
    """Everything about one run's arguments that can be refused before its model is loaded (one
    ``UserError``); ``task_manager`` then checks its tasks."""
    require_lm_eval()
    from pipeline.lmeval.model import check_args

    check_args(score, level, allocation, model.dtype, batch_size, ig_steps)
    if not tasks:
        raise UserError("no tasks given")
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be > 0, got {limit}")
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)  # lm-eval's INFO/WARNING chatter; errors still show


def check_task_data(tasks: list[str], manager, limit: float | None = None) -> str:
    """Build the tasks (reads their documents: the local data files of the shipped tasks) and
    return their content digest (``tasks_content_sha256``)."""
    from lm_eval.tasks import get_task_dict

    try:
        task_dict = get_task_dict(tasks, manager)
    except FileNotFoundError as error:  # a task's local data file (configs/lm_eval/tasks/utils.py)
        raise UserError(str(error).splitlines()[0]) from None
    return tasks_content_sha256(task_dict, limit)


def tasks_content_sha256(task_dict: dict, limit: float | None) -> str:
    """SHA-256 of what the tasks make of a model's answers: each task's configuration as lm-eval
    dumps it (prompt templates, metrics, filters, generation settings, and the source of the
    task's Python functions) and the documents evaluated (the first ``limit``, as lm-eval takes
    them). Paths (where the YAML or the data lives) are left out: the same tasks on the same
    documents in another checkout are the same run; an edited prompt or data file is not."""
    from itertools import islice

    from lm_eval.evaluator_utils import get_sample_size

    digest = hashlib.sha256()

    def add(tasks: dict) -> None:
        for name, task in sorted(tasks.items(), key=lambda item: str(item[0])):
            if isinstance(task, dict):  # a group: its subtasks
                add(task)
                continue
            config = dict(task.dump_config())
            config["metadata"] = {k: v for k, v in (config.get("metadata") or {}).items()
                                  if k not in ("config_source", "data_dir")}
            digest.update(json.dumps([str(name), config], sort_keys=True, default=str).encode())
            for doc in islice(task.eval_docs, get_sample_size(task, limit)):  # lm-eval's own limit rule
                digest.update(json.dumps(doc, sort_keys=True, default=str).encode())

    add(task_dict)
    return digest.hexdigest()


def run_config(model: ModelConfig, weights: str | None, tasks: list[str], score: str, level: float, allocation: str,
               dense_first_step: bool, batch_size: int, limit: float | None, num_fewshot: int | None,
               gen_kwargs: str | None, data_dir: str | None, ig_steps: int, apply_chat_template: bool,
               tasks_sha256: str | None = None) -> dict:
    """The configuration stored in ``run.json``; its fingerprint names and guards the run directory."""
    return {
        "model": model.name, "weights": weights, "dtype": model.dtype, "tasks": sorted(tasks),
        "tasks_content_sha256": tasks_sha256, "score": score,
        "level": level, "allocation": allocation, "dense_first_step": dense_first_step, "batch_size": batch_size,
        "limit": None if limit is None else float(limit), "num_fewshot": num_fewshot, "gen_kwargs": gen_kwargs, "apply_chat_template": apply_chat_template,
        "ig_steps": ig_steps if score == "ig" else None,
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "numbers_version": NUMBERS_VERSION,  # lm-eval's request cache lives in the directory too
    }


def run_lmeval(model: ModelConfig, tasks: list[str], score: str, level: float, allocation: str,
               dense_first_step: bool, batch_size: int, limit: float | None, num_fewshot: int | None,
               gen_kwargs: str | None, include_path: list[str], data_dir: str | None, output_dir: str | None,
               device: str, ig_steps: int, apply_chat_template: bool, progress: bool) -> Path:
    check_arguments(model, tasks, score, level, allocation, batch_size, limit, ig_steps)
    manager = task_manager(tasks, include_path, data_dir)
    # a missing data file: one line before the model loads or anything is written
    tasks_sha256 = check_task_data(tasks, manager, limit)
    from pipeline.lmeval.model import SparseActLM

    lm = SparseActLM(pretrained=model.name, score=score, level=level, allocation=allocation, dtype=model.dtype,
                     batch_size=batch_size, dense_first_step=dense_first_step, ig_steps=ig_steps, device=device,
                     revision=model.revision, trust_remote_code=model.trust_remote_code, cache_dir=model.cache_dir)
    lm.show_progress = progress
    config = run_config(model, lm.weights_id, tasks, score, level, allocation, dense_first_step, batch_size, limit,
                        num_fewshot, gen_kwargs, data_dir, ig_steps, apply_chat_template, tasks_sha256)
    print_ = fingerprint(config)[:12]  # shorter than a sparseact run's: it also names the directory
    run_dir = Path(output_dir or Path("runs/lmeval") / lmeval_run_name(model.name, "", score, level, allocation,
                                                                       f"__{print_}"))
    stored = run_dir / "run.json"
    if stored.exists():
        previous = json.loads(stored.read_text())
        if previous.get("fingerprint") != print_:
            raise UserError(f"{run_dir} holds a run with another configuration (fingerprint "
                            f"{previous.get('fingerprint')}, this one {print_}); choose another output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cache").mkdir(exist_ok=True)
    atomic_write_text(stored, json.dumps({"fingerprint": print_, "config": config}, indent=2))

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, gen_kwargs=gen_kwargs,
            use_cache=str(run_dir / "cache" / "requests"), log_samples=True, task_manager=manager,
            apply_chat_template=apply_chat_template)
    except FileNotFoundError as error:  # a task's local data file (configs/lm_eval/tasks/utils.py)
        raise UserError(str(error).splitlines()[0]) from None
    if results is None:  # a rank other than 0
        return run_dir
    samples = results.pop("samples", {})
    for task, rows in samples.items():
        atomic_write_text(run_dir / f"samples_{task}.jsonl",
               "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    print(make_table(results))
    print(f"run directory: {run_dir}")
    return run_dir

