"""A run directory can never mix two runs or stall: content fingerprints, the lock, OS errors, signals.

Each test here reproduces a way a cluster user got wrong results or a stuck directory:
edited data or weights resumed silently, two runs writing one directory, a full disk,
and errors that ended in tracebacks. Every refusal must be one line, exit 2, and leave
the directory as it was.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny_checkpoint

from pipeline.cli import main
from pipeline.results.record import Record
from pipeline.results.store import fingerprint, read_records
from pipeline.runner.lock import RunLock


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _questions(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": "w1 w2 w3"}) + "\n" for q in questions))
    return path


QUESTIONS = ["the w3 w4 is ?", "w5 w6 the w7 ?", "w8 is w9 ?", "w10 w11 w12 w13 ?"]


def _args(model, data, out, *extra):
    return ["run", "--model.name", str(model), "--data.dataset", str(data), "--protocol.metrics", "[magnitude, cor_gxo]",
            "--protocol.levels", "[0.0, 0.5]", "--protocol.max_new_tokens", "4", "--run.output_dir", str(out),
            "--run.progress", "false", "--run.plot", "false", "--run.batch_size", "2", *extra]


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.startswith(".lock")}


def _refused(capsys, argv) -> str:
    """Run the command, expect exit 2 with one line and no traceback; return the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _outputs(out: Path) -> dict:
    return {(r.sample_id, r.metric, r.level): (r.output, r.bleu) for r in read_records(out)}


def test_edited_question_is_refused_and_symlink_accepted(tiny_dir, tmp_path, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "run"
    main(_args(tiny_dir, data, out))
    before = _snapshot(out)

    _questions(data, QUESTIONS[:1] + ["w20 w21 ?"] + QUESTIONS[2:])  # one question edited in place
    line = _refused(capsys, _args(tiny_dir, data, out))
    assert "data.content_sha256" in line and "different configuration" in line
    assert _snapshot(out) == before

    _questions(data, QUESTIONS)
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    capsys.readouterr()
    main(_args(tiny_dir, link, out))  # same rows through another path: the same run
    assert "4 of 4 samples already done" in capsys.readouterr().out


def test_records_of_other_code_are_refused(tiny_dir, tmp_path, capsys, monkeypatch):
    """Code that computes other numbers from the same inputs (``NUMBERS_VERSION``) is another run:
    neither a directory of an older version nor one made before the field existed is appended to."""
    import pipeline.runner.run as run_module
    from pipeline.results.store import NUMBERS_VERSION

    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    out = tmp_path / "run"
    main(_args(tiny_dir, data, out))
    before = _snapshot(out)
    monkeypatch.setattr(run_module, "NUMBERS_VERSION", NUMBERS_VERSION + 1)
    line = _refused(capsys, _args(tiny_dir, data, out))
    assert f"numbers_version: {NUMBERS_VERSION} -> {NUMBERS_VERSION + 1}" in line
    assert _snapshot(out) == before
    monkeypatch.undo()

    info = json.loads((out / "run.json").read_text())  # as written before the field existed
    del info["numbers_affecting"]["numbers_version"]
    info["fingerprint"] = fingerprint(info["numbers_affecting"])
    (out / "run.json").write_text(json.dumps(info))
    before = _snapshot(out)
    line = _refused(capsys, _args(tiny_dir, data, out))
    assert f"numbers_version: (absent) -> {NUMBERS_VERSION}" in line
    assert _snapshot(out) == before


def test_replaced_local_weights_are_refused(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "model")
    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    out = tmp_path / "run"
    main(_args(model, data, out))
    before = _snapshot(out)
    # another checkpoint saved over the first, same architecture and file names
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    save_file({k: v + 0.01 * torch.ones_like(v) for k, v in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    line = _refused(capsys, _args(model, data, out))
    assert "weights: " in line
    assert _snapshot(out) == before


def test_batch_size_is_part_of_the_configuration(tiny_dir, tmp_path, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    out = tmp_path / "run"
    main(_args(tiny_dir, data, out))
    line = _refused(capsys, _args(tiny_dir, data, out, "--run.batch_size", "1"))
    assert "batch_size: 2 -> 1" in line


def test_hand_edited_run_json_is_refused(tiny_dir, tmp_path, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    out = tmp_path / "run"
    main(_args(tiny_dir, data, out))
    info = json.loads((out / "run.json").read_text())
    assert info["fingerprint"] == fingerprint(info["numbers_affecting"])
    info["numbers_affecting"]["protocol"]["levels"] = [0.0, 0.7]  # fingerprint kept
    (out / "run.json").write_text(json.dumps(info))
    assert "was edited" in _refused(capsys, _args(tiny_dir, data, out))


def test_unreadable_record_line_is_reported_once_and_recomputed(tiny_dir, tmp_path, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "run"
    main(_args(tiny_dir, data, out))
    reference = _outputs(out)
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    lines[5] = "garbage that is not json\n"
    (out / "records.jsonl").write_text("".join(lines))
    capsys.readouterr()
    main(_args(tiny_dir, data, out))
    printed = capsys.readouterr().out
    assert printed.count("skipped 1 unreadable line (records.jsonl line 6)") == 1
    assert _outputs(out) == reference


def test_a_held_lock_refuses_a_second_run(tiny_dir, tmp_path, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    out = tmp_path / "run"
    main(_args(tiny_dir, data, out))
    before = _snapshot(out)
    with RunLock(out, 0):
        line = _refused(capsys, _args(tiny_dir, data, out))
    assert f"in use by another run (pid {os.getpid()} on " in line
    assert _snapshot(out) == before
    main(_args(tiny_dir, data, out))  # released: runs again


def _command(tiny_dir, data, out):
    return [sys.executable, "-m", "pipeline", *_args(tiny_dir, data, out, "--run.accelerator", "cpu")]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _lock_holder(lock: Path, processes):
    """The process that holds ``lock`` (its pid is written there once it has it)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        text = lock.read_text() if lock.exists() else ""
        for process in processes:
            if text.startswith(f"pid {process.pid} "):
                return process
        time.sleep(0.01)
    raise AssertionError(f"no process took {lock}")


def test_two_runs_at_once_then_kill_9_of_the_holder(tiny_dir, tmp_path):
    data = _questions(tmp_path / "q.jsonl", [f"w{i} w{i + 1} the ?" for i in range(3, 40, 2)])  # 19 questions
    reference = tmp_path / "reference"
    subprocess.run(_command(tiny_dir, data, reference), env=_env(), check=True, capture_output=True)

    # Two at once: exactly one computes, the other exits 2 with one line. The holder is paused
    # once it holds the lock, so that on a loaded machine it cannot finish before the other
    # reaches the lock.
    out = tmp_path / "run"
    both = [subprocess.Popen(_command(tiny_dir, data, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    holder = _lock_holder(out / ".lock.rank0", both)
    holder.send_signal(signal.SIGSTOP)
    other = next(p for p in both if p is not holder)
    code, err = other.wait(timeout=300), other.stderr.read().strip()
    holder.send_signal(signal.SIGCONT)
    assert holder.wait(timeout=300) == 0, holder.stderr.read()[-2000:]
    assert code == 2, err
    assert len(err.splitlines()) == 1 and f"in use by another run (pid {holder.pid} on " in err
    assert _outputs(out) == _outputs(reference)
    assert sum(1 for _ in (out / "records.jsonl").open()) == len(_outputs(reference))  # no duplicate lines

    # The holder is killed with SIGKILL while holding the lock: the next run takes it at once.
    killed = tmp_path / "killed"
    holder = subprocess.Popen(_command(tiny_dir, data, killed), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _lock_holder(killed / ".lock.rank0", [holder])
    holder.kill()
    holder.wait()
    started = time.time()
    result = subprocess.run(_command(tiny_dir, data, killed), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.time() - started < 120
    assert _outputs(killed) == _outputs(reference)


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mount (skips where mounting is not allowed)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_gives_one_line_and_completes_after_space_is_freed(tiny_dir, tmp_path, tmpfs, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS)
    reference = tmp_path / "reference"
    main(_args(tiny_dir, data, reference))

    out = tmpfs / "run"
    line = _refused(capsys, _args(tiny_dir, data, out))
    assert "No space left on device" in line
    assert not list(out.glob("*.partial"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(tmpfs)], check=True)
    main(_args(tiny_dir, data, out))
    assert _outputs(out) == _outputs(reference)


def test_read_only_file_system_gives_one_line(tiny_dir, tmp_path, tmpfs, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    line = _refused(capsys, _args(tiny_dir, data, tmpfs / "run"))
    assert "Read-only file system" in line


def _bad_files(tmp_path: Path) -> dict:
    header_only = tmp_path / "header.csv"
    header_only.write_text("question,answer\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "w1 ?", "answer": "w2"}\n{"question": "w3 ?", "answer": \n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question": "w1 ?", "answer": "w2"}\n{"question": "caf\u00e9 ?", "answer": "w2"}\n'.encode("latin-1"))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": " ".join(["w5"] * 3000), "answer": "w1"}) + "\n")
    return {"header": header_only, "broken": broken, "latin1": latin1, "long": long}


BAD = {
    "duplicate levels": (["--protocol.levels", "[0.0, 0.5, 0.5]"], "level(s) given more than once: 0.5"),
    "duplicate metrics": (["--protocol.metrics", "[gxo, gxo]"], "metric(s) given more than once: gxo"),
    "no devices": (["--run.devices", "0"], "run.devices must be >= 1"),
    "header-only csv": (["--data.dataset", "{header}"], "has a header but no rows"),
    "broken jsonl line": (["--data.dataset", "{broken}"], "broken.jsonl, line 2: not valid JSON"),
    "not utf-8": (["--data.dataset", "{latin1}"], "latin1.jsonl, line 2: not UTF-8 text"),
    "prompt beyond context": (["--data.dataset", "{long}"], "more than the 2048 of"),
    "output dir is a file": (["--run.output_dir", "{file}"], "is a file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nothing_written(case, tiny_dir, tmp_path, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    out = tmp_path / "run"
    main(_args(tiny_dir, data, out))
    before = _snapshot(out)
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("not a directory")
    extra, message = BAD[case]
    extra = [e.format(file=plain_file, **_bad_files(tmp_path)) for e in extra]
    line = _refused(capsys, _args(tiny_dir, data, out, *extra))
    assert message in line
    assert _snapshot(out) == before
    assert plain_file.read_text() == "not a directory"


def test_devices_zero_on_a_new_directory_writes_nothing(tiny_dir, tmp_path, capsys):
    data = _questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    out = tmp_path / "new"
    _refused(capsys, _args(tiny_dir, data, out, "--run.devices", "0"))
    assert not out.exists()


def test_hub_id_offline_fails_fast_in_one_line(tmp_path):
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--model.name", "nobody/no-such-model",
                             "--run.output_dir", str(tmp_path / "x")], capture_output=True, text=True,
                            env={**_env(), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot be reached (offline)" in result.stderr
    assert time.time() - started < 30
    assert not (tmp_path / "x").exists()


def _start_and_signal(command, out: Path, signum: int, group: bool):
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.time() + 120
    while process.poll() is None and not any(p.stat().st_size for p in out.glob("records*.jsonl")) \
            and time.time() < deadline:
        time.sleep(0.02)
    if group:
        os.killpg(process.pid, signum)  # as a terminal's Ctrl-C reaches every process of the job
    else:
        process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output


@pytest.mark.parametrize("devices", [1, 2])
def test_ctrl_c_prints_what_was_saved_and_exits_130(tiny_dir, tmp_path, devices):
    data = _questions(tmp_path / "q.jsonl", [f"w{i} w{i + 1} the ?" for i in range(3, 60, 2)])
    out = tmp_path / "run"
    command = _command(tiny_dir, data, out) + (["--run.devices", "2", "--run.strategy", "ddp"] if devices > 1 else [])
    code, output = _start_and_signal(command, out, signal.SIGINT, group=True)
    assert code != 0, "the run finished: the signal was ignored, or came after 29 questions in 15 blocks"
    assert code == 130, output
    assert "Traceback" not in output
    assert output.strip().splitlines() == [
        "sparseact: interrupted; finished samples are saved, rerun the same command to resume"]


def test_sigterm_under_ddp_stops_every_rank_quietly(tiny_dir, tmp_path):
    data = _questions(tmp_path / "q.jsonl", [f"w{i} w{i + 1} the ?" for i in range(3, 60, 2)])
    out = tmp_path / "run"
    command = _command(tiny_dir, data, out) + ["--run.devices", "2", "--run.strategy", "ddp"]
    code, output = _start_and_signal(command, out, signal.SIGTERM, group=False)  # SIGTERM to rank 0 only
    assert code != 0, "the run finished: the signal was ignored, or came after 29 questions in 15 blocks"
    assert code == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "rank1" not in output
    assert "stopped by SIGTERM" in output
    every = [Record.from_json(json.loads(line))
             for shard in out.glob("records.rank*.jsonl") for line in shard.read_text().splitlines()]
    assert len(every) == len({(r.sample_id, r.metric, r.level) for r in every})


def test_hub_dataset_offline_reads_the_cache_or_fails_in_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    import pipeline.hub

    monkeypatch.setattr(pipeline.hub, "hub_reachable", lambda: False)
    line = _refused(capsys, _args(tiny_dir, "nobody/no-such-dataset", tmp_path / "run"))
    assert "not in the local cache and the Hugging Face Hub cannot be reached (offline)" in line
    assert not (tmp_path / "run").exists()
