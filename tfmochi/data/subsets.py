"""Seeded subsets of a split: the held-out split tfmochi makes, the class-balanced kNN subset.

Both depend only on (labels or ids, seed), so every process, host and resumed run picks the same.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmochi import idhash
from tfmochi.data.source import DataSource

# Share of a streamed split (tfds, TFRecords) that `class_balanced_subset` considers, relative to
# the share the subset needs (per_class x classes / split): the seeded draw that makes the subset
# depend on the seed. The stream is read until every class is full, so this factor bounds the
# (undecoded) records read at about 2x the subset; a split at most twice the subset is considered
# whole.
_STREAM_KEEP = 0.5


def stratified_holdout(labels: np.ndarray, num_test: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Seeded stratified split of indices 0..N-1 with exactly `num_test` held out.

  Each class holds out its proportional share (largest remainders get the rounding), so the
  split depends only on (labels, num_test, seed).

  Returns:
    (train_indices, test_indices), both sorted int64.
  """
  n = len(labels)
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_test / max(n, 1)
  quota = np.floor(exact).astype(np.int64)
  extra = num_test - int(quota.sum())
  order = np.argsort(-(exact - quota), kind="stable")  # largest remainders first
  quota[order[:extra]] += 1
  rng = np.random.default_rng(seed)
  test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q]
                         for c, q in zip(classes, quota)] + [np.zeros([0], np.int64)])
  test = np.sort(test).astype(np.int64)
  train = np.setdiff1d(np.arange(n, dtype=np.int64), test)
  return train, test


def balanced_indices(labels: np.ndarray, ids: np.ndarray, per_class: int,
                     seed: int) -> np.ndarray:
  """A class-balanced subset: per class, the `per_class` samples of smallest `idhash.id_hash`.

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
  rank = idhash.id_hash(ids, seed, "knn").numpy() if len(labels) else np.zeros([0], np.int64)
  chosen = []
  for c in np.unique(labels[labels >= 0]):
    members = np.flatnonzero(labels == c)
    order = np.lexsort((ids[members], rank[members]))  # ties (never in practice) by id
    chosen.append(members[order[:per_class]])
  if not chosen:
    return np.zeros([0], np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def class_balanced_subset(source: DataSource, per_class: int, seed: int) -> DataSource:
  """At most `per_class` images of each class of `source`, chosen by `seed` (0: `source` itself).

  In-memory sources (quickstart, `data.from_numpy`): `balanced_indices`, exactly. Streamed
  sources (tfds, e.g. ImageNet): the split is read in its stored order (tfds shuffles examples
  when it writes them), an image is considered when its seeded hash falls in the lowest share
  p = min(1, per_class x classes / (`_STREAM_KEEP` x split)) and kept while its class has fewer
  than `per_class`; reading stops as soon as every class is full, so a pass decodes only the
  chosen images and reads (undecoded) about 2 x per_class / (images per class) of the split. A
  split at most twice the subset is considered whole (p = 1: every class keeps min(per_class, its
  images)); in a larger one a class with fewer than ~2 x per_class images may keep fewer than
  per_class. Both depend only on (seed, ids, stored order): the same subset at every pass, on
  every host, after a resume.

  Returns:
    A DataSource over the subset (`num_examples` is per_class x classes, capped at the split,
    for streamed sources: an upper bound when a class has fewer images).
  """
  if per_class <= 0:
    return source
  records = source.records()
  if records is not None:
    _, labels, ids = records
    return source.subset(balanced_indices(labels, ids, per_class, seed))
  num_classes = int(source.num_classes or 0)
  if not num_classes:
    return source  # unlabelled: the kNN refuses it with its own message
  share = min(1.0, per_class * num_classes / (_STREAM_KEEP * max(int(source.num_examples), 1)))
  threshold = int(share * (1 << 62))

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def considered(ex):
    return idhash.id_hash(ex["id"], seed, "knn") < threshold

  @tf.autograph.experimental.do_not_convert
  def cap(counts, ex):
    label = tf.cast(ex["label"], tf.int64)
    safe = tf.clip_by_value(label, 0, num_classes - 1)
    keep = tf.logical_and(tf.logical_and(label >= 0, label < num_classes),
                          tf.gather(counts, safe) < per_class)
    counts = tf.tensor_scatter_nd_add(counts, [[safe]], [tf.cast(keep, tf.int64)])
    return counts, (ex, keep)

  def open_stream(num_shards: int, index: int) -> tf.data.Dataset:
    ds = source.raw(1, 0)
    ds = ds.filter(considered).scan(tf.zeros([num_classes], tf.int64), cap)
    ds = ds.filter(tf.autograph.experimental.do_not_convert(lambda _, keep: keep))
    ds = ds.map(tf.autograph.experimental.do_not_convert(lambda example, _: example))
    ds = ds.take(per_class * num_classes)  # stops reading once every class is full
    return ds.shard(num_shards, index) if num_shards > 1 else ds

  return source.with_stream(open_stream,
                            min(int(source.num_examples), per_class * num_classes))
