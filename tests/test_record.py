"""Record: one line of records.jsonl, written and read back unchanged."""

import json

from pipeline.results.record import Record
from pipeline.results.store import append_records, completed_samples, load_records, read_records


def _record(**changes) -> Record:
    fields = dict(sample_id="demo:0", metric="magnitude", level=0.5, sparsity=0.4123456789, kept_heads=[0.5, 0.75],
                  kept_neurons=[0.5, 0.4688], bleu=61.2, token_agreement=0.75, task_score=12.5, dense_task_score=100.0,
                  n_tokens=4, n_dense_tokens=5, output="Paris — la Ville Lumière", dense_output="Paris, Île-de-France",
                  question="Où est la tour Eiffel ?", reference="Paris")
    return Record(**{**fields, **changes})


def test_written_and_read_back_round_trips(tmp_path):
    records = [_record(), _record(metric="wina", allocation="global", normalize="mean",
                                  iou_cor_gxo={"cor_gxo/global/mean": {"heads": 0.25, "neurons": None}}),
               _record(sample_id="demo:1", level=0.0, task_score=None, dense_task_score=None)]
    append_records(tmp_path / "records.jsonl", records)
    loaded = load_records(tmp_path)
    assert loaded.rows == records and not loaded.unreadable
    assert [Record.from_json(json.loads(r.to_json())) for r in records] == records


def test_json_line_is_todays_dict_in_todays_field_order():
    """Written out by hand, in the order protocol.py wrote its dicts before Record existed."""
    line = {
        "sample_id": "demo:0",
        "metric": "magnitude",
        "level": 0.5,
        "sparsity": 0.4123456789,
        "kept_heads": [0.5, 0.75],
        "kept_neurons": [0.5, 0.4688],
        "bleu": 61.2,
        "token_agreement": 0.75,
        "task_score": 12.5,
        "dense_task_score": 100.0,
        "n_tokens": 4,
        "n_dense_tokens": 5,
        "output": "Paris — la Ville Lumière",
        "dense_output": "Paris, Île-de-France",
        "question": "Où est la tour Eiffel ?",
        "reference": "Paris",
        "allocation": "per_layer",
        "normalize": None,
    }
    assert _record().to_json() == json.dumps(line, ensure_ascii=False)
    iou = {"cor_gxo": {"heads": 0.5, "neurons": 0.25}}
    assert _record(iou_cor_gxo=iou).to_json() == json.dumps({**line, "iou_cor_gxo": iou}, ensure_ascii=False)
    assert "iou_cor_gxo" not in _record().to_json()  # only label-free rows of runs with the oracle have it


def test_old_record_without_allocation_reads_as_per_layer(tmp_path):
    old = json.loads(_record().to_json())
    del old["allocation"], old["normalize"]
    (tmp_path / "records.jsonl").write_text(json.dumps(old, ensure_ascii=False) + "\n")
    (record,) = read_records(tmp_path)
    assert record.allocation == "per_layer" and record.normalize is None
    assert record == _record() and record.series == "magnitude"
    assert record.key == ("demo:0", "magnitude", "per_layer", None, 0.5)
    assert _record(metric="wina", allocation="global", normalize="rank").series == "wina/global/rank"
    assert _record(allocation="calibrated").series == "magnitude/calibrated"


def test_line_missing_a_field_is_unreadable(tmp_path):
    whole = json.loads(_record().to_json())
    lines = [json.dumps({k: v for k, v in whole.items() if k != "bleu"}), "[1, 2]", "{\"sample_id\": \"demo:0\"",
             json.dumps({**whole, "sample_id": "demo:1"})]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    loaded = load_records(tmp_path)
    assert [r.sample_id for r in loaded.rows] == ["demo:1"]
    assert loaded.unreadable == ["records.jsonl line 1", "records.jsonl line 2", "records.jsonl line 3"]
    assert completed_samples(loaded.rows, 1) == {"demo:1"}  # the sample of the broken line is redone
