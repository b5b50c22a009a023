"""Weighted k-nearest-neighbour classification on L2-normalised features (the MoCo kNN monitor).

As in the MoCo CIFAR demo (and InstDisc): each test feature votes with its k nearest training
features (cosine similarity), each vote weighted by exp(sim / t), k = 200, t = 0.1. Top-1/top-5
are read off the class scores. The memory bank is processed in chunks so that a large training set
never needs a [N_test, N_train] matrix at once.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def knn_predict_scores(train_features: np.ndarray, train_labels: np.ndarray,
                       test_features: np.ndarray, num_classes: int, k: int = 200,
                       t: float = 0.1, chunk: int = 1024) -> np.ndarray:
  """Class scores of the weighted kNN vote.

  Args:
    train_features: [N, F] L2-normalised memory bank.
    train_labels: [N] int labels in [0, C).
    test_features: [M, F] L2-normalised queries.
    num_classes: C.
    k: neighbours (clipped to N).
    t: temperature of the exp(sim / t) weights.
    chunk: test rows per matmul.

  Returns:
    [M, C] float32 scores.
  """
  if t <= 0:
    raise ValueError(f"knn temperature t must be > 0, got {t}.")
  if k < 1:
    raise ValueError(f"knn k must be >= 1, got {k}.")
  k = min(k, len(train_features))
  bank = tf.constant(train_features, tf.float32)
  bank_labels = tf.constant(train_labels, tf.int64)
  scores = []
  for start in range(0, len(test_features), chunk):
    sim = tf.matmul(tf.constant(test_features[start:start + chunk], tf.float32), bank,
                    transpose_b=True)  # [m, N]
    top_sim, top_idx = tf.math.top_k(sim, k=k)  # [m, k]
    weights = tf.exp(top_sim / t)
    one_hot = tf.one_hot(tf.gather(bank_labels, top_idx), num_classes)  # [m, k, C]
    scores.append(tf.reduce_sum(one_hot * weights[..., None], axis=1).numpy())
  return np.concatenate(scores)


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, num_classes: int,
                 k: int = 200, t: float = 0.1) -> dict[str, float]:
  """Top-1 and top-5 accuracy (in %) of the weighted kNN classifier.

  Returns:
    {"top1": float, "top5": float}.
  """
  scores = knn_predict_scores(train_features, train_labels, test_features, num_classes, k, t)
  order = np.argsort(-scores, axis=1)
  hits = order == np.asarray(test_labels)[:, None]
  return {"top1": float(100.0 * hits[:, :1].any(1).mean()),
          "top5": float(100.0 * hits[:, :min(5, num_classes)].any(1).mean())}
