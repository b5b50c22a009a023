"""Weighted k-nearest-neighbour classification on L2-normalised features (the MoCo kNN monitor).

As in the MoCo CIFAR demo (and InstDisc): each test feature votes with its k nearest training
features (cosine similarity), each vote weighted by exp(sim / t), t = 0.1. Top-1/top-5 are read
off the class scores. The memory bank is processed in chunks so that a large training set never
needs a [N_test, N_train] matrix at once.

k is chosen from the bank (`auto_k`): 10% of the smallest class's count, at most 200 (the MoCo
CIFAR demo's and InstDisc's value, made for 5,000 and ~1,300 images per class). A k above a
class's count forces every query of that class to take votes from other classes, so the figure
then measures the protocol rather than the features (on the quickstart's ~150 digits per class,
k = 200 gives 90.3% both after 9 and after 18 epochs, while k = 20 separates them).

`balanced_indices` picks the class-balanced, seeded subset that bounds the trainer's monitor.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmochi import accuracy


# auto_k: k = AUTO_K_FRACTION x the smallest class's count in the bank, in [1, AUTO_K_MAX].
AUTO_K_FRACTION = 0.1
AUTO_K_MAX = 200


def auto_k(bank_labels: np.ndarray, k: int = 0) -> int:
  """The k of the vote: `k` when given (> 0), else chosen from the bank's class counts.

  Auto: 10% of the smallest class's count in the bank, at most 200 and at least 1; so k never
  exceeds the smallest class (see the module docstring for why).

  Args:
    bank_labels: [N] int labels of the memory bank (negative labels are ignored).
    k: an explicit k (wins), or 0 for the automatic choice.

  Returns:
    k >= 1.
  """
  if k < 0:
    raise ValueError(f"knn k must be >= 1 (or 0 = auto), got {k}.")
  if k > 0:
    return int(k)
  labels = np.asarray(bank_labels)
  counts = np.bincount(labels[labels >= 0])
  counts = counts[counts > 0]
  smallest = int(counts.min()) if counts.size else 1
  return int(max(1, min(AUTO_K_MAX, int(smallest * AUTO_K_FRACTION))))


def id_hash(ids, seed: int) -> tf.Tensor:
  """A seeded, stateless pseudo-random int64 in [0, 2**62) per sample id (tensor or array).

  A function of (seed, id) only: the same on every host, at every epoch and after a resume.
  """
  keys = tf.strings.join([tf.strings.as_string(tf.cast(seed, tf.int64)), ":knn:",
                          tf.strings.as_string(tf.cast(ids, tf.int64))])
  return tf.strings.to_hash_bucket_fast(keys, 1 << 62)


def balanced_indices(labels: np.ndarray, ids: np.ndarray, per_class: int,
                     seed: int) -> np.ndarray:
  """A class-balanced subset: per class, the `per_class` samples of smallest `id_hash`.

  Args:
    labels: [N] int labels (negative = unlabelled, never chosen).
    ids: [N] int unique sample ids.
    per_class: samples per class (a class with fewer keeps all of them); 0 = everything.
    seed: the run seed.

  Returns:
    Sorted int64 indices into the N samples.
  """
  labels, ids = np.asarray(labels, np.int64), np.asarray(ids, np.int64)
  if per_class <= 0:
    return np.arange(len(labels), dtype=np.int64)
  rank = id_hash(ids, seed).numpy() if len(labels) else np.zeros([0], np.int64)
  chosen = []
  for c in np.unique(labels[labels >= 0]):
    members = np.flatnonzero(labels == c)
    order = np.lexsort((ids[members], rank[members]))  # ties (never in practice) by id
    chosen.append(members[order[:per_class]])
  if not chosen:
    return np.zeros([0], np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def knn_predict_scores(train_features: np.ndarray, train_labels: np.ndarray,
                       test_features: np.ndarray, num_classes: int, k: int = 0,
                       t: float = 0.1, chunk: int = 1024) -> np.ndarray:
  """Class scores of the weighted kNN vote.

  Args:
    train_features: [N, F] L2-normalised memory bank.
    train_labels: [N] int labels in [0, C).
    test_features: [M, F] L2-normalised queries.
    num_classes: C.
    k: neighbours (clipped to N); 0 = `auto_k` of the bank.
    t: temperature of the exp(sim / t) weights.
    chunk: test rows per matmul.

  Returns:
    [M, C] float32 scores.
  """
  if t <= 0:
    raise ValueError(f"knn temperature t must be > 0, got {t}.")
  k = min(auto_k(train_labels, k), len(train_features))
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
                 k: int = 0, t: float = 0.1) -> dict[str, float]:
  """Top-1 and top-5 accuracy (in %) of the weighted kNN classifier.

  Returns:
    {"top1": float, "top5": float, "k": the k used (`auto_k`, clipped to the bank)}.
  """
  k = min(auto_k(train_labels, k), len(train_features))
  scores = knn_predict_scores(train_features, train_labels, test_features, num_classes, k, t)
  top = accuracy.topk_accuracy(scores, test_labels, (1, 5))  # ties: the lower class first
  return {"top1": top[1], "top5": top[5], "k": int(k)}
