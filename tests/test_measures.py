"""BLEU against sacreBLEU, token agreement, task accuracy, and the headline figure."""

import random

import pytest
import sacrebleu
from conftest import SHARED_DATA

from pipeline.measures import bleu_vs_dense, task_score, token_agreement
from pipeline.measures.task import final_reference_number, last_number
from pipeline.results.record import Record
from pipeline.results.summary import max_sparsity_within_loss, summarize

WORDS = "the a cat dog sat on mat paris is capital of france . , 42 blue".split()


def test_bleu_equals_sacrebleu():
    rng = random.Random(0)
    for _ in range(50):
        hyp = " ".join(rng.choices(WORDS, k=rng.randint(1, 15)))
        ref = " ".join(rng.choices(WORDS, k=rng.randint(1, 15)))
        expected = sacrebleu.corpus_bleu([hyp], [[ref]]).score
        assert bleu_vs_dense([1, 2], [3], hyp, ref) == expected


def test_sentence_bleu_equals_sacrebleu_on_answers_and_odd_text():
    """Texts as runs make them: TruthfulQA's answers against each other (when the data is here),
    cut and shuffled, with punctuation, digits, repeats, unicode, spaces at the ends, and empty."""
    from pipeline.measures.fidelity import sentence_bleu

    rng = random.Random(1)
    texts = ["", " ", "Yes", "Yes.", "yes yes yes yes yes", "It's 3.5 km - or 2,000 m!", "Ça va? Ça va.",
             "  leading and trailing  ", "(a) [b] {c} \"d\" 'e'", "1 2 3 4 5 6 7 8 9 10"]
    csv = SHARED_DATA / "truthfulqa" / "TruthfulQA.csv"
    if csv.exists():
        import csv as csv_module

        with csv.open(newline="", encoding="utf-8") as handle:
            rows = list(csv_module.DictReader(handle))
        texts += [row["Best Answer"] for row in rng.sample(rows, 150)] + [row["Question"] for row in rng.sample(rows, 50)]
    for text in list(texts):
        words = text.split()
        rng.shuffle(words)
        texts.append(" ".join(words[: rng.randint(0, len(words))]))
        texts.append(text + " " + " ".join(rng.choices(WORDS, k=rng.randint(0, 6))))
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(3000)] + [(t, t) for t in texts[:40]]
    for hypothesis, reference in pairs:
        assert sentence_bleu(hypothesis, reference) == sacrebleu.corpus_bleu([hypothesis], [[reference]]).score, \
            (hypothesis, reference)


def test_identical_tokens_score_100_even_when_sacrebleu_would_not():
    assert sacrebleu.corpus_bleu(["Yes"], [["Yes"]]).score < 100
    assert bleu_vs_dense([7], [7], "Yes", "Yes") == 100.0


def test_token_agreement():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert token_agreement([1, 2, 3, 4], [1, 2]) == 0.5


def test_gsm8k_numbers():
    assert final_reference_number("so 3 + 4 = 7\n#### 1,234") == 1234
    assert last_number("The answer is 1234.") == 1234
    assert task_score("exact_number", "He pays $64 in total.", "... #### 64") == 100.0
    assert task_score("exact_number", "He pays 65 dollars", "... #### 64") == 0.0
    assert task_score("exact_number", "no idea", "#### 64") == 0.0
    assert task_score("bleu_vs_reference", "Paris is the capital", "Paris is the capital of France") == \
        sacrebleu.corpus_bleu(["Paris is the capital"], [["Paris is the capital of France"]]).score
    assert task_score("none", "x", "y") is None


def test_max_sparsity_within_loss():
    # loss crosses 5 between sparsity 0.4 (loss 2) and 0.6 (loss 12): 0.4 + 3/10 * 0.2
    assert max_sparsity_within_loss([(0.0, 0), (0.2, 1), (0.4, 2), (0.6, 12), (0.8, 3)]) == pytest.approx(0.46)
    assert max_sparsity_within_loss([(0.0, 6), (0.5, 0)]) == 0.0
    assert max_sparsity_within_loss([(0.0, 0), (0.9, 4)]) == 0.9
    assert max_sparsity_within_loss([(0.3, 5), (0.0, 0)]) == 0.3  # order of sparsity, not of input


def test_summarize_means():
    def record(sample_id, sparsity, bleu, token_agreement):
        return Record(sample_id=sample_id, metric="gxo", level=0.5, sparsity=sparsity, kept_heads=[], kept_neurons=[],
                      bleu=bleu, token_agreement=token_agreement, task_score=None, dense_task_score=None, n_tokens=1,
                      n_dense_tokens=1, output="", dense_output="", question="", reference="")

    records = [record("demo:0", 0.4, 80.0, 0.5), record("demo:1", 0.6, 60.0, 1.0)]
    (row,) = summarize(records)
    assert row["n"] == 2 and row["sparsity"] == pytest.approx(0.5) and row["bleu"] == 70.0
    assert row["accuracy_loss"] == 30.0 and row["task_score"] is None
