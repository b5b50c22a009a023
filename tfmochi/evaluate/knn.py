"""Weighted kNN accuracy of a backbone's pooled features: MoCo's monitor, and its baselines.

The monitor of the MoCo CIFAR demo (and InstDisc): L2-normalised pooled features, the train split
is the memory bank, the held-out split the queries; each query is voted for by its k nearest
neighbours weighted by exp(cos / t), t = 0.1, k chosen from the bank: 10% of its smallest class's
count, at most 200 (MoCo's value for 5,000 images per class; `knn.auto_k`). The k used is
recorded. For eval views of at most 32 x 32 pixels the same kNN on the flattened, L2-normalised
eval views (raw pixels) is reported next to it: `raw_pixels_top1`. `class_balanced_subset` bounds
the cost of the trainer's monitor on large splits (`tfmochi.data.class_balanced_subset`).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from tfmochi import data as data_lib
from tfmochi import knn as knn_lib
from tfmochi.evaluate import features as features_lib
from tfmochi.evaluate.features import EvalError

# Raw-pixel kNN baseline: reported for eval views of at most 32 x 32 pixels (3,072 values), where
# pixels are a meaningful (and cheap) baseline, as for the 8x8 digits and CIFAR; at 224 px it is
# near chance and 150,528 values per image.
RAW_PIXELS_MAX_SIZE = 32
# Defined in tfmochi.data (it selects examples of a DataSource); importable from here too.
class_balanced_subset = data_lib.class_balanced_subset


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
    k: neighbours; 0 = `knn.auto_k` (10% of the bank's smallest class, at most 200).
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
  train_source = class_balanced_subset(train_source, train_per_class, seed)
  test_source = class_balanced_subset(test_source, test_per_class, seed)
  extract = dict(image_size=image_size, batch_size=batch_size, strategy=strategy)
  bank, bank_labels = _normalised_features(model, train_source, **extract)
  queries, labels = _normalised_features(model, test_source, **extract)
  num_classes = features_lib.num_classes_of(train_source, test_source) or int(
      max(bank_labels.max(), labels.max())) + 1
  result = knn_lib.knn_accuracy(bank, bank_labels, queries, labels, num_classes, k=k, t=t)
  counts = np.bincount(bank_labels[bank_labels >= 0])
  result.update({"k_auto": k == 0, "smallest_class": int(counts[counts > 0].min()),
                 "t": float(t), "num_train": int(len(bank)), "num_test": int(len(queries)),
                 "num_classes": num_classes, "train_per_class": int(train_per_class),
                 "test_per_class": int(test_per_class)})
  if raw_pixels if raw_pixels is not None else raw_pixels_meaningful(image_size):
    pixels = _raw_pixels_accuracy(train_source, test_source, bank_labels, labels, num_classes,
                                  k=result["k"], t=t, image_size=image_size,
                                  batch_size=batch_size)
    result.update(raw_pixels_top1=pixels["top1"], raw_pixels_top5=pixels["top5"])
  return {**result, "seconds": float(time.time() - start)}


def _normalised_features(model, source: data_lib.DataSource, *, image_size: int,
                         batch_size: int, strategy: tf.distribute.Strategy | None
                         ) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised pooled features [N, F] of `source`'s eval views, and its labels [N]."""
  feats, labels = features_lib.extract_pooled(
      model, data_lib.eval_dataset(source, batch_size=batch_size, image_size=image_size),
      batch_size=batch_size, strategy=strategy)
  return tf.math.l2_normalize(feats, axis=-1).numpy(), labels


def _raw_pixels_accuracy(train_source: data_lib.DataSource, test_source: data_lib.DataSource,
                         bank_labels: np.ndarray, labels: np.ndarray, num_classes: int, *,
                         k: int, t: float, image_size: int, batch_size: int) -> dict:
  """The kNN of `knn_eval` on the flattened, L2-normalised eval views instead of features.

  The same images in the same order (the eval pipelines are deterministic), hence the feature
  run's labels, and the same k and t.
  """
  pixel_bank, _ = eval_view_pixels(train_source, image_size=image_size, batch_size=batch_size)
  pixel_queries, _ = eval_view_pixels(test_source, image_size=image_size, batch_size=batch_size)
  return knn_lib.knn_accuracy(
      tf.math.l2_normalize(pixel_bank, axis=-1).numpy(), bank_labels,
      tf.math.l2_normalize(pixel_queries, axis=-1).numpy(), labels, num_classes, k=k, t=t)
