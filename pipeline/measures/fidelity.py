"""How closely a masked output follows the dense one."""

from __future__ import annotations

from functools import lru_cache

from sacrebleu.metrics import BLEU

# ``sacrebleu.corpus_bleu`` builds this same default BLEU object on every call; one object,
# and one score per distinct pair (the rows of a sample repeat texts), give the same numbers.
_BLEU = BLEU()


@lru_cache(maxsize=1 << 16)
def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacreBLEU on a single pair, exactly ``corpus_bleu([hyp], [[ref]]).score`` (13a tokenisation)."""
    return _BLEU.corpus_score([hypothesis], [[reference]]).score


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
