"""Weighted kNN accuracy of a backbone's pooled features: MoCo's monitor, and its baselines.

The monitor of the MoCo CIFAR demo (and InstDisc): L2-normalised pooled features, the train split
is the memory bank, the held-out split the queries; each query is voted for by its k nearest
neighbours (cosine similarity), each vote weighted by exp(cos / t), t = 0.1; top-1/top-5 are read
off the class scores (`knn_accuracy`). The bank is processed in chunks, so a large training set
never needs a [N_test, N_train] matrix at once.

k is chosen from the bank (`auto_k`): 10% of the smallest class's count, at most 200 (the value of
the MoCo CIFAR demo and InstDisc, made for 5,000 and ~1,300 images per class). A k above a class's
count forces every query of that class to take votes from other classes, so the accuracy then
measures the protocol rather than the features: on small data sets it stops telling a better
network from a worse one. The k used is recorded.

For eval views of at most 32 x 32 pixels the same kNN on the flattened, L2-normalised eval views
(raw pixels) is reported next to it: `raw_pixels_top1`. The eval view resizes, crops and
normalises the image as the network sees it, which is not the pixels' best showing: when the
data set's images have one stored size of at most 32 x 32 that differs from the eval view's,
the same kNN on the stored pixels themselves (uint8 values, flattened, L2-normalised) is reported
too, `raw_pixels_stored_top1` at `raw_pixels_stored_size` (e.g. mnist5k's 28 x 28 digits: 93.40%
at k = 40, against 91.10% for its 16 px eval views). The trainer's monitor bounds its cost on
large splits with `tfmochi.data.class_balanced_subset`.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from tfmochi import accuracy
from tfmochi import data as data_lib
from tfmochi.evaluate import features as features_lib
from tfmochi.evaluate.features import EvalError

# Raw-pixel kNN baseline: reported for eval views of at most 32 x 32 pixels (3,072 values), where
# pixels are a meaningful (and cheap) baseline, as for the 8x8 digits and CIFAR; at 224 px it is
# near chance and 150,528 values per image.
RAW_PIXELS_MAX_SIZE = 32
# auto_k: k = AUTO_K_FRACTION x the smallest class's count in the bank, in [1, AUTO_K_MAX].
AUTO_K_FRACTION = 0.1
AUTO_K_MAX = 200


def auto_k(bank_labels: np.ndarray, k: int = 0) -> int:
  """The k of the vote: `k` when given (> 0), else chosen from the bank's class counts.

  Auto: 10% of the smallest class's count in the bank, at most 200 and at least 1; so k never
  exceeds the smallest class (the module docstring says why).

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


def raw_pixels_meaningful(image_size: int) -> bool:
  """True when the raw-pixel kNN baseline is computed for eval views of side `image_size`."""
  return image_size <= RAW_PIXELS_MAX_SIZE


def eval_view_pixels(source: data_lib.DataSource, *, image_size: int,
                     batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """The eval views (as `knn_eval` feeds the network) flattened: [N, S*S*3] float32, labels [N]."""
  pixels, labels = [], []
  for batch in data_lib.eval_dataset(source, batch_size=batch_size, image_size=image_size):
    images = tf.cast(batch["image"], tf.float32)
    pixels.append(tf.reshape(images, [tf.shape(images)[0], -1]).numpy())
    labels.append(batch["label"].numpy())
  if not pixels:
    raise EvalError("The evaluation got an empty data set.")
  return np.concatenate(pixels), np.concatenate(labels).astype(np.int64)


def knn_eval(model, train_source: data_lib.DataSource, test_source: data_lib.DataSource, *,
             image_size: int, k: int = 0, t: float = 0.1, batch_size: int = 256,
             strategy: tf.distribute.Strategy | None = None, train_per_class: int = 0,
             test_per_class: int = 0, seed: int = 0, raw_pixels: bool | None = None) -> dict:
  """Weighted kNN accuracy of a backbone's L2-normalised pooled features (MoCo's monitor).

  Args:
    model: a `models.Encoder` (its `.backbone` is used) or a backbone whose outputs have
      "pooled" [b, F].
    train_source: the memory bank (labelled).
    test_source: the queries (labelled).
    image_size: centre-view side S (the run's training image size).
    k: neighbours; 0 = `auto_k` (10% of the bank's smallest class, at most 200).
    t: temperature of the exp(cos / t) vote weights.
    batch_size: images per forward pass (global, over all replicas).
    strategy: spread the forward passes over a single-host strategy's replicas (see
      `check_strategy`); None: one device.
    train_per_class, test_per_class: use a class-balanced subset of that many images per class
      of each split (`class_balanced_subset`, chosen by `seed`); 0 = the whole split.
    seed: the subsets' seed.
    raw_pixels: also run the same kNN (same images, k, t) on the flattened, L2-normalised eval
      views; None = when `raw_pixels_meaningful(image_size)`.

  Returns:
    {"top1", "top5" (in %), "k", "k_auto", "smallest_class" (in the bank), "t", "num_train",
    "num_test", "num_classes", "train_per_class", "test_per_class", "seconds"} and, with raw
    pixels, "raw_pixels_top1", "raw_pixels_top5".

  Raises:
    EvalError: a split has no labels, or k/t are out of range.
  """
  if k < 0 or t <= 0:
    raise EvalError(f"kNN needs k >= 1 (or 0 = auto) and t > 0, got k={k}, t={t}.")
  features_lib.require_labels(train_source, "kNN evaluation")
  features_lib.require_labels(test_source, "kNN evaluation")
  start = time.time()
  strategy = features_lib.check_strategy(strategy, batch_size)
  train_source = data_lib.class_balanced_subset(train_source, train_per_class, seed)
  test_source = data_lib.class_balanced_subset(test_source, test_per_class, seed)
  extract = dict(image_size=image_size, batch_size=batch_size, strategy=strategy)
  bank, bank_labels = _normalised_features(model, train_source, **extract)
  queries, labels = _normalised_features(model, test_source, **extract)
  num_classes = features_lib.num_classes_of(train_source, test_source) or int(
      max(bank_labels.max(), labels.max())) + 1
  result = knn_accuracy(bank, bank_labels, queries, labels, num_classes, k=k, t=t)
  counts = np.bincount(bank_labels[bank_labels >= 0])
  result.update({"k_auto": k == 0, "smallest_class": int(counts[counts > 0].min()),
                 "t": float(t), "num_train": int(len(bank)), "num_test": int(len(queries)),
                 "num_classes": num_classes, "train_per_class": int(train_per_class),
                 "test_per_class": int(test_per_class)})
  if raw_pixels if raw_pixels is not None else raw_pixels_meaningful(image_size):
    result.update(_pixel_baselines(train_source, test_source, bank_labels, labels, num_classes,
                                   k=result["k"], t=t, image_size=image_size,
                                   batch_size=batch_size))
  return {**result, "seconds": float(time.time() - start)}


def _pixel_baselines(train_source, test_source, bank_labels, labels, num_classes, *, k, t,
                     image_size, batch_size) -> dict:
  """raw_pixels_top1/top5 (eval views) and, where they differ, raw_pixels_stored_top1/top5/size
  (the stored images)."""
  pixels = _raw_pixels_accuracy(train_source, test_source, bank_labels, labels, num_classes,
                                k=k, t=t, image_size=image_size, batch_size=batch_size)
  out = {"raw_pixels_top1": pixels["top1"], "raw_pixels_top5": pixels["top5"]}
  stored = _stored_pixels_accuracy(train_source, test_source, num_classes, k=k, t=t,
                                   image_size=image_size)
  if stored is not None:
    out.update(raw_pixels_stored_top1=stored["top1"], raw_pixels_stored_top5=stored["top5"],
               raw_pixels_stored_size=stored["size"])
  return out


def _normalised_features(model, source: data_lib.DataSource, *, image_size: int,
                         batch_size: int, strategy: tf.distribute.Strategy | None
                         ) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised pooled features [N, F] of `source`'s eval views, and its labels [N]."""
  feats, labels = features_lib.extract_pooled(
      model, data_lib.eval_dataset(source, batch_size=batch_size, image_size=image_size),
      batch_size=batch_size, strategy=strategy)
  return tf.math.l2_normalize(feats, axis=-1).numpy(), labels


def _stored_side(source: data_lib.DataSource) -> int | None:
  """The stored images' side H when every image has one static H x W of at most
  RAW_PIXELS_MAX_SIZE; None otherwise (decoded JPEG files have no static size)."""
  shape = source.raw().map(source.decode).element_spec["image"].shape
  if not shape.is_fully_defined() or max(shape[:2]) > RAW_PIXELS_MAX_SIZE:
    return None
  return int(shape[0])


def stored_pixels(source: data_lib.DataSource, batch_size: int = 256
                  ) -> tuple[np.ndarray, np.ndarray, int] | None:
  """The images as the data set stores them, flattened: [N, H*W*C] float32 (uint8 values),
  labels [N] and the side H; None unless `_stored_side` finds one."""
  side = _stored_side(source)
  if side is None:
    return None
  pixels, labels = [], []
  for batch in source.raw().map(source.decode).batch(batch_size):
    images = tf.cast(batch["image"], tf.float32)
    pixels.append(tf.reshape(images, [tf.shape(images)[0], -1]))
    labels.append(batch["label"].numpy())
  if not pixels:
    return None
  return tf.concat(pixels, axis=0).numpy(), np.concatenate(labels).astype(np.int64), side


def _stored_pixels_accuracy(train_source: data_lib.DataSource,
                            test_source: data_lib.DataSource, num_classes: int, *, k: int,
                            t: float, image_size: int) -> dict | None:
  """The kNN of `knn_eval` on the stored pixels (`stored_pixels`) when their size differs from
  the eval view's; None otherwise. {"top1", "top5", "k", "size"}."""
  if _stored_side(train_source) in (None, image_size):  # same pixels as the views: no second
    return None
  train, test = stored_pixels(train_source), stored_pixels(test_source)
  if train is None or test is None:
    return None
  result = knn_accuracy(
      tf.math.l2_normalize(train[0], axis=-1).numpy(), train[1],
      tf.math.l2_normalize(test[0], axis=-1).numpy(), test[1], num_classes, k=k, t=t)
  return {**result, "size": train[2]}


def _raw_pixels_accuracy(train_source: data_lib.DataSource, test_source: data_lib.DataSource,
                         bank_labels: np.ndarray, labels: np.ndarray, num_classes: int, *,
                         k: int, t: float, image_size: int, batch_size: int) -> dict:
  """The kNN of `knn_eval` on the flattened, L2-normalised eval views instead of features.

  The same images in the same order (the eval pipelines are deterministic), hence the feature
  run's labels, and the same k and t.
  """
  pixel_bank, _ = eval_view_pixels(train_source, image_size=image_size, batch_size=batch_size)
  pixel_queries, _ = eval_view_pixels(test_source, image_size=image_size, batch_size=batch_size)
  return knn_accuracy(
      tf.math.l2_normalize(pixel_bank, axis=-1).numpy(), bank_labels,
      tf.math.l2_normalize(pixel_queries, axis=-1).numpy(), labels, num_classes, k=k, t=t)
