"""The command line end to end on a tiny local model: outputs, resume, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_checkpoint

from pipeline.cli import main
from pipeline.models import loading
from pipeline.results.record import Record


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _args(tiny_dir, out, *extra):
    return ["run", "--model.name", str(tiny_dir), "--data.limit", "3", "--protocol.metrics", "[magnitude, cor_gxo]",
            "--protocol.levels", "[0.0, 0.5]", "--protocol.max_new_tokens", "5", "--run.output_dir", str(out),
            "--run.progress", "false", *extra]


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_run_writes_outputs_and_resumes(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(_args(tiny_dir, out))
    printed = capsys.readouterr().out
    assert "max sparsity within 5% accuracy loss" in printed
    for name in ("run.json", "records.jsonl", "summary.csv", "summary.json", "curves.png"):
        assert (out / name).stat().st_size > 0
    records = [Record.from_json(json.loads(line)) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 2
    assert {(r.sample_id, r.metric, r.level) for r in records} == {
        (f"demo:{i}", m, p) for i in range(3) for m in ("magnitude", "cor_gxo") for p in (0.0, 0.5)}
    for r in records:
        if r.level == 0.0:
            assert r.bleu == 100.0 and r.token_agreement == 1.0 and r.sparsity == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["max_sparsity_within_5pct_loss"]) == {"magnitude", "cor_gxo"}

    # Rerun: nothing recomputed, nothing duplicated.
    main(_args(tiny_dir, out))
    assert "3 of 3 samples already done" in capsys.readouterr().out
    assert (out / "records.jsonl").read_text().count("\n") == 12


def test_torn_last_line_is_ignored_and_completed(tiny_dir, tmp_path):
    out = tmp_path / "run"
    main(_args(tiny_dir, out))
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    # simulate a kill while the last sample was being written
    (out / "records.jsonl").write_text("".join(lines[:-2]) + lines[-2][:10])
    main(_args(tiny_dir, out))
    records = [Record.from_json(json.loads(l)) for l in (out / "records.jsonl").read_text().splitlines() if l.startswith('{"sample_id"') and l.endswith("}")]
    keys = [(r.sample_id, r.metric, r.level) for r in records]
    assert len(set(keys)) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert all(row["n"] == 3 for row in summary["rows"])


BAD_INPUTS = {
    "unknown model": (["--model.name", "no-such-model"], "unknown model 'no-such-model'"),
    "package not installed": (["--model.name", "fake-bundled"], "model package 'sparseact-no-such-package' is not installed"),
    "missing data file": (["--data.dataset", "/nonexistent/questions.csv"], "data file not found"),
    "malformed row": (["--data.dataset", "{bad}"], "row 1 of dataset"),
    "level outside [0, 1)": (["--protocol.levels", "[0.0, 1.0]"], "outside [0, 1)"),
    "ig_steps < 1": (["--protocol.ig_steps", "0"], "ig_steps must be >= 1"),
    "empty dataset": (["--data.dataset", "{empty}"], "is empty"),
    "unknown metric": (["--protocol.metrics", "[gxo, wizardry]"], "unknown metric(s) wizardry"),
    "changed config": (["--protocol.levels", "[0.0, 0.3]"], "different configuration"),
    "allocation a score lacks": (["--protocol.allocation", "calibrated"],
                                 "score cor_gxo does not support allocation calibrated (it supports per_layer, global)"),
    "static ranked globally": (["--protocol.metrics", "[static]", "--protocol.allocation", "global"],
                               "score static does not support allocation global"),
    "unknown allocation": (["--protocol.allocation", "sideways"], "unknown allocation(s) sideways; choose from"),
    "unknown normalisation": (["--protocol.allocation", "[per_layer, global]", "--protocol.normalize", "[mean, cubic]"],
                              "unknown normalisation(s) cubic; choose from none, mean, l2, rank"),
    "calibrated without rows": (["--protocol.metrics", "[magnitude]", "--protocol.allocation", "calibrated",
                                 "--data.start", "30"], "calibrates on the 16 rows after the evaluated ones"),
    "missing levels file": (["--protocol.metrics", "[magnitude]", "--protocol.allocation", "calibrated",
                             "--protocol.allocation_levels", "/nonexistent/levels.json"],
                            "allocation levels file not found: /nonexistent/levels.json"),
    "levels file of another model": (["--protocol.metrics", "[magnitude]", "--protocol.allocation", "calibrated",
                                      "--protocol.allocation_levels", "{levels}"], "holds levels for 30 layers"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_leaves_run_dir_alone(case, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(loading.BUNDLED, "fake-bundled", loading.Bundled("sparseact-no-such-package", "pip install it"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine?", "answer": "yes"}\n{"question": null, "answer": "no"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    main(_args(tiny_dir, out))
    before = _snapshot(out)
    capsys.readouterr()

    extra, message = BAD_INPUTS[case]
    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps({"format": "sparseact-calibrated-levels/1", "layers": 30, "heads": 9, "neurons": 1536,
                                  "scores": {"magnitude": {}}}))
    extra = [e.format(bad=bad, empty=empty, levels=levels) for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_dir, out, *extra))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_calibrated_without_rows_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "fresh"
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_dir, out, "--protocol.metrics", "[wina]", "--protocol.allocation", "[per_layer, calibrated]",
                   "--data.limit", "30"))
    assert exit_info.value.code == 2 and not out.exists()
    assert "calibrates on the 16 rows after the evaluated ones, but only 4 remain" in capsys.readouterr().err


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--model.name", "no-such-model",
                             "--run.output_dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sparseact: error: unknown model 'no-such-model': not a bundled name (smollm2-135m, gemma3-270m), "
        "a local model directory, or a Hugging Face id (owner/name)"]
    assert not (tmp_path / "x").exists()


def test_print_config_round_trips(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--protocol.levels", "[0.0, 0.2]", "--print_config"],
                            capture_output=True, text=True, check=True)
    config = tmp_path / "c.yaml"
    config.write_text(result.stdout)
    again = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--print_config"],
                           capture_output=True, text=True, check=True)
    assert again.stdout == result.stdout and "- 0.2" in result.stdout


def test_saved_raw_scores_round_trip(tiny_dir, tmp_path):
    import torch

    from pipeline import attribute, load_scores
    from pipeline.config import ModelConfig
    from pipeline.models.loading import load_model
    from pipeline.models.prompts import prompt_ids, resolve_template

    out = tmp_path / "run"
    main(_args(tiny_dir, out, "--protocol.save_scores", "true", "--data.limit", "2"))
    records = [Record.from_json(json.loads(line)) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["demo_0.safetensors", "demo_1.safetensors"]
    saved = load_scores(out, "demo:1")
    assert set(saved) == {"magnitude", "cor_gxo"}
    # recompute independently from the recorded dense output
    loaded = load_model(ModelConfig(name=str(tiny_dir)))
    template = resolve_template("auto", loaded.tokenizer)
    question = next(r.question for r in records if r.sample_id == "demo:1")
    prompt = torch.tensor(prompt_ids(loaded.tokenizer, template, question))
    n = next(r.n_dense_tokens for r in records if r.sample_id == "demo:1")
    from pipeline.decoding.generation import greedy_generate
    from pipeline.models.prompts import stop_token_ids

    labels = torch.tensor(greedy_generate(loaded.model, prompt, n, stop_token_ids(loaded.tokenizer, loaded.model))[0])
    fresh = attribute(loaded.model, prompt, labels, metrics=["cor_gxo"])["cor_gxo"]
    torch.testing.assert_close(saved["cor_gxo"].neurons, fresh.neurons, rtol=1e-5, atol=1e-7)
    assert saved["cor_gxo"].heads.shape == fresh.heads.shape


def _writer_in_background(monkeypatch):
    """The record writer's thread, the accelerator default, on the CPU too."""
    from pipeline.runner import callbacks

    monkeypatch.setattr(callbacks.RecordWriter, "setup", lambda self, *args, **kwargs: setattr(self, "background", True))


def test_background_records_are_the_synchronous_ones(tiny_dir, tmp_path, monkeypatch):
    """Host work in the writer's thread (the accelerator default, forced here on the CPU) writes
    the same records, in the same order, as the synchronous writer, over several batches."""
    import threading

    from pipeline.runner import callbacks

    main(_args(tiny_dir, tmp_path / "sync", "--run.batch_size", "1"))
    threads = set()
    write = callbacks.RecordWriter._write

    def recording(shard, host_work):
        threads.add(threading.current_thread().name)
        intervals.append(sys.getswitchinterval())
        return write(shard, host_work)

    intervals, before = [], sys.getswitchinterval()
    _writer_in_background(monkeypatch)
    monkeypatch.setattr(callbacks.RecordWriter, "_write", staticmethod(recording))
    main(_args(tiny_dir, tmp_path / "background", "--run.batch_size", "1"))
    assert threads and all(name.startswith("sparseact-records") for name in threads)
    # the feeding thread's turns come back sooner while the record thread runs, and Python's after
    assert intervals and all(i == pytest.approx(callbacks.RECORD_THREAD_SWITCH_S) and i < before for i in intervals)
    assert sys.getswitchinterval() == before
    assert (tmp_path / "background" / "records.jsonl").read_bytes() == (tmp_path / "sync" / "records.jsonl").read_bytes()


def test_a_batchs_host_work_waits_for_the_next_batchs_launches(tiny_dir, tmp_path, monkeypatch):
    """In the writer's thread, batch k's host work starts when batch k+1 says its launch-bound work
    (labels, scores, masks) is queued (``RecordWriter.device_busy``, passed down to the predict
    step), before the writer waits for it; the last batch's starts when prediction ends. A slow
    attribution makes starting at once show, and a pause after ``device_busy`` a start that only
    comes from the wait."""
    import time

    from pipeline import protocol
    from pipeline.runner import callbacks

    events = []  # in order, from both threads
    attribute, write = protocol.attribute_batch, callbacks.RecordWriter._write
    busy, wait = callbacks.RecordWriter.device_busy, callbacks.RecordWriter.wait

    def slow_attribution(*args, **kwargs):
        time.sleep(0.3)
        return attribute(*args, **kwargs)

    def recording_busy(self):
        events.append("device busy")
        busy(self)
        time.sleep(0.3)

    def recording_wait(self):
        events.append("wait")
        return wait(self)

    def recording_write(shard, host_work):
        events.append("host work")
        return write(shard, host_work)

    monkeypatch.setattr(protocol, "attribute_batch", slow_attribution)
    _writer_in_background(monkeypatch)
    monkeypatch.setattr(callbacks.RecordWriter, "device_busy", recording_busy)
    monkeypatch.setattr(callbacks.RecordWriter, "wait", recording_wait)
    monkeypatch.setattr(callbacks.RecordWriter, "_write", staticmethod(recording_write))
    main(_args(tiny_dir, tmp_path / "run", "--run.batch_size", "1"))
    # three batches: each waits for the one before at its end (nothing pending at the first), and
    # prediction's end waits for the last
    assert events == ["device busy", "wait",
                      "device busy", "host work", "wait",
                      "device busy", "host work", "wait",
                      "wait", "host work"], events
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 3 * 2 * 2


def test_host_work_nobody_waited_for_is_written_when_the_writer_closes(tmp_path):
    """If no hook waited for the pending batch (one before the writer's failed), closing the writer
    still writes it instead of leaving its thread waiting for ever (the process could not exit)."""
    import pickle
    import threading

    from pipeline.results.store import read_records
    from pipeline.runner.callbacks import RecordWriter

    writer = RecordWriter(tmp_path, background=True)
    pickle.dumps(writer)  # as a spawning launcher would
    writer.write_on_batch_end(_Trainer(), None, _host_work(["a"]), None, None, 0)
    closing = threading.Thread(target=writer._close)
    closing.start()
    closing.join(10)
    assert not closing.is_alive()
    assert [r.sample_id for r in read_records(tmp_path)] == ["a"]


def test_objects_of_before_prediction_are_left_out_of_garbage_collections(tiny_dir, tmp_path, monkeypatch):
    """While predicting, the objects that existed before (libraries, model) are frozen out of the
    garbage collector's scans; afterwards they are the collector's again, also after a failure and
    when objects had been frozen before the run (the H200 image's Python starts with 375)."""
    import gc

    from pipeline.runner import module

    frozen = []
    step = module.SparseActivationModule.predict_step

    def recording(self, *args, **kwargs):
        frozen.append(gc.get_freeze_count())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(module.SparseActivationModule, "predict_step", recording)
    gc.unfreeze()
    main(_args(tiny_dir, tmp_path / "run", "--run.batch_size", "2"))
    assert frozen and all(count > 10000 for count in frozen)
    assert gc.get_freeze_count() == 0

    def failing(self, *args, **kwargs):
        raise RuntimeError("device lost (simulated)")

    monkeypatch.setattr(module.SparseActivationModule, "predict_step", failing)
    with pytest.raises(RuntimeError):
        main(_args(tiny_dir, tmp_path / "failed"))
    assert gc.get_freeze_count() == 0

    # objects frozen before the run: the run still freezes the objects it made before predicting
    # (model, trainer), and afterwards the model of the run can be collected
    import weakref

    gc.freeze()
    try:
        frozen_by_caller = gc.get_freeze_count()
        frozen.clear()
        models = []

        def keeping(self, *args, **kwargs):
            models.append(weakref.ref(self.model))
            return recording(self, *args, **kwargs)

        monkeypatch.setattr(module.SparseActivationModule, "predict_step", keeping)
        main(_args(tiny_dir, tmp_path / "caller_froze", "--run.batch_size", "2"))
        assert frozen and all(count > frozen_by_caller + 1000 for count in frozen), (frozen, frozen_by_caller)
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert models and models[0]() is None  # left frozen, the run's cycles kept it for good
    finally:
        gc.unfreeze()


class _Trainer:
    world_size, global_rank = 1, 0


def _host_work(sample_ids, fail=False):
    from pipeline.protocol import EvaluatedBatch

    def work():
        if fail:
            raise OSError("disk full (simulated)")
        return EvaluatedBatch(records=[Record(
            sample_id=s, metric="magnitude", level=0.0, sparsity=0.0, kept_heads=[1.0], kept_neurons=[1.0], bleu=100.0,
            token_agreement=1.0, task_score=None, dense_task_score=None, n_tokens=1, n_dense_tokens=1, output="x",
            dense_output="x", question="q", reference="r") for s in sample_ids])
    return work


def test_background_writer_keeps_the_pending_batch_when_the_next_one_fails(tmp_path):
    from pipeline.results.store import read_records
    from pipeline.runner.callbacks import RecordWriter

    before = sys.getswitchinterval()
    writer = RecordWriter(tmp_path, background=True)
    writer.write_on_batch_end(_Trainer(), None, _host_work(["a", "b"]), None, None, 0)
    assert sys.getswitchinterval() < before
    writer.on_exception(_Trainer(), None, RuntimeError("the next batch failed"))
    assert [r.sample_id for r in read_records(tmp_path)] == ["a", "b"]
    assert sys.getswitchinterval() == before  # Python's again after a failure too


def test_background_writer_raises_the_host_work_error_at_the_next_batch(tmp_path):
    from pipeline.runner.callbacks import RecordWriter

    writer = RecordWriter(tmp_path, background=True)
    writer.write_on_batch_end(_Trainer(), None, _host_work(["a"], fail=True), None, None, 0)
    with pytest.raises(OSError, match="disk full"):
        writer.write_on_batch_end(_Trainer(), None, _host_work(["b"]), None, None, 1)
    writer.on_predict_end(_Trainer(), None)
    assert not (tmp_path / "records.jsonl").exists()


def test_the_record_threads_tokenizer_is_a_copy_made_before_the_predict_loop(tiny_dir, tmp_path, monkeypatch):
    """The host work (records) gets its own tokenizer, made before the first batch: a copy made at
    the first batch left the device idle (0.19 s per process on an H200)."""
    from pipeline.runner import module

    seen = []
    step = module.SparseActivationModule.predict_step

    def recording(self, *args, **kwargs):
        seen.append(vars(self).get("host_tokenizer"))
        seen.append(self.tokenizer)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(module.SparseActivationModule, "predict_step", recording)
    main(_args(tiny_dir, tmp_path / "run", "--run.batch_size", "2"))
    host, tokenizer = seen[:2]
    assert host is not None and host is not tokenizer and type(host) is type(tokenizer)
    assert host.get_vocab() == tokenizer.get_vocab()
    assert all(copy is host for copy in seen[::2])  # one copy for the whole run
