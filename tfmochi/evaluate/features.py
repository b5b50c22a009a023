"""A frozen backbone's pooled features for evaluation, on one device or over a strategy's replicas.

Both evaluations (kNN, linear probe) use the backbone's pooled features (the projection head is
discarded, as in MoCo) with the network in inference mode. A single-host strategy (MirroredStrategy
over local GPUs or logical CPUs, TPUStrategy) spreads the forward passes: each batch is padded to
the global batch size, split evenly, and gathered back in order, with a mask so that the padding
counts nowhere; results match one device up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

from absl import logging
import numpy as np
import tensorflow as tf

from tfmochi import data as data_lib

Progress = Callable[[str], None]


class EvalError(ValueError):
  """An evaluation cannot run as asked (bad setting, data set without labels). Clear message."""


def say(progress: Progress | None, message: str) -> None:
  """Sends a progress line to `progress`, or to absl logging when there is none."""
  if progress is not None:
    progress(message)
  else:
    logging.info("%s", message)


def backbone_of(model):
  """The backbone of an `models.Encoder`, or `model` itself when it is already a backbone."""
  return getattr(model, "backbone", model)


def pooled_feature_fn(model) -> Callable[[tf.Tensor], tf.Tensor]:
  """A tf.function: images [b, H, W, 3] -> pooled backbone features [b, F] float32 (inference).

  One trace serves every batch size and image size (the signature leaves them open), so the last,
  smaller batch of an epoch does not retrace.
  """
  backbone = backbone_of(model)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  def features(images):
    return tf.cast(backbone(images, training=False)["pooled"], tf.float32)

  return features


def check_strategy(strategy: tf.distribute.Strategy | None,
                   batch_size: int) -> tf.distribute.Strategy | None:
  """The strategy to spread an evaluation over, or None for one device.

  Single-host strategies only (MirroredStrategy over local GPUs or logical CPUs, TPUStrategy):
  every batch is padded to `batch_size` rows and split evenly over the replicas, and the
  features are gathered back in order. Multi-worker strategies are refused: each worker would
  read its own shard and the workers' batch counts need not agree.

  Raises:
    EvalError: a multi-worker strategy, or a batch that does not split over the replicas.
  """
  if strategy is None or strategy.num_replicas_in_sync == 1 and not _is_tpu(strategy):
    return None
  if isinstance(strategy, (tf.distribute.MultiWorkerMirroredStrategy,
                           tf.distribute.experimental.MultiWorkerMirroredStrategy)):
    raise EvalError("Evaluation runs on one host: use --strategy=mirrored (local GPUs) or "
                    "--strategy=tpu, or default, on one machine; a checkpoint of a multi-worker "
                    "run evaluates like any other.")
  replicas = strategy.num_replicas_in_sync
  if batch_size % replicas:
    raise EvalError(f"--batch_size {batch_size} must be divisible by the {replicas} replicas.")
  return strategy


def _is_tpu(strategy: tf.distribute.Strategy) -> bool:
  return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def padded_batches(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Pads every batch to exactly `batch_size` rows and adds "valid" [batch_size] bool.

  Static shapes (TPU) and batches that split evenly over replicas; padded rows are zeros with
  valid False, and never reach a result.
  """

  def pad(batch):
    n = tf.shape(batch["label"])[0]
    missing = batch_size - n
    out = {"image": tf.pad(batch["image"], [[0, missing], [0, 0], [0, 0], [0, 0]]),
           "label": tf.pad(batch["label"], [[0, missing]]),
           "valid": tf.pad(tf.ones([n], tf.bool), [[0, missing]])}
    out["image"].set_shape([batch_size, None, None, 3])
    out["label"].set_shape([batch_size])
    out["valid"].set_shape([batch_size])
    return out

  return dataset.map(pad)


def extract_pooled(model, dataset: tf.data.Dataset, *, batch_size: int,
                   strategy: tf.distribute.Strategy | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Raw pooled features [N, F] float32 and labels [N] int64 of a dataset of batches.

  Args:
    model: an Encoder or backbone (inference mode; built under `strategy.scope()` on TPU).
    dataset: batches of {"image" [b, S, S, 3], "label" [b]} (b <= batch_size).
    batch_size: the dataset's batch size (the padded size when distributed).
    strategy: from `check_strategy` (None: one device).
  """
  backbone = backbone_of(model)
  feats, labels = [], []
  if strategy is None:
    features_fn = pooled_feature_fn(backbone)
    for batch in dataset:
      feats.append(features_fn(batch["image"]).numpy())
      labels.append(batch["label"].numpy())
  else:
    step = _gathering_step_of(backbone, strategy)
    for batch in strategy.experimental_distribute_dataset(padded_batches(dataset, batch_size)):
      f, y, valid = (t.numpy() for t in step(batch))
      feats.append(f[valid == 1])
      labels.append(y[valid == 1])
  if not feats:
    raise EvalError("The evaluation got an empty data set.")
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


# The last traced steps, by (backbone, strategy) identity (neither type defines __eq__): an
# evaluation extracts its train and test features with the same network, and the kNN monitor
# reuses it every pass; tracing a replicated forward pass is the slow part on many replicas
# (it costs more than the extraction itself; docs/BENCHMARKS.md). The cache
# holds its two entries strongly, so a step is never reused for a new object with an old id.
@functools.lru_cache(maxsize=2)
def _gathering_step_of(backbone, strategy: tf.distribute.Strategy):
  """`_gathering_step(backbone, strategy)`, built once for the two most recent pairs."""
  return _gathering_step(backbone, strategy)


def _gathering_step(backbone, strategy: tf.distribute.Strategy):
  """A tf.function: a distributed padded batch -> (features [B, F], labels [B], valid [B] int32)."""

  @tf.function
  def step(batch):
    def replica(b):
      # (collectives gather no bools: the mask travels as int32)
      return (tf.cast(backbone(b["image"], training=False)["pooled"], tf.float32),
              b["label"], tf.cast(b["valid"], tf.int32))

    per_replica = strategy.run(replica, args=(batch,))
    # gather concatenates the replicas' slices in replica order: the batch's own order.
    return tuple(strategy.gather(x, axis=0) for x in per_replica)

  return step


def require_labels(source: data_lib.DataSource, what: str) -> None:
  """Raises EvalError unless `source` is labelled (kNN and linear evaluation need labels)."""
  if not source.has_labels:
    raise EvalError(f"{what} needs labels, but {source.name}/{source.split} has none (every label "
                    "is -1). Evaluate on a labelled data set (--dataset=... --data_dir=...).")


def num_classes_of(*sources: data_lib.DataSource) -> int | None:
  """The first known class count C of `sources`, or None when none of them knows it."""
  for source in sources:
    if source.num_classes:
      return int(source.num_classes)
  return None
