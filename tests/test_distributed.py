"""Several processes, kills and resumes: the records and summary never change.

Runs the real command line in subprocesses (Lightning DDP on CPU with gloo), kills
runs with SIGKILL at random points while records are being written, and resumes them
with the same or a different number of processes.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from conftest import make_tiny_checkpoint

from pipeline.results.record import Record
from pipeline.results.store import read_records

SAMPLES = 8
ROWS = SAMPLES * 5 * 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _command(tiny_dir, out, devices):
    command = [sys.executable, "-m", "pipeline", "run", "--model.name", str(tiny_dir), "--data.limit", str(SAMPLES),
               "--protocol.levels", "[0.0, 0.5, 0.9]", "--protocol.max_new_tokens", "6",
               "--run.output_dir", str(out), "--run.progress", "false", "--run.accelerator", "cpu",
               "--run.batch_size", "2"]  # four blocks of two questions: room to stop between them
    if devices > 1:
        command += ["--run.devices", str(devices), "--run.strategy", "ddp"]
    return command


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(tiny_dir, out, devices=1):
    result = subprocess.run(_command(tiny_dir, out, devices), capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _torchrun(*arguments) -> list[str]:
    """Two ranks started at once, as torchrun (and srun on a cluster) start them."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]


def _finished(command, env=None) -> tuple[int, str, str]:
    """Return code, stdout and stderr of ``command``, run in a session of its own: if it hangs (a rank
    waiting for ever), every process of it is killed, not only the launcher."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or _env(),
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stdout, stderr


def _lines_on_disk(out: Path) -> int:
    return sum(p.read_text().count("\n") for p in out.glob("records*.jsonl"))


def _kill_midway(tiny_dir, out, devices, rng):
    """Start a run and SIGKILL it (all its processes) once some records are on disk."""
    target = _lines_on_disk(out) + rng.randint(1, ROWS // 2)
    process = subprocess.Popen(_command(tiny_dir, out, devices), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=_env(), start_new_session=True)
    deadline = time.time() + 240
    while process.poll() is None and _lines_on_disk(out) < target and time.time() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _keyed(out: Path) -> dict:
    records = read_records(out)
    keys = [(r.sample_id, r.metric, r.level) for r in records]
    assert len(keys) == len(set(keys)) == ROWS  # none missing, none counted twice
    return {k: r for k, r in zip(keys, records)}


def _summary_rows(out: Path) -> list:
    return json.loads((out / "summary.json").read_text())["rows"]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(tiny_dir, out)
    return out


def test_two_processes_equal_one(tiny_dir, reference, tmp_path):
    out = tmp_path / "ddp"
    _run(tiny_dir, out, devices=2)
    shards = sorted(out.glob("records.rank*.jsonl"))
    assert len(shards) == 2
    samples = [{Record.from_json(json.loads(line)).sample_id for line in shard.read_text().splitlines()}
               for shard in shards]
    assert samples[0] and samples[1] and not samples[0] & samples[1]  # disjoint, both ranks worked
    assert _keyed(out) == _keyed(reference)
    assert _summary_rows(out) == _summary_rows(reference)


def test_five_kills_then_resume(tiny_dir, reference, tmp_path):
    rng = random.Random(7)
    out = tmp_path / "killed"
    for _ in range(5):
        _kill_midway(tiny_dir, out, 1, rng)
    assert 0 < _lines_on_disk(out)
    _run(tiny_dir, out)
    assert _keyed(out) == _keyed(reference)
    assert _summary_rows(out) == _summary_rows(reference)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_other_process_count(tiny_dir, reference, tmp_path, before, after):
    out = tmp_path / "switch"
    _kill_midway(tiny_dir, out, before, random.Random(before))
    assert _lines_on_disk(out) < ROWS
    _run(tiny_dir, out, devices=after)
    assert _keyed(out) == _keyed(reference)
    assert _summary_rows(out) == _summary_rows(reference)


def test_sigterm_stops_between_batches(tiny_dir, tmp_path):
    out = tmp_path / "term"
    process = subprocess.Popen(_command(tiny_dir, out, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_env())
    while process.poll() is None and _lines_on_disk(out) == 0:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    # only whole samples on disk: every line parses and every sample has all its rows
    records = [Record.from_json(json.loads(line)) for line in (out / "records.jsonl").read_text().splitlines()]
    per_sample = {}
    for r in records:
        per_sample[r.sample_id] = per_sample.get(r.sample_id, 0) + 1
    assert set(per_sample.values()) == {ROWS // SAMPLES}


def _limited(command: list[str], samples: int) -> list[str]:
    command = list(command)
    command[command.index("--data.limit") + 1] = str(samples)
    return command


@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_a_rank_without_a_block_finishes(tiny_dir, reference, tmp_path, launcher):
    """One block of two questions for two ranks: rank 1 has nothing to do and must not wait
    forever for a collective that only rank 0 enters (it did: rank 0 broadcast calibrated
    levels when its predict loop started, a loop rank 1 skips). Also with every rank started
    at once by torchrun, as srun starts them on a cluster."""
    out = tmp_path / "run"
    command = _limited(_command(tiny_dir, out, 2), 2)
    if launcher == "torchrun":
        command = _torchrun(*command[1:])
    returncode, _, stderr = _finished(command)  # a hang, what this test is about, kills every rank
    assert returncode == 0, stderr[-8000:]  # a rank's own message comes before the launcher's
    records = read_records(out)
    assert len(records) == 2 * 5 * 3
    expected = {(r.sample_id, r.metric, r.level): r for r in read_records(reference)}
    assert all(expected[(r.sample_id, r.metric, r.level)] == r for r in records)


RANK_ARGUMENTS = """\
import os, sys
from pipeline.cli import main
rank = os.environ["LOCAL_RANK"]
argv = sys.argv[1:]
argv[argv.index("--run.output_dir") + 1] += f"_{rank}"  # its own directory: each rank reaches its predict loop
if rank == "1":
    argv[argv.index("--data.limit") + 1] = "2"  # other questions: another run
sys.exit(main(argv))
"""


RANK_WEIGHTS = """\
import os, sys, torch
import pipeline.runner.run as run
from pipeline.cli import main
load = run.load_model
def perturbed(config):  # rank 1: one weight off, as a parameter initialised at random would be
    loaded = load(config)
    with torch.no_grad():
        next(loaded.model.parameters()).view(-1)[0] += 1.0
    return loaded
if os.environ["LOCAL_RANK"] == "1":
    run.load_model = perturbed
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("differ, message", [(RANK_ARGUMENTS, "resolved a different run than rank 0"),
                                             (RANK_WEIGHTS, "hold other weights than rank 0")])
def test_ranks_that_differ_all_stop(tiny_dir, tmp_path, differ, message):
    """Ranks keep the weights they loaded (no broadcast from rank 0), so a rank that read other
    files or arguments, or holds other weights, must not run: every rank stops with one message, none
    waits forever."""
    script = tmp_path / "rank_script.py"
    script.write_text(differ)
    out = tmp_path / "run"
    returncode, _, stderr = _finished(_torchrun(str(script), *_command(tiny_dir, out, 2)[3:]))
    assert returncode != 0
    # each rank raises it; torchrun may stop one rank before it prints, once the other has failed
    assert f"rank(s) 1 {message}" in stderr, stderr[-8000:]
    assert not list(tmp_path.glob("run*/records*.jsonl"))


RANK_SLOW_LOAD = """\
import os, sys, time
from pathlib import Path
import pipeline.runner.run as run
from pipeline.cli import main
rank, stamps = os.environ["LOCAL_RANK"], Path(os.environ["STAMPS"])
load, data = run.load_model, run.SampleDataModule
def slow(config):  # rank 1 takes longer to load, as from a busy disk
    if rank == "1":
        time.sleep(float(os.environ["SLOW_LOAD_S"]))
    loaded = load(config)
    (stamps / f"loaded_{rank}").write_text(repr(time.time()))
    return loaded
def timed(*args, **kwargs):  # made right after the evaluation's clock starts
    (stamps / f"evaluating_{rank}").write_text(repr(time.time()))
    return data(*args, **kwargs)
run.load_model, run.SampleDataModule = slow, timed
sys.exit(main(sys.argv[1:]))
"""


def test_the_evaluation_is_timed_once_every_rank_has_loaded(tiny_dir, reference, tmp_path):
    """Ranks started together (torchrun, srun) wait for the slowest to load before the evaluation's
    clock starts: rank 0 starts it after rank 1 has loaded and reports the wait apart; the records
    are those of one process."""
    import re

    slow = 3.0
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SLOW_LOAD)
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    out = tmp_path / "run"
    returncode, stdout, stderr = _finished(_torchrun(str(script), *_command(tiny_dir, out, 2)[3:]),
                                           env={**_env(), "SLOW_LOAD_S": str(slow), "STAMPS": str(stamps)})
    assert returncode == 0, stderr[-4000:]
    stamp = {path.name: float(path.read_text()) for path in stamps.iterdir()}
    assert stamp["evaluating_0"] > stamp["loaded_1"] > stamp["loaded_0"] + slow / 2
    found = re.search(r"evaluated \d+ samples in [\d.]+ s.*; before that, ([\d.]+) s waiting for the other ranks",
                      stdout)
    assert found, stdout[-2000:]
    assert float(found.group(1)) >= slow / 2
    assert _keyed(out) == _keyed(reference)


def test_predict_strategy_keeps_each_ranks_weights(monkeypatch):
    """--run.strategy ddp: gloo, and the predict loop's setup sends no weights (Lightning's
    DDPStrategy does: the same check fails for it)."""
    import lightning as L
    import lightning.pytorch.strategies.ddp as ddp
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from pipeline.runner.strategy import PredictDDPStrategy, strategy_for

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def predict_step(self, batch, batch_idx):
            return self.layer(batch)

    synced = []
    monkeypatch.setattr(ddp, "_sync_module_states", lambda module: synced.append(module))
    loader = torch.utils.data.DataLoader(torch.ones(2, 2), batch_size=2)
    # Lightning writes the process group's address and port into the environment: kept from the
    # later tests' subprocesses, which would otherwise all try this (still bound) port
    environment = mock.patch.dict(os.environ)
    environment.start()
    try:
        for strategy, sends in ((strategy_for("ddp"), False), (DDPStrategy(), True)):
            trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False,
                                enable_progress_bar=False, enable_model_summary=False)
            synced.clear()
            trainer.predict(Probe(), loader)
            assert bool(synced) == sends
    finally:  # the process group of this one-rank DDP: not left to later tests of this process
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        environment.stop()
    assert isinstance(strategy_for("ddp"), PredictDDPStrategy) and strategy_for("ddp").process_group_backend == "gloo"
    assert strategy_for("auto") == "auto"


RANK_SLOW_BLOCKS = """\
import os, sys, time
import pipeline.runner.module as module
from pipeline.cli import main
decode = module.decode_batch
def slow(*args, **kwargs):  # rank 1's device is slow: each of its blocks takes seconds longer
    if os.environ["LOCAL_RANK"] == "1":
        time.sleep(float(os.environ["SLOW_BLOCK_S"]))
    return decode(*args, **kwargs)
module.decode_batch = slow
sys.exit(main(sys.argv[1:]))
"""


def test_blocks_go_to_the_rank_that_is_free(tiny_dir, reference, tmp_path):
    """Four blocks, rank 1 8 s slower per block: after each rank's first block, rank 0 takes every
    block left while rank 1 still computes its first (a fixed deal gave each rank two). The
    records are those of one process, each sample once."""
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SLOW_BLOCKS)
    out = tmp_path / "run"
    returncode, _, stderr = _finished(_torchrun(str(script), *_command(tiny_dir, out, 2)[3:]),
                                      env={**_env(), "SLOW_BLOCK_S": "8"})
    assert returncode == 0, stderr[-4000:]
    shards = [(out / f"records.rank{rank}.jsonl").read_text().splitlines() for rank in (0, 1)]
    samples = [{Record.from_json(json.loads(line)).sample_id for line in shard} for shard in shards]
    assert samples == [{"demo:0", "demo:1", "demo:4", "demo:5", "demo:6", "demo:7"}, {"demo:2", "demo:3"}]
    assert _keyed(out) == _keyed(reference)
