"""Evaluates a run's backbone: weighted kNN and MoCo's linear probe, once or as a side-car.

`python -m tfmochi.evaluate --model_dir=RUN --mode=knn|linear [--sidecar]` restores the query
encoder of a training run (config.json + checkpoints/) and writes

  <model_dir>/eval_<mode>.json   top1, top5 (in %), checkpoint_step, the settings, and a
                                 `history` of every checkpoint evaluated so far (atomic write)
  <model_dir>/eval/              TensorBoard scalars knn_top1/knn_top5 or linear_top1/linear_top5
                                 (+ linear_best_top1) at the checkpoint's step

`--random_init` evaluates the run's network as the trainer initialised it (same architecture and
weight seed, no checkpoint needed) into `eval_<mode>_random_init.json`: the baseline pretraining
must beat. Later evaluations of the run report it as `random_init_top1` (for kNN the trainer's own
`knn_random_init.json` serves too).

Both evaluations use the backbone's pooled features (the projection head is discarded, as in
MoCo) with the network in inference mode:

* kNN (ALGORITHMS.md §1.5): the MoCo CIFAR demo's monitor. L2-normalised features, the train
  split is the memory bank, the held-out split the queries; each query is voted for by its k
  nearest neighbours weighted by exp(cos / t), t = 0.1, k chosen from the bank: 10% of its
  smallest class's count, at most 200 (MoCo's value for 5,000 images per class; `knn.auto_k`).
  The k used is recorded. For eval views of at most 32 x 32 pixels the same kNN on the flattened,
  L2-normalised eval views (raw pixels) is reported next to it: `raw_pixels_top1`.
* linear (ALGORITHMS.md §1.6, facebookresearch/moco main_lincls.py): a linear classifier on the
  frozen pooled features, fc ~ N(0, 0.01²), bias 0; SGD (PyTorch semantics) lr 30, momentum 0.9,
  weight decay 0, batch 256, 100 epochs, lr x0.1 at 60% and 80% of the epochs (epochs 60 and 80);
  training views RandomResizedCrop(0.08-1) + flip, validation Resize + CenterCrop, both scaled to
  the run's image size. The backbone runs in inference mode (BN statistics frozen), and
  afterwards its weights must be bit-identical to before (MoCo's `sanity_check`): otherwise
  `BackboneChangedError`. The protocol runs the backbone on fresh crops every epoch;
  `cache_features=True` (`--linear_cache_features`) instead extracts centre-view features once and
  trains on those (much faster, no augmentation; not the paper protocol). The quickstart data set
  (8x8 digits) defaults to 30 epochs (milestones 18, 24) so that it finishes in minutes on a CPU,
  and to training crops of 0.5-1 of the image without flips, like its pretraining: with MoCo's
  0.08-1 crops and flips the probe of the quickstart model reaches 86.7% instead of 96.3%, no
  better than the random-init network (`--linear_crop_min_scale`, `--linear_hflip` override).

`--strategy=mirrored` (local GPUs, or `--cpu_replicas` logical CPUs) or `--strategy=tpu` spreads
the forward passes (and the probe's training steps on fresh crops) over the replicas: each batch
is padded to the global `--batch_size`, split evenly, and gathered back in order, with a mask so
that the padding counts nowhere; results match one device up to float rounding (tested with 2
replicas). Multi-worker strategies are refused: a checkpoint of a multi-worker run is evaluated
on one host.

Side-car mode follows `<model_dir>/checkpoints` with `tf.train.checkpoints_iterator`, evaluates
each new checkpoint as training writes it, and stops once the run's summary.json exists and the
newest checkpoint has been evaluated, or after `--sidecar_timeout` seconds.

Errors (no run, no checkpoint, a data set without labels, bad flags) end the command line with one
message and exit status 2. The library functions (`knn_eval`, `linear_probe`,
`evaluate_checkpoint`, `run_sidecar`) take explicit arguments and never read flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmochi import build  # noqa: E402
from tfmochi import checkpoints as ckpt_lib  # noqa: E402
from tfmochi import data as data_lib  # noqa: E402
from tfmochi import distribute  # noqa: E402
from tfmochi import knn as knn_lib  # noqa: E402
from tfmochi import optimizer as optimizer_lib  # noqa: E402
from tfmochi import rundir  # noqa: E402

MODES = ("knn", "linear")
EVAL_STRATEGIES = ("default", "mirrored", "tpu")
SUMMARY_FILE = "summary.json"
RANDOM_INIT_SUFFIX = "_random_init"
EVAL_SUBDIR = "eval"
# MoCo main_lincls.py defaults.
LINEAR_EPOCHS = 100
LINEAR_LR = 30.0
LINEAR_MOMENTUM = 0.9
LINEAR_BATCH_SIZE = 256
LINEAR_MILESTONES = (0.6, 0.8)  # epochs 60 and 80 of 100
LINEAR_INIT_STD = 0.01
LINEAR_CROP_MIN_SCALE = 0.08
# Probe settings of data sets for which MoCo's (made for 224 px ImageNet) do not fit. quickstart:
# 30 epochs so that a CPU finishes in minutes; its images are 8x8 digits, where a 0.08-area crop is
# a 2x2-pixel blob that no longer shows the digit and a mirror image can be another digit, so the
# training views keep >= 50% of the image and are not flipped, like the quickstart's pretraining
# views. Measured on the quickstart model (30 epochs, lr 30): MoCo's views 86.7% top-1 (the loss
# peaks above 1e4), these 96.3%; the random-init network gets 86.0% with these.
_DATASET_LINEAR_DEFAULTS = {"quickstart": {"epochs": 30, "crop_min_scale": 0.5, "hflip": False}}

Progress = Callable[[str], None]


class EvalError(ValueError):
  """An evaluation cannot run as asked (bad setting, data set without labels). Clear message."""


class BackboneChangedError(AssertionError):
  """The frozen backbone's weights changed during the linear probe (MoCo's sanity check)."""


# -------------------------------------------------------------------------------------------------
# Shared helpers


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

    @tf.function
    def step(batch):
      def replica(b):
        # (collectives gather no bools: the mask travels as int32)
        return (tf.cast(backbone(b["image"], training=False)["pooled"], tf.float32),
                b["label"], tf.cast(b["valid"], tf.int32))

      per_replica = strategy.run(replica, args=(batch,))
      # gather concatenates the replicas' slices in replica order: the batch's own order.
      return tuple(strategy.gather(x, axis=0) for x in per_replica)

    for batch in strategy.experimental_distribute_dataset(padded_batches(dataset, batch_size)):
      f, y, valid = (t.numpy() for t in step(batch))
      feats.append(f[valid == 1])
      labels.append(y[valid == 1])
  if not feats:
    raise EvalError("The evaluation got an empty data set.")
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def require_labels(source: data_lib.DataSource, what: str) -> None:
  """Raises EvalError unless `source` is labelled (kNN and linear evaluation need labels)."""
  if not source.has_labels:
    raise EvalError(f"{what} needs labels, but {source.name}/{source.split} has none (every label "
                    "is -1). Evaluate on a labelled data set (--dataset=... --data_dir=...).")


def _num_classes(*sources: data_lib.DataSource) -> int | None:
  for source in sources:
    if source.num_classes:
      return int(source.num_classes)
  return None


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
  """Top-k accuracy in % of class scores [N, C] against int labels [N] (k clipped to C)."""
  scores = np.asarray(scores)
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = order == np.asarray(labels)[:, None]
  return {k: float(100.0 * hits[:, :min(k, scores.shape[1])].any(1).mean()) for k in ks}


def _say(progress: Progress | None, message: str) -> None:
  if progress is not None:
    progress(message)
  else:
    logging.info("%s", message)


# -------------------------------------------------------------------------------------------------
# kNN


# Raw-pixel kNN baseline: reported for eval views of at most 32 x 32 pixels (3,072 values), where
# pixels are a meaningful (and cheap) baseline, as for the 8x8 digits and CIFAR; at 224 px it is
# near chance and 150,528 values per image.
RAW_PIXELS_MAX_SIZE = 32
# Share of a streamed split (tfds, TFRecords) that `class_balanced_subset` considers, relative to
# the share the subset needs (per_class x classes / split): the seeded draw that makes the subset
# depend on --seed. The stream is read until every class is full, so this factor bounds the
# (undecoded) records read at about 2x the subset; a split at most twice the subset is considered
# whole.
_STREAM_KEEP = 0.5


def raw_pixels_meaningful(image_size: int) -> bool:
  """True when the raw-pixel kNN baseline is computed for eval views of side `image_size`."""
  return image_size <= RAW_PIXELS_MAX_SIZE


def class_balanced_subset(source: data_lib.DataSource, per_class: int,
                          seed: int) -> data_lib.DataSource:
  """At most `per_class` images of each class of `source`, chosen by `seed` (0: `source` itself).

  In-memory sources (quickstart, `data.from_numpy`): per class, the `per_class` images of smallest
  `knn.id_hash(seed, id)`, exactly. Streamed sources (tfds, e.g. ImageNet): the split is read in
  its stored order (tfds shuffles examples when it writes them), an image is considered when its
  seeded hash falls in the lowest share p = min(1, per_class x classes / (`_STREAM_KEEP` x split))
  and kept while its class has fewer than `per_class`; reading stops as soon as every class is
  full, so a pass decodes only the chosen images and reads (undecoded) about 2 x per_class /
  (images per class) of the split. A split at most twice the subset is considered whole (p = 1:
  every class keeps min(per_class, its images)); in a larger one a class with fewer than ~2 x
  per_class images may keep fewer than per_class. Both depend
  only on (seed, ids, stored order): the same subset at every pass, on every host, after a resume.

  Returns:
    A DataSource over the subset (`num_examples` is per_class x classes, capped at the split,
    for streamed sources: an upper bound when a class has fewer images).
  """
  if per_class <= 0:
    return source
  reader = source._reader  # pylint: disable=protected-access
  if reader.records is not None:
    raw, labels, ids = reader.records
    idx = knn_lib.balanced_indices(labels, ids, per_class, seed)
    return dataclasses.replace(
        source, num_examples=int(len(idx)),
        _reader=dataclasses.replace(reader, records=(raw[idx], labels[idx], ids[idx])))
  num_classes = int(source.num_classes or 0)
  if not num_classes:
    return source  # unlabelled: the kNN refuses it with its own message
  share = min(1.0, per_class * num_classes / (_STREAM_KEEP * max(int(source.num_examples), 1)))
  threshold = int(share * (1 << 62))

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def considered(ex):
    return knn_lib.id_hash(ex["id"], seed) < threshold

  @tf.autograph.experimental.do_not_convert
  def cap(counts, ex):
    label = tf.cast(ex["label"], tf.int64)
    safe = tf.clip_by_value(label, 0, num_classes - 1)
    keep = tf.logical_and(tf.logical_and(label >= 0, label < num_classes),
                          tf.gather(counts, safe) < per_class)
    counts = tf.tensor_scatter_nd_add(counts, [[safe]], [tf.cast(keep, tf.int64)])
    return counts, (ex, keep)

  def open_stream(num_shards: int, index: int) -> tf.data.Dataset:
    ds = reader.open_stream(1, 0)
    ds = ds.filter(considered).scan(tf.zeros([num_classes], tf.int64), cap)
    ds = ds.filter(tf.autograph.experimental.do_not_convert(lambda _, keep: keep))
    ds = ds.map(tf.autograph.experimental.do_not_convert(lambda example, _: example))
    ds = ds.take(per_class * num_classes)  # stops reading once every class is full
    return ds.shard(num_shards, index) if num_shards > 1 else ds

  return dataclasses.replace(
      source, num_examples=min(int(source.num_examples), per_class * num_classes),
      _reader=dataclasses.replace(reader, open_stream=open_stream))


def baselines_text(result: dict, details: str = "") -> str:
  """' (random init 93.67%, raw pixels 96.67%; <details>)': the baselines a result holds."""
  parts = [f"{name} {result[key]:.2f}%" for name, key in
           (("random init", "random_init_top1"), ("raw pixels", "raw_pixels_top1"))
           if result.get(key) is not None]
  text = "; ".join(part for part in (", ".join(parts), details) if part)
  return f" ({text})" if text else ""


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
  require_labels(train_source, "kNN evaluation")
  require_labels(test_source, "kNN evaluation")
  start = time.time()
  strategy = check_strategy(strategy, batch_size)
  train_source = class_balanced_subset(train_source, train_per_class, seed)
  test_source = class_balanced_subset(test_source, test_per_class, seed)

  def normalised(source):
    feats, labels = extract_pooled(model, data_lib.eval_dataset(
        source, batch_size=batch_size, image_size=image_size), batch_size=batch_size,
                                   strategy=strategy)
    return tf.math.l2_normalize(feats, axis=-1).numpy(), labels

  bank, bank_labels = normalised(train_source)
  queries, labels = normalised(test_source)
  num_classes = _num_classes(train_source, test_source) or int(
      max(bank_labels.max(), labels.max())) + 1
  result = knn_lib.knn_accuracy(bank, bank_labels, queries, labels, num_classes, k=k, t=t)
  counts = np.bincount(bank_labels[bank_labels >= 0])
  result.update({"k_auto": k == 0, "smallest_class": int(counts[counts > 0].min()),
                 "t": float(t), "num_train": int(len(bank)), "num_test": int(len(queries)),
                 "num_classes": num_classes, "train_per_class": int(train_per_class),
                 "test_per_class": int(test_per_class)})
  if raw_pixels if raw_pixels is not None else raw_pixels_meaningful(image_size):
    # The same images in the same order (the same deterministic pipelines), k and t.
    pixel_bank, _ = eval_view_pixels(train_source, image_size=image_size, batch_size=batch_size)
    pixel_queries, _ = eval_view_pixels(test_source, image_size=image_size,
                                        batch_size=batch_size)
    pixels = knn_lib.knn_accuracy(
        tf.math.l2_normalize(pixel_bank, axis=-1).numpy(), bank_labels,
        tf.math.l2_normalize(pixel_queries, axis=-1).numpy(), labels, num_classes,
        k=result["k"], t=t)
    result.update(raw_pixels_top1=pixels["top1"], raw_pixels_top5=pixels["top5"])
  return {**result, "seconds": float(time.time() - start)}


# -------------------------------------------------------------------------------------------------
# Linear probe


def snapshot_weights(model) -> dict[str, np.ndarray]:
  """Copies of every variable of `model` (trainable or not, incl. BN moving statistics)."""
  return {v.path: np.array(v.numpy(), copy=True) for v in model.weights}


def sanity_check(model, snapshot: dict[str, np.ndarray]) -> None:
  """MoCo lincls' sanity_check: every weight of `model` is bit-identical to `snapshot`.

  Raises:
    BackboneChangedError: naming the variables that changed (or appeared / disappeared).
  """
  current = {v.path: v.numpy() for v in model.weights}
  changed = sorted(name for name in current.keys() & snapshot.keys()
                   if current[name].dtype != snapshot[name].dtype
                   or current[name].shape != snapshot[name].shape
                   or current[name].tobytes() != snapshot[name].tobytes())
  changed += sorted(current.keys() ^ snapshot.keys())
  if changed:
    listed = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    raise BackboneChangedError(
        f"The frozen backbone changed during the linear probe ({len(changed)} of "
        f"{len(snapshot)} variables: {listed}). The linear protocol must run the backbone in "
        "inference mode (BN statistics frozen) and train only the linear classifier.")


def linear_milestones(epochs: int) -> tuple[int, ...]:
  """Epochs at which the lr drops x0.1: 60% and 80% of `epochs` (60, 80 for 100 epochs)."""
  return tuple(int(round(f * epochs)) for f in LINEAR_MILESTONES)


def linear_lr(epoch: int, epochs: int, lr: float) -> float:
  """MoCo lincls' step schedule: lr x 0.1 for each milestone <= epoch (0-based epochs)."""
  return lr * 0.1 ** sum(epoch >= m for m in linear_milestones(epochs))


def default_linear_settings(dataset: str) -> dict:
  """{"epochs", "crop_min_scale", "hflip"} of the linear probe on `dataset`.

  MoCo's (100 epochs, crops of 0.08-1 of the image, flips) except for the data sets listed in
  _DATASET_LINEAR_DEFAULTS (quickstart: 30 epochs, crops 0.5-1, no flips; see there why).
  """
  return {"epochs": LINEAR_EPOCHS, "crop_min_scale": LINEAR_CROP_MIN_SCALE, "hflip": True,
          **_DATASET_LINEAR_DEFAULTS.get(dataset, {})}


def default_linear_epochs(dataset: str) -> int:
  """MoCo's 100 epochs, except for the small offline data sets (30 for quickstart)."""
  return default_linear_settings(dataset)["epochs"]


class _LinearClassifier(tf.Module):
  """fc: features [b, F] -> logits [b, C], trained by PyTorch's SGD (`tfmochi.optimizer.SGD`)."""

  def __init__(self, feature_dim: int, num_classes: int, seed: int,
               momentum: float = LINEAR_MOMENTUM, weight_decay: float = 0.0):
    super().__init__(name="linear_classifier")
    # MoCo lincls: fc.weight.data.normal_(mean=0.0, std=0.01); fc.bias.data.zero_().
    init = tf.random.stateless_normal([feature_dim, num_classes], [seed, 0x11], stddev=1.0)
    # Under a strategy every replica applies the same all-reduced update in replica context;
    # ONLY_FIRST_REPLICA is what allows such an assign to a mirrored variable.
    var = lambda value, name: tf.Variable(  # noqa: E731
        value, name=name, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.kernel = var(LINEAR_INIT_STD * init, "kernel")
    self.bias = var(tf.zeros([num_classes]), "bias")
    # The same optimizer as pretraining (coupled L2, buf = m·buf + g, p -= lr·buf): Keras' SGD
    # folds lr into the velocity, which differs when the lr steps down at a milestone.
    self.optimizer = optimizer_lib.SGD([self.kernel, self.bias], momentum=momentum,
                                       weight_decay=weight_decay)

  def __call__(self, features):
    return tf.matmul(features, self.kernel) + self.bias

  def sgd_step(self, features, labels, lr, valid=None):
    """One torch.optim.SGD step on the mean cross-entropy of the valid rows (of every replica).

    Args:
      features: [b, F]; labels: [b] int; valid: [b] bool or None (all rows count).

    Returns:
      (sum of this replica's valid losses, its correct count, its valid count), scalars.
    """
    weight = tf.ones_like(labels, tf.float32) if valid is None else tf.cast(valid, tf.float32)
    with tf.GradientTape() as tape:
      logits = self(features)
      loss_sum = tf.reduce_sum(
          weight * tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss_sum, [self.kernel, self.bias])
    count = tf.reduce_sum(weight)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      # The mean over the global batch: sum every replica's gradient and count, then divide.
      grads, total = context.all_reduce(tf.distribute.ReduceOp.SUM, (grads, count))
    else:
      total = count
    grads = [g / tf.maximum(total, 1.0) for g in grads]
    self.optimizer.apply(grads, [self.kernel, self.bias], lr)
    hit = tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)
    correct = tf.reduce_sum(weight * tf.cast(hit, tf.float32))
    return loss_sum, correct, count


def linear_probe(model, train_source: data_lib.DataSource, test_source: data_lib.DataSource, *,
                 image_size: int, epochs: int = LINEAR_EPOCHS, lr: float = LINEAR_LR,
                 batch_size: int = LINEAR_BATCH_SIZE, momentum: float = LINEAR_MOMENTUM,
                 weight_decay: float = 0.0, cache_features: bool = False,
                 crop_min_scale: float = LINEAR_CROP_MIN_SCALE, hflip: bool = True,
                 seed: int = 0, strategy: tf.distribute.Strategy | None = None,
                 progress: Progress | None = None) -> dict:
  """MoCo's linear classification protocol on a frozen backbone's pooled features.

  Args:
    model: a `models.Encoder` (its `.backbone` is used) or a backbone with a "pooled" output.
    train_source: labelled training split.
    test_source: labelled validation split.
    image_size: view side S.
    epochs: E; the lr drops x0.1 at round(0.6 E) and round(0.8 E).
    lr: initial learning rate (30 in MoCo).
    batch_size: training batch.
    momentum: SGD momentum (PyTorch semantics).
    weight_decay: coupled L2 (0 in MoCo).
    cache_features: extract centre-view training features once and train on them (fast; no
      augmentation) instead of running the backbone on fresh crops every epoch (the protocol).
    crop_min_scale: smallest RandomResizedCrop area of the training views (0.08 in MoCo).
    hflip: random horizontal flips of the training views (MoCo: yes).
    seed: classifier init, shuffling and crops.
    strategy: run the backbone (feature extraction, and the training steps on fresh crops) over
      a single-host strategy's replicas, `batch_size` being the global batch (see
      `check_strategy`); the result matches one device up to float rounding. None: one device.
    progress: called with one line per epoch (default: absl logging).

  Returns:
    {"top1", "top5" (final epoch, %), "best_top1" (best epoch, as MoCo reports), "train_top1",
    "train_loss" (last epoch), "epochs", "lr", "milestones", "batch_size", "momentum",
    "weight_decay", "cache_features", "feature_dim", "num_classes", "num_train", "num_test",
    "seconds", "backbone_unchanged": True}.

  Raises:
    EvalError: bad settings or unlabelled data.
    BackboneChangedError: the backbone's weights changed (they must not).
  """
  if (epochs < 1 or lr <= 0 or batch_size < 1 or not 0 <= momentum < 1 or weight_decay < 0
      or not 0 < crop_min_scale <= 1):
    raise EvalError(f"linear probe needs epochs >= 1, lr > 0, batch_size >= 1, momentum in "
                    f"[0, 1), weight_decay >= 0, crop_min_scale in (0, 1]; got epochs={epochs}, "
                    f"lr={lr}, batch_size={batch_size}, momentum={momentum}, "
                    f"weight_decay={weight_decay}, crop_min_scale={crop_min_scale}.")
  require_labels(train_source, "The linear probe")
  require_labels(test_source, "The linear probe")
  start = time.time()
  strategy = check_strategy(strategy, batch_size)
  backbone = backbone_of(model)
  before = snapshot_weights(backbone)
  extract = lambda source: extract_pooled(  # noqa: E731
      backbone, data_lib.eval_dataset(source, batch_size=batch_size, image_size=image_size),
      batch_size=batch_size, strategy=strategy)

  # The backbone is frozen, so the validation (centre-view) features never change: extract once.
  val_x, val_y = extract(test_source)
  num_classes = _num_classes(train_source, test_source) or int(val_y.max()) + 1
  # Cached features train on one device (a matmul); fresh crops run across the replicas.
  distributed = strategy is not None and not cache_features
  with strategy.scope() if distributed else contextlib.nullcontext():
    classifier = _LinearClassifier(val_x.shape[1], num_classes, seed, momentum, weight_decay)
  label_spec = tf.TensorSpec([None], tf.int64)
  lr_spec = tf.TensorSpec([], tf.float32)

  @tf.function(input_signature=[tf.TensorSpec([None, val_x.shape[1]], tf.float32), label_spec,
                                lr_spec])
  def step_on_features(feats, labels, step_lr):
    return classifier.sgd_step(feats, labels, step_lr)

  def on_images(batch, step_lr):
    # Inference mode: BN uses (and keeps) its moving statistics; no gradient reaches the backbone.
    feats = tf.stop_gradient(tf.cast(backbone(batch["image"], training=False)["pooled"],
                                     tf.float32))
    return classifier.sgd_step(feats, batch["label"], step_lr, valid=batch.get("valid"))

  @tf.function(reduce_retracing=True)
  def step_on_images(batch, step_lr):
    if not distributed:
      return on_images(batch, step_lr)
    per_replica = strategy.run(on_images, args=(batch, step_lr))
    return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None) for x in per_replica)

  if cache_features:
    train_x, train_y = extract(train_source)
  rng = np.random.default_rng(seed)
  best_top1, loss_sum, correct, seen = -1.0, 0.0, 0.0, 0.0
  for epoch in range(epochs):
    epoch_start = time.time()
    step_lr = tf.constant(linear_lr(epoch, epochs, lr), tf.float32)
    loss_sum, correct, seen = 0.0, 0.0, 0.0
    if cache_features:
      order = rng.permutation(len(train_y))
      batches = (step_on_features(train_x[order[i:i + batch_size]],
                                  train_y[order[i:i + batch_size]], step_lr)
                 for i in range(0, len(order), batch_size))
    else:
      # Fresh crops and order every epoch: the draws depend on (seed, epoch, image id).
      dataset = data_lib.eval_dataset(train_source, batch_size=batch_size, image_size=image_size,
                                      train_augment=True, shuffle=True,
                                      crop_min_scale=crop_min_scale, hflip=hflip,
                                      seed=seed * 100_003 + epoch)
      if distributed:
        dataset = strategy.experimental_distribute_dataset(padded_batches(dataset, batch_size))
      batches = (step_on_images(batch, step_lr) for batch in dataset)
    for batch_loss, hits, n in batches:
      loss_sum += float(batch_loss)
      correct += float(hits)
      seen += float(n)
    val_top1 = topk_accuracy(classifier(val_x).numpy(), val_y, ks=(1,))[1]
    best_top1 = max(best_top1, val_top1)
    _say(progress, f"linear epoch {epoch + 1}/{epochs}: lr {float(step_lr):g} loss "
                   f"{loss_sum / max(seen, 1):.4f} train top-1 "
                   f"{100.0 * correct / max(seen, 1):.2f}% val top-1 {val_top1:.2f}% "
                   f"({time.time() - epoch_start:.1f} s)")

  sanity_check(backbone, before)
  val = topk_accuracy(classifier(val_x).numpy(), val_y)
  return {"top1": val[1], "top5": val[5], "best_top1": float(best_top1),
          "train_top1": float(100.0 * correct / max(seen, 1)),
          "train_loss": float(loss_sum / max(seen, 1)), "epochs": int(epochs), "lr": float(lr),
          "milestones": list(linear_milestones(epochs)), "batch_size": int(batch_size),
          "momentum": float(momentum), "weight_decay": float(weight_decay),
          "cache_features": bool(cache_features), "crop_min_scale": float(crop_min_scale),
          "hflip": bool(hflip), "feature_dim": int(val_x.shape[1]),
          "num_classes": int(num_classes), "num_train": int(train_source.num_examples),
          "num_test": int(len(val_y)), "seconds": float(time.time() - start),
          "backbone_unchanged": True}


# -------------------------------------------------------------------------------------------------
# One checkpoint of a run


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What `evaluate_checkpoint` does. None means "the run's value" (from its config.json).

  Attributes:
    mode: "knn" or "linear".
    knn_k, knn_t: kNN neighbours (0 = auto) and temperature (None: the run's --knn_k /
      --knn_t).
    linear_epochs, linear_crop_min_scale, linear_hflip: None: the data set's default
      (`default_linear_settings`: MoCo's 100 epochs, crops 0.08-1, flips; quickstart 30, 0.5-1,
      no flips).
    linear_lr, batch_size, linear_cache_features: see `linear_probe`.
    dataset, data_dir: evaluate on another data set / location than the run's.
    seed: None: the run's seed (it also fixes the quickstart held-out split).
    random_init: evaluate the run's network at its random initialisation (the trainer's weight
      seed, no checkpoint) instead of a checkpoint: the baseline that pretraining must beat.
  """
  mode: str = "knn"
  knn_k: int | None = None
  knn_t: float | None = None
  linear_epochs: int | None = None
  linear_lr: float = LINEAR_LR
  batch_size: int = LINEAR_BATCH_SIZE
  linear_cache_features: bool = False
  linear_crop_min_scale: float | None = None
  linear_hflip: bool | None = None
  dataset: str | None = None
  data_dir: str | None = None
  seed: int | None = None
  random_init: bool = False

  def validate(self) -> "EvalSettings":
    """Raises EvalError naming the bad value; returns self."""
    problems = []
    if self.mode not in MODES:
      problems.append(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
    if self.knn_k is not None and self.knn_k < 0:
      problems.append(f"--knn_k must be >= 1 (or 0 = auto); got {self.knn_k}")
    if self.knn_t is not None and not self.knn_t > 0:
      problems.append(f"--knn_t must be > 0; got {self.knn_t}")
    if self.linear_epochs is not None and self.linear_epochs < 1:
      problems.append(f"--linear_epochs must be >= 1; got {self.linear_epochs}")
    if not self.linear_lr > 0:
      problems.append(f"--linear_lr must be > 0; got {self.linear_lr}")
    if self.linear_crop_min_scale is not None and not 0 < self.linear_crop_min_scale <= 1:
      problems.append("--linear_crop_min_scale must be in (0, 1]; got "
                      f"{self.linear_crop_min_scale}")
    if self.batch_size < 1:
      problems.append(f"--batch_size must be >= 1; got {self.batch_size}")
    if problems:
      raise EvalError("; ".join(problems) + ".")
    return self


def eval_json_path(model_dir: str, mode: str, random_init: bool = False) -> str:
  """<model_dir>/eval_<mode>.json, or eval_<mode>_random_init.json for the random-init baseline."""
  return os.path.join(model_dir, f"eval_{mode}{RANDOM_INIT_SUFFIX if random_init else ''}.json")


def random_init_result(model_dir: str, mode: str) -> dict | None:
  """The random-init baseline recorded for a run, if any.

  `evaluate --random_init` writes eval_<mode>_random_init.json; for kNN the trainer also writes
  knn_random_init.json before its first step (same network, same k and t unless overridden; not
  used when the monitor ran on subsets, --knn_train_per_class / --knn_test_per_class).
  """
  candidates = [eval_json_path(model_dir, mode, random_init=True)]
  if mode == "knn":
    candidates.append(os.path.join(model_dir, ckpt_lib.KNN_RANDOM_INIT_FILE))
  for path in candidates:
    if tf.io.gfile.exists(path):
      try:
        result = rundir.read_json(path)
      except (ValueError, tf.errors.OpError):
        continue
      # The trainer's monitor may have used class-balanced subsets (ImageNet configs): not the
      # whole-split protocol of this evaluation, so not its baseline.
      subset = result.get("train_per_class") or result.get("test_per_class") \
          if isinstance(result, dict) else False
      if isinstance(result, dict) and "top1" in result and not subset:
        return result
  return None


def load_sources(config, settings: EvalSettings) -> tuple[data_lib.DataSource,
                                                          data_lib.DataSource]:
  """The (train, held-out) splits to evaluate on: the run's data set unless overridden."""
  dataset = settings.dataset or config.dataset
  data_dir = settings.data_dir if settings.data_dir is not None else config.data_dir
  seed = config.seed if settings.seed is None else settings.seed
  offset = getattr(config, "tfrecord_label_offset", 1)
  train = data_lib.load(dataset, "train", data_dir=data_dir, seed=seed,
                        tfrecord_label_offset=offset)
  test = data_lib.load(dataset, "test", data_dir=data_dir, seed=seed,
                       tfrecord_label_offset=offset)
  what = "kNN evaluation" if settings.mode == "knn" else "The linear probe"
  require_labels(train, what)
  require_labels(test, what)
  return train, test


def write_eval_scalars(model_dir: str, step: int, scalars: dict[str, float]) -> None:
  """TensorBoard scalars under <model_dir>/eval at `step`."""
  writer = tf.summary.create_file_writer(os.path.join(model_dir, EVAL_SUBDIR))
  with writer.as_default():
    for name, value in scalars.items():
      tf.summary.scalar(name, value, step=step)
  writer.flush()
  writer.close()


def _write_result(model_dir: str, mode: str, result: dict, random_init: bool = False) -> None:
  """eval_<mode>.json = this result + the history of every checkpoint evaluated (atomic)."""
  path = eval_json_path(model_dir, mode, random_init)
  history = []
  if tf.io.gfile.exists(path):
    try:
      history = list(rundir.read_json(path).get("history", []))
    except (ValueError, tf.errors.OpError, AttributeError):
      history = []  # a foreign or damaged file: start a new history rather than fail
  entry = {key: result[key] for key in ("checkpoint_step", "checkpoint", "top1", "top5")}
  history = [h for h in history if h.get("checkpoint_step") != result["checkpoint_step"]]
  history = sorted(history + [entry], key=lambda h: h.get("checkpoint_step", -1))
  rundir.write_json(path, {**result, "history": history})


def restore_checkpoint(model_dir: str, checkpoint_path: str | None):
  """(encoder, config, step, path) of `checkpoint_path`, or of the newest readable checkpoint."""
  return build.restore_run_encoder(model_dir, checkpoint_path)


def evaluate_checkpoint(model_dir: str, settings: EvalSettings, *,
                        checkpoint_path: str | None = None,
                        sources: tuple[data_lib.DataSource, data_lib.DataSource] | None = None,
                        strategy: tf.distribute.Strategy | None = None,
                        progress: Progress | None = None, write: bool = True) -> dict:
  """Evaluates one checkpoint of a run and records the result.

  Args:
    model_dir: the training run (config.json, checkpoints/).
    settings: what to run (validated here).
    checkpoint_path: a checkpoint prefix (default: the newest readable one).
    sources: (train, test) data to use instead of loading the run's data set.
    strategy: a single-host strategy to spread the evaluation over (the encoder is built in its
      scope); None: one device.
    progress: called with progress lines (default: absl logging).
    write: write eval_<mode>.json and the TensorBoard scalars.

  Returns:
    The result dict: top1, top5 (%), checkpoint_step, checkpoint, mode, random_init, dataset,
    image_size, arch, the mode's settings (see `knn_eval` / `linear_probe`) and, when the run
    has a random-init baseline of this mode (`random_init_result`), random_init_top1.

  Raises:
    checkpoints.CheckpointError: no run, no checkpoint, or an unreadable one.
    EvalError: bad settings or unlabelled data.
    data.DataError: the data set cannot be loaded.
    BackboneChangedError: the linear probe changed the backbone.
  """
  settings.validate()
  strategy = check_strategy(strategy, settings.batch_size)
  if settings.random_init and checkpoint_path is not None:
    raise EvalError("--random_init evaluates the network before training; it takes no "
                    "--checkpoint.")
  with strategy.scope() if strategy is not None else contextlib.nullcontext():
    if settings.random_init:
      encoder, config = ckpt_lib.random_init_encoder(model_dir)
      step, path = 0, None
    else:
      encoder, config, step, path = restore_checkpoint(model_dir, checkpoint_path)
  train, test = sources if sources is not None else load_sources(config, settings)
  if sources is not None:
    require_labels(train, f"{settings.mode} evaluation")
    require_labels(test, f"{settings.mode} evaluation")
  seed = config.seed if settings.seed is None else settings.seed
  if settings.mode == "knn":
    result = knn_eval(encoder, train, test, image_size=config.image_size,
                      k=settings.knn_k if settings.knn_k is not None else config.knn_k,
                      t=settings.knn_t if settings.knn_t is not None else config.knn_t,
                      batch_size=settings.batch_size, strategy=strategy)
  else:
    defaults = default_linear_settings(settings.dataset or config.dataset)
    epochs = settings.linear_epochs or defaults["epochs"]
    crop_min_scale = (defaults["crop_min_scale"] if settings.linear_crop_min_scale is None
                      else settings.linear_crop_min_scale)
    hflip = defaults["hflip"] if settings.linear_hflip is None else settings.linear_hflip
    what = "the random-init network" if settings.random_init else f"step {step}"
    _say(progress, f"Linear probe of {what}: {epochs} epochs, lr {settings.linear_lr:g}, "
                   f"batch {settings.batch_size}, "
                   + ("cached centre-view features" if settings.linear_cache_features
                      else f"random-resized-crop ({crop_min_scale:g}-1)"
                           + (" + flip" if hflip else ", no flip")
                           + " views (backbone run every epoch)"))
    result = linear_probe(encoder, train, test, image_size=config.image_size, epochs=epochs,
                          lr=settings.linear_lr, batch_size=settings.batch_size,
                          cache_features=settings.linear_cache_features,
                          crop_min_scale=crop_min_scale, hflip=hflip, seed=seed,
                          strategy=strategy, progress=progress)
  result = {**result, "mode": settings.mode, "checkpoint_step": int(step), "checkpoint": path,
            "random_init": bool(settings.random_init), "model_dir": model_dir,
            "dataset": train.name, "train_split": train.split, "test_split": test.split,
            "image_size": int(config.image_size), "arch": config.arch, "feature": "pooled",
            "seed": int(seed), "replicas": strategy.num_replicas_in_sync if strategy else 1}
  if not settings.random_init:
    baseline = random_init_result(model_dir, settings.mode)
    if baseline is not None:
      result["random_init_top1"] = float(baseline["top1"])
  if write:
    _write_result(model_dir, settings.mode, result, random_init=settings.random_init)
    prefix = settings.mode + (RANDOM_INIT_SUFFIX if settings.random_init else "")
    scalars = {f"{prefix}_top1": result["top1"], f"{prefix}_top5": result["top5"]}
    if settings.mode == "linear":
      scalars[f"{prefix}_best_top1"] = result["best_top1"]
    else:
      scalars[f"{prefix}_k"] = result["k"]
    write_eval_scalars(model_dir, step, scalars)
  return result


# -------------------------------------------------------------------------------------------------
# Side-car


def training_finished(model_dir: str, last_path: str | None) -> bool:
  """True when the run's summary.json exists and its newest checkpoint has been evaluated.

  A summary.json left by an earlier run that has since been resumed does not count: the resumed
  run's checkpoints are past that summary's global_step.
  """
  summary_path = os.path.join(model_dir, SUMMARY_FILE)
  if not tf.io.gfile.exists(summary_path):
    return False
  latest = tf.train.latest_checkpoint(ckpt_lib.checkpoint_dir(model_dir))
  if latest is None:
    return True  # a finished run without any checkpoint: nothing will come
  if latest != last_path:
    return False
  try:
    final_step = rundir.read_json(summary_path).get("global_step")
  except (ValueError, tf.errors.OpError, AttributeError):
    final_step = None
  return not (isinstance(final_step, int) and ckpt_lib.checkpoint_step(latest) > final_step)


def run_sidecar(model_dir: str, settings: EvalSettings, *, timeout: float = 3600.0,
                poll_interval: float = 10.0,
                sources: tuple[data_lib.DataSource, data_lib.DataSource] | None = None,
                strategy: tf.distribute.Strategy | None = None,
                progress: Progress | None = None) -> list[dict]:
  """Evaluates every new checkpoint of a (running) training job until it ends.

  Args:
    model_dir: the run; it need not have a checkpoint (or exist) yet.
    settings: what to run.
    timeout: give up after this many seconds in total.
    poll_interval: how often to check for the end of training while no checkpoint is new
      (at least every 2 s).
    sources: (train, test) instead of the run's data set (loaded once, at the first checkpoint).
    strategy: see `evaluate_checkpoint`.
    progress: progress lines.

  Returns:
    The results, one per evaluated checkpoint (each also written as `evaluate_checkpoint` does).
  """
  settings.validate()
  if settings.random_init:
    raise EvalError("--random_init and --sidecar are exclusive (the random-init network has no "
                    "checkpoints to follow).")
  if timeout <= 0 or poll_interval <= 0:
    raise EvalError(f"--sidecar_timeout must be > 0 (got {timeout}) and the poll interval > 0.")
  deadline = time.time() + timeout
  state = {"path": None}  # the newest checkpoint handled (evaluated or skipped)
  results = []

  def stop() -> bool:
    return time.time() >= deadline or training_finished(model_dir, state["path"])

  # checkpoints_iterator polls every second and gives up a wait once less than a second is
  # left, so a wait shorter than 2 s would return at once and spin; hence the floor.
  iterator = tf.train.checkpoints_iterator(ckpt_lib.checkpoint_dir(model_dir),
                                           timeout=max(2.0, min(poll_interval, timeout)),
                                           timeout_fn=stop)
  for path in iterator:
    _say(progress, f"side-car: evaluating {path}")
    try:
      if sources is None:
        config = ckpt_lib.load_run_config(model_dir)
        sources = load_sources(config, settings)
      result = evaluate_checkpoint(model_dir, settings, checkpoint_path=path, sources=sources,
                                   strategy=strategy, progress=progress)
    except ckpt_lib.CheckpointError as e:
      # Typically the trainer deleted it (max_to_keep) before we got to it: go on.
      logging.warning("side-car: skipping %s: %s", path, e)
      state["path"] = path
      continue
    results.append(result)
    state["path"] = path
    _say(progress, f"side-car: step {result['checkpoint_step']}: {settings.mode} top-1 "
                   f"{result['top1']:.2f}% top-5 {result['top5']:.2f}%")
    if time.time() >= deadline:
      break
  return results


# -------------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("model_dir", None, "The training run (holds config.json, checkpoints/).")
  flags.DEFINE_string("mode", "knn", f"One of {', '.join(MODES)}.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint prefix (default: the newest readable).")
  flags.DEFINE_integer("knn_k", None, "kNN neighbours; 0 = auto: a tenth of the bank's smallest "
                       "class, at most 200, so that a query's neighbours can all be of its own "
                       "class (default: the run's --knn_k, 0 = auto).")
  flags.DEFINE_float("knn_t", None, "kNN temperature (default: the run's --knn_t, 0.1).")
  flags.DEFINE_integer("linear_epochs", None,
                       f"Linear probe epochs (default {LINEAR_EPOCHS}; 30 for quickstart). The "
                       "lr drops x0.1 at 60% and 80% of them.")
  flags.DEFINE_float("linear_crop_min_scale", None,
                     f"Smallest random-resized-crop area of the probe's training views (default "
                     f"{LINEAR_CROP_MIN_SCALE:g} as in MoCo; 0.5 for quickstart).")
  flags.DEFINE_bool("linear_hflip", None, "Random horizontal flips of the probe's training views "
                    "(default: yes as in MoCo; no for quickstart, whose digits change meaning).")
  flags.DEFINE_float("linear_lr", LINEAR_LR, "Linear probe learning rate (SGD, momentum 0.9).")
  flags.DEFINE_integer("batch_size", LINEAR_BATCH_SIZE, "Batch size (both modes).")
  flags.DEFINE_bool("linear_cache_features", False,
                    "Extract centre-view features once and train the linear classifier on them "
                    "(fast, no augmentation) instead of fresh crops every epoch (the protocol).")
  flags.DEFINE_string("dataset", None, "Evaluate on this data set (default: the run's).")
  flags.DEFINE_string("data_dir", None, "Data directory (default: the run's).")
  flags.DEFINE_integer("seed", None, "Seed (default: the run's; fixes the quickstart split).")
  flags.DEFINE_bool("random_init", False,
                    "Evaluate the run's network at its random initialisation (no checkpoint): the "
                    "baseline pretraining must beat. Writes eval_<mode>_random_init.json, which "
                    "later evaluations of the run report next to their own top-1.")
  flags.DEFINE_string("strategy", "default", "Where to run: default (one device), mirrored (all "
                      "local GPUs, or --cpu_replicas logical CPUs) or tpu (--tpu). --batch_size is "
                      "the global batch.")
  flags.DEFINE_integer("cpu_replicas", 1, "--strategy=mirrored without GPUs: logical CPUs.")
  flags.DEFINE_string("tpu", None, "--strategy=tpu: the TPU name, 'local' on a TPU VM, or a "
                      "grpc:// address.")
  flags.DEFINE_bool("sidecar", False, "Follow the run: evaluate each new checkpoint until "
                    "summary.json appears (or --sidecar_timeout).")
  flags.DEFINE_float("sidecar_timeout", 3600.0, "Side-car: give up after this many seconds.")
  flags.DEFINE_float("sidecar_poll_secs", 10.0, "Side-car: how often to look for the end of "
                     "training while no new checkpoint appears.")


def _error(message: str) -> int:
  logging.flush()
  print(f"tfmochi.evaluate: error: {message}", file=sys.stderr, flush=True)
  return 2


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  if len(argv) > 1:
    return _error(f"unexpected arguments {' '.join(argv[1:])} (flags start with --).")
  if not flag_values.model_dir:
    return _error("--model_dir is required (the training run to evaluate).")
  logging.set_verbosity(logging.WARNING)  # progress goes to stdout; keep INFO chatter out
  tf.get_logger().setLevel("ERROR")  # e.g. checkpoints_iterator logs every wait at INFO
  settings = EvalSettings(
      mode=flag_values.mode, knn_k=flag_values.knn_k, knn_t=flag_values.knn_t,
      linear_epochs=flag_values.linear_epochs, linear_lr=flag_values.linear_lr,
      batch_size=flag_values.batch_size, linear_cache_features=flag_values.linear_cache_features,
      linear_crop_min_scale=flag_values.linear_crop_min_scale,
      linear_hflip=flag_values.linear_hflip, dataset=flag_values.dataset,
      data_dir=flag_values.data_dir, seed=flag_values.seed, random_init=flag_values.random_init)
  model_dir = flag_values.model_dir
  if flag_values.strategy not in EVAL_STRATEGIES:
    return _error(f"--strategy must be one of {', '.join(EVAL_STRATEGIES)} (evaluation runs on "
                  f"one host); got {flag_values.strategy!r}.")
  try:
    settings.validate()
    try:
      strategy = distribute.make_strategy(flag_values.strategy, tpu=flag_values.tpu,
                                          cpu_replicas=flag_values.cpu_replicas)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
      raise EvalError(f"--strategy={flag_values.strategy} cannot start: "
                      f"{str(e).splitlines()[0]}") from None
    if flag_values.sidecar:
      if flag_values.checkpoint:
        raise EvalError("--checkpoint and --sidecar are exclusive (the side-car follows every "
                        "new checkpoint).")
      results = run_sidecar(model_dir, settings, timeout=flag_values.sidecar_timeout,
                            poll_interval=flag_values.sidecar_poll_secs, strategy=strategy,
                            progress=print)
      if not results:
        return _error(f"no checkpoint could be evaluated in {ckpt_lib.checkpoint_dir(model_dir)}"
                      f" within --sidecar_timeout={flag_values.sidecar_timeout:g} s.")
      result = results[-1]
    else:
      result = evaluate_checkpoint(model_dir, settings, checkpoint_path=flag_values.checkpoint,
                                   strategy=strategy, progress=print)
  except (EvalError, ckpt_lib.CheckpointError, data_lib.DataError, BackboneChangedError) as e:
    return _error(str(e))
  name = "kNN" if settings.mode == "knn" else "Linear"
  what = "random init" if settings.random_init else f"step {result['checkpoint_step']}"
  baseline = baselines_text(result, f"k={result['k']}" if settings.mode == "knn" else "")
  print(f"{name} top-1 {result['top1']:.2f}%{baseline} top-5 {result['top5']:.2f}% on "
        f"{result['dataset']}/{result['test_split']} ({what}, {result['seconds']:.1f} s) -> "
        f"{eval_json_path(model_dir, settings.mode, settings.random_init)}", flush=True)
  return 0


def _parse_flags(argv):
  """absl flag parsing whose errors (e.g. --knn_k=abc) also exit with status 2, no traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"tfmochi.evaluate: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def run():
  """Entry point of `python -m tfmochi.evaluate`."""
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
