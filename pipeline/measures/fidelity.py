"""How closely a masked output follows the dense one."""

from __future__ import annotations

from functools import lru_cache

from sacrebleu.metrics import BLEU
from sacrebleu.metrics.helpers import extract_all_word_ngrams

# ``sacrebleu.corpus_bleu``'s default BLEU (13a tokenisation, exponential smoothing, 4-grams)
_BLEU = BLEU()


@lru_cache(maxsize=256)
def _ngrams(text: str) -> tuple[dict, int]:
    """The word n-grams (orders 1-4, with counts) and the token count of a text, as ``_BLEU`` sees it.
    A sample's 50 rows are each scored against its dense text and its reference, and sacreBLEU
    tokenised and counted both sides of every pair anew (80% of building records). Only the
    recent texts are kept: kept n-gram counters made Python's garbage collector scan a large
    heap ever more often, which cost more than counting again."""
    assert not _BLEU.lowercase
    return extract_all_word_ngrams(_BLEU.tokenizer(text.rstrip()), 1, _BLEU.max_ngram_order)


@lru_cache(maxsize=1 << 16)
def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacreBLEU on a single pair, exactly ``corpus_bleu([hyp], [[ref]]).score``: the clipped n-gram
    matches of the pair, scored by sacreBLEU's own ``compute_bleu`` (tested against sacreBLEU)."""
    order = _BLEU.max_ngram_order
    hypothesis_ngrams, hypothesis_length = _ngrams(hypothesis)
    reference_ngrams, reference_length = _ngrams(reference)
    correct, total = [0] * order, [0] * order
    for ngram, count in hypothesis_ngrams.items():
        total[len(ngram) - 1] += count
        if ngram in reference_ngrams:
            correct[len(ngram) - 1] += min(count, reference_ngrams[ngram])
    return BLEU.compute_bleu(correct, total, hypothesis_length, reference_length, smooth_method=_BLEU.smooth_method,
                             smooth_value=_BLEU.smooth_value, effective_order=_BLEU.effective_order,
                             max_ngram_order=order).score


def bleu_vs_dense(masked_tokens: list[int], dense_tokens: list[int], masked_text: str, dense_text: str) -> float:
    """The paper's accuracy: BLEU of the masked text against the dense text.

    Identical token sequences score 100 even where sacreBLEU would not (empty or very
    short outputs), so the dense run scores exactly 100 against itself.
    """
    if masked_tokens == dense_tokens:
        return 100.0
    return sentence_bleu(masked_text, dense_text)


def token_agreement(masked_tokens: list[int], dense_tokens: list[int]) -> float:
    """Fraction of positions where the masked run produced the dense token.

    Positions are compared by step index; the longer of the two sequences is the
    denominator, so stopping early or running on both count as disagreement.
    """
    longest = max(len(masked_tokens), len(dense_tokens))
    if longest == 0:
        return 1.0
    same = sum(a == b for a, b in zip(masked_tokens, dense_tokens))
    return same / longest
