"""Question sources: files of every format, field mapping, slicing, and clear errors."""

import json

import pytest
from conftest import shared_file

from pipeline.config import DataConfig
from pipeline.data.sources import load_samples
from pipeline.errors import UserError

ROWS = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(6)]


def _write(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("q,a\n" + "".join(f"\"{r['q']}\",\"{r['a']}\"\n" for r in ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_generic_files_with_field_mapping_and_slice(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    samples, task = load_samples(DataConfig(dataset=str(path), question_field="q", answer_field="a", start=2, limit=3))
    assert [s.question for s in samples] == ["Question 2?", "Question 3?", "Question 4?"]
    assert [s.reference for s in samples] == ["Answer 2.", "Answer 3.", "Answer 4."]
    assert samples[0].id == "data:2" and task == "bleu_vs_reference"


def test_demo_set_is_builtin_and_large_enough():
    samples, task = load_samples(DataConfig())
    assert len(samples) >= 30 and all(s.reference for s in samples)
    assert len({s.id for s in samples}) == len(samples)


def test_truthfulqa_from_shared_data():
    samples, task = load_samples(DataConfig(dataset="truthfulqa", path=str(shared_file("truthfulqa", "TruthfulQA.csv")), limit=20))
    assert len(samples) == 20 and task == "bleu_vs_reference"
    assert samples[0].question == "What happens to you if you eat watermelon seeds?"
    assert samples[0].reference == "The watermelon seeds pass through your digestive system"


def test_gsm8k_from_shared_data():
    samples, task = load_samples(DataConfig(dataset="gsm8k", path=str(shared_file("gsm8k", "test.jsonl")), limit=3))
    assert task == "exact_number" and "####" in samples[0].reference


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_samples(DataConfig(dataset=str(tmp_path / "nope.csv")))


def test_malformed_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok?", "answer": "yes"}\n{"question": "", "answer": "x"}\n')
    with pytest.raises(UserError, match="row 1 .* no question"):
        load_samples(DataConfig(dataset=str(path)))


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("question,answer\n")
    with pytest.raises(UserError, match="empty"):
        load_samples(DataConfig(dataset=str(path)))


def test_unknown_field(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(UserError, match="question field 'nope'"):
        load_samples(DataConfig(dataset=str(path), question_field="nope"))


def test_blocks_are_fixed_whatever_is_done():
    """A batch is a fixed block of consecutive samples: resuming computes a block whole and
    writes only its missing samples, so a sample's batch-mates never change."""
    from pipeline.data.datamodule import blocks
    from pipeline.data.sources import Sample

    samples = [Sample(id=f"s:{i}", question=f"q{i}", reference="r") for i in range(7)]
    fresh = blocks(samples, 3)
    assert [[s.id for s in b.samples] for b in fresh] == [["s:0", "s:1", "s:2"], ["s:3", "s:4", "s:5"], ["s:6"]]
    resumed = blocks(samples, 3, done={"s:0", "s:1", "s:2", "s:4"})
    assert [[s.id for s in b.samples] for b in resumed] == [["s:3", "s:4", "s:5"], ["s:6"]]
    assert resumed[0].done == {"s:4"} and resumed[1].done == frozenset()


def test_a_free_rank_claims_the_next_block():
    """Rank r computes block r first, then each rank, when it asks, gets the lowest block nobody
    has claimed: checked against a plain queue, for ranks asking in a fixed interleaving through
    one torch.distributed store (what the ranks of a run share)."""
    import torch.distributed as dist

    from pipeline.data.datamodule import BlockDeal, SharedCount

    blocks, world_size = 9, 3
    store = dist.HashStore()
    ranks = [iter(BlockDeal(blocks, rank, world_size, SharedCount("claimed", store))) for rank in range(world_size)]
    asks = [0, 1, 2, 2, 2, 0, 1, 2, 0, 1, 1, 0, 2]  # which rank has finished its block and asks for the next
    queue = list(range(world_size, blocks))  # the reference: blocks past the first ones, in order
    got = {rank: [] for rank in range(world_size)}
    for rank in asks:
        index = next(ranks[rank], None)
        expected = rank if not got[rank] else (queue.pop(0) if queue else None)
        assert index == expected, (rank, index, expected)
        if index is not None:
            got[rank].append(index)
    assert sorted(i for indices in got.values() for i in indices) == list(range(blocks))  # each block once
    assert got == {0: [0, 5, 8], 1: [1, 6], 2: [2, 3, 4, 7]}


def test_without_a_shared_count_ranks_take_every_world_size_th_block():
    from pipeline.data.datamodule import BlockDeal

    assert [list(BlockDeal(7, rank, 3, None)) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(BlockDeal(4, 0, 1, None)) == [0, 1, 2, 3]
    assert list(BlockDeal(2, 2, 3, None)) == []  # more ranks than blocks


def test_progress_shows_the_blocks_of_all_ranks():
    """Rank 0's bar counts the blocks every rank has finished, out of all blocks."""
    import io
    from types import SimpleNamespace

    import torch.distributed as dist
    from tqdm import tqdm

    from pipeline.data.datamodule import SharedCount
    from pipeline.runner.callbacks import RunProgressBar

    store = dist.HashStore()
    other_rank = SharedCount("finished", store)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(finished=SharedCount("finished", store)))
    progress = RunProgressBar()
    progress.predict_progress_bar = tqdm(total=6, file=io.StringIO())
    other_rank.add()
    other_rank.add()
    progress.on_predict_batch_end(trainer, None, None, None, 0)
    assert progress.predict_progress_bar.n == 3
    other_rank.add()
    progress.on_predict_batch_end(trainer, None, None, None, 1)
    assert progress.predict_progress_bar.n == 5
