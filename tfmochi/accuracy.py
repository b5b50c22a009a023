"""Top-k accuracy of class scores, with one tie rule for every classifier (kNN, linear probe).

Ties rank the lower class index first (a stable sort of the negated scores), so two classifiers
that produce the same scores report the same accuracy, and a tie never depends on the sort
algorithm NumPy picks for the array's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[int, float]:
  """Top-k accuracy in % of class scores against integer labels.

  Args:
    scores: [N, C] class scores (higher = more likely).
    labels: [N] int labels in [0, C).
    ks: the k values; each is clipped to C.

  Returns:
    {k: accuracy in %} for every k in `ks`.
  """
  scores = np.asarray(scores)
  order = np.argsort(-scores, axis=1, kind="stable")  # ties: the lower class index first
  hits = order == np.asarray(labels)[:, None]
  return {k: float(100.0 * hits[:, :min(k, scores.shape[1])].any(1).mean()) for k in ks}
