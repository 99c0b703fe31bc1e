"""Accuracy measures (docs/protocol.md §7): fidelity to the dense output and task accuracy.

``mask_stats`` (what the masks did: sparsity, kept fractions, overlap with the oracle) is
imported from its module, not from here: it needs torch, and the command line's
configuration imports this package without it.
"""

from pipeline.measures.fidelity import bleu_vs_dense, token_agreement
from pipeline.measures.task import TASK_MEASURES, task_score

__all__ = ["bleu_vs_dense", "token_agreement", "task_score", "TASK_MEASURES"]
