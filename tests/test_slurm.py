"""A real one-node SLURM cluster: a job array of two configs, one task requeued mid-run.

The cluster is started by ``slurm/local_cluster.sh`` (Debian's slurmctld, slurmd and
munge; root; no systemd). Where SLURM cannot start the test is skipped with the reason,
unless SPARSEACT_REQUIRE_SLURM=1 (set by CI), where it fails instead.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny_checkpoint

from pipeline.results.record import Record

ROOT = Path(__file__).resolve().parents[1]


def _cluster_or_skip():
    problem = None
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        problem = "SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge)"
    elif os.geteuid() != 0:
        problem = "starting a SLURM cluster needs root"
    else:
        started = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh")], capture_output=True, text=True)
        if started.returncode != 0:
            problem = f"SLURM did not start: {started.stderr.strip()[-300:]}"
    if problem:
        if os.environ.get("SPARSEACT_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


def _wait(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _job_field(job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for token in shown.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_job_array_with_requeue(tmp_path):
    _cluster_or_skip()
    tiny = make_tiny_checkpoint(tmp_path / "tiny")
    questions = tmp_path / "questions.jsonl"
    # long answers make task 0 run long enough to be requeued mid-run
    questions.write_text("".join(
        json.dumps({"question": f"w{i} w{i + 1} is the ?", "answer": " ".join(f"w{(i * 7 + j) % 80}" for j in range(60))})
        + "\n" for i in range(40)))
    runs = {"a": tmp_path / "run_a", "b": tmp_path / "run_b"}
    configs = {
        "a": f"model: {{name: {tiny}}}\ndata: {{dataset: {questions}}}\n"
             "protocol: {metrics: [magnitude, gxo, ig, cor_gxo], ig_steps: 8, max_new_tokens: 60}\n"
             f"run: {{output_dir: {runs['a']}, progress: false, accelerator: cpu}}\n",
        "b": f"model: {{name: {tiny}}}\ndata: {{limit: 4}}\nprotocol: {{levels: [0.0, 0.5]}}\n"
             f"run: {{output_dir: {runs['b']}, progress: false, accelerator: cpu}}\n",
    }
    listing = tmp_path / "configs.txt"
    for name, text in configs.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    listing.write_text(f"{tmp_path / 'a.yaml'}\n{tmp_path / 'b.yaml'}\n")

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    job = subprocess.run(["sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/slurm-%A_%a.out",
                          str(ROOT / "slurm" / "array.sbatch"), str(listing)],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    records_a = runs["a"] / "records.jsonl"
    total_a = 40 * 4 * 10
    _wait(lambda: _lines(records_a) >= 100, 240, "task 0 to write records")
    assert _lines(records_a) < total_a, "task 0 finished before it could be requeued"
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True)

    _wait(lambda: all(_job_field(f"{job}_{i}", "JobState") == "COMPLETED" for i in (0, 1)), 300, "both tasks")
    assert _job_field(f"{job}_0", "Restarts") == "1"
    log = (tmp_path / f"slurm-{job}_0.out").read_text()
    assert "stopped by SIGTERM" in log and "restart 1" in log

    for name, expected in (("a", total_a), ("b", 4 * 5 * 2)):
        lines = (runs[name] / "records.jsonl").read_text().splitlines()
        keys = [(r.sample_id, r.metric, r.level) for r in (Record.from_json(json.loads(line)) for line in lines)]
        assert len(keys) == len(set(keys)) == expected  # complete, nothing written twice
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert {row["n"] for row in summary["rows"]} == {expected // len(summary["rows"])}
