"""MoCo's linear classification protocol on a frozen backbone's pooled features.

As facebookresearch/moco main_lincls.py: a linear classifier fc ~ N(0, 0.01²), bias 0, on the
frozen pooled features; SGD (PyTorch semantics) lr 30, momentum 0.9, weight decay 0, batch 256,
100 epochs, lr x0.1 at 60% and 80% of the epochs (epochs 60 and 80); training views
RandomResizedCrop(0.08-1) + flip, validation Resize + CenterCrop, both scaled to the run's image
size. The backbone runs in inference mode (BN statistics frozen), and afterwards its weights must
be bit-identical to before (MoCo's `sanity_check`): otherwise `BackboneChangedError`. The protocol
runs the backbone on fresh crops every epoch; `cache_features=True` instead extracts centre-view
features once and trains on those (much faster, no augmentation; not the paper protocol).
Data sets for which MoCo's settings (made for 224 px ImageNet) do not fit have their own
(`default_linear_settings`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from tfmochi import accuracy
from tfmochi import data as data_lib
from tfmochi import optimizer as optimizer_lib
from tfmochi.evaluate import features as features_lib
from tfmochi.evaluate.features import EvalError, Progress

# MoCo main_lincls.py defaults.
LINEAR_EPOCHS = 100
LINEAR_LR = 30.0
LINEAR_MOMENTUM = 0.9
LINEAR_BATCH_SIZE = 256
LINEAR_MILESTONES = (0.6, 0.8)  # epochs 60 and 80 of 100
LINEAR_INIT_STD = 0.01
LINEAR_CROP_MIN_SCALE = 0.08
# Probe settings of data sets for which MoCo's (made for 224 px ImageNet) do not fit. quickstart
# and mnist5k: 30 epochs so that a CPU finishes in minutes; their images are digits (8x8 for
# quickstart), where a 0.08-area crop is
# a 2x2-pixel blob that no longer shows the digit and a mirror image can be another digit, so the
# training views keep >= 50% of the image and are not flipped, like the quickstart's pretraining
# views.
_DATASET_LINEAR_DEFAULTS = {name: {"epochs": 30, "crop_min_scale": 0.5, "hflip": False}
                            for name in ("quickstart", "mnist5k")}


class BackboneChangedError(AssertionError):
  """The frozen backbone's weights changed during the linear probe (MoCo's sanity check)."""


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


def probe_accuracy(classifier, features: np.ndarray, labels: np.ndarray,
                   ks=(1, 5)) -> dict[int, float]:
  """Top-k accuracy in % of `classifier` on features [N, F] (`accuracy.topk_accuracy`'s ties)."""
  return accuracy.topk_accuracy(classifier(features).numpy(), labels, ks)


class _ProbeSteps:
  """The probe's two training steps: on cached features [b, F], or on images through the backbone.

  `strategy` (None: one device) runs the image step on every replica and sums the replicas'
  (loss sum, correct, count); the feature step always runs on one device (it is one matmul).
  """

  def __init__(self, classifier: _LinearClassifier, backbone, feature_dim: int,
               strategy: tf.distribute.Strategy | None):
    self.strategy = strategy

    @tf.function(input_signature=[tf.TensorSpec([None, feature_dim], tf.float32),
                                  tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32)])
    def step_on_features(feats, labels, step_lr):
      return classifier.sgd_step(feats, labels, step_lr)

    def on_images(batch, step_lr):
      # Inference mode: BN uses (and keeps) its moving statistics; no gradient reaches the
      # backbone.
      feats = tf.stop_gradient(tf.cast(backbone(batch["image"], training=False)["pooled"],
                                       tf.float32))
      return classifier.sgd_step(feats, batch["label"], step_lr, valid=batch.get("valid"))

    @tf.function(reduce_retracing=True)
    def step_on_images(batch, step_lr):
      if strategy is None:
        return on_images(batch, step_lr)
      per_replica = strategy.run(on_images, args=(batch, step_lr))
      return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None) for x in per_replica)

    self.on_features = step_on_features
    self.on_images = step_on_images


def _cached_batches(steps: _ProbeSteps, train_x: np.ndarray, train_y: np.ndarray, epoch: int,
                    rng: np.random.Generator, step_lr: tf.Tensor, *, batch_size: int) -> Iterable:
  """One epoch of steps on cached features [N, F], in a fresh random order (`epoch` unused)."""
  del epoch
  order = rng.permutation(len(train_y))
  return (steps.on_features(train_x[order[i:i + batch_size]], train_y[order[i:i + batch_size]],
                            step_lr)
          for i in range(0, len(order), batch_size))


def _crop_batches(steps: _ProbeSteps, source: data_lib.DataSource, epoch: int,
                  rng: np.random.Generator, step_lr: tf.Tensor, *, seed: int, batch_size: int,
                  image_size: int, crop_min_scale: float, hflip: bool) -> Iterable:
  """One epoch of steps on fresh crops: the draws and order depend on (seed, epoch, image id)."""
  del rng  # tf.data draws from the seed
  dataset = data_lib.eval_dataset(source, batch_size=batch_size, image_size=image_size,
                                  train_augment=True, shuffle=True,
                                  crop_min_scale=crop_min_scale, hflip=hflip,
                                  seed=seed * 100_003 + epoch)
  if steps.strategy is not None:
    dataset = steps.strategy.experimental_distribute_dataset(
        features_lib.padded_batches(dataset, batch_size))
  return (steps.on_images(batch, step_lr) for batch in dataset)


def _check_probe_settings(epochs: int, lr: float, batch_size: int, momentum: float,
                          weight_decay: float, crop_min_scale: float) -> None:
  if (epochs < 1 or lr <= 0 or batch_size < 1 or not 0 <= momentum < 1 or weight_decay < 0
      or not 0 < crop_min_scale <= 1):
    raise EvalError(f"linear probe needs epochs >= 1, lr > 0, batch_size >= 1, momentum in "
                    f"[0, 1), weight_decay >= 0, crop_min_scale in (0, 1]; got epochs={epochs}, "
                    f"lr={lr}, batch_size={batch_size}, momentum={momentum}, "
                    f"weight_decay={weight_decay}, crop_min_scale={crop_min_scale}.")


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
    train_source, test_source: labelled training and validation splits.
    image_size: view side S.
    epochs, lr, batch_size, momentum, weight_decay: SGD (PyTorch semantics) for E epochs, the lr
      x0.1 at round(0.6 E) and round(0.8 E) (MoCo: 100, 30, 256, 0.9, 0; coupled L2).
    cache_features: extract centre-view training features once and train on them (fast; no
      augmentation) instead of running the backbone on fresh crops every epoch (the protocol).
    crop_min_scale, hflip: smallest RandomResizedCrop area and random horizontal flips of the
      training views (MoCo: 0.08, yes).
    seed: classifier init, shuffling and crops.
    strategy: run the backbone over a single-host strategy's replicas, `batch_size` being the
      global batch (`check_strategy`); matches one device up to float rounding. None: one device.
    progress: called with one line per epoch (default: absl logging).

  Returns:
    {"top1", "top5" (final epoch, %), "best_top1" (best epoch, as MoCo reports), "train_top1",
    "train_loss" (last epoch), the settings ("epochs", "lr", "milestones", "batch_size", ...),
    "feature_dim", "num_classes", "num_train", "num_test", "seconds", "backbone_unchanged"}.

  Raises:
    EvalError: bad settings or unlabelled data.
    BackboneChangedError: the backbone's weights changed (they must not).
  """
  _check_probe_settings(epochs, lr, batch_size, momentum, weight_decay, crop_min_scale)
  features_lib.require_labels(train_source, "The linear probe")
  features_lib.require_labels(test_source, "The linear probe")
  start = time.time()
  strategy = features_lib.check_strategy(strategy, batch_size)
  backbone = features_lib.backbone_of(model)
  before = snapshot_weights(backbone)
  extract = lambda source: features_lib.extract_pooled(  # noqa: E731
      backbone, data_lib.eval_dataset(source, batch_size=batch_size, image_size=image_size),
      batch_size=batch_size, strategy=strategy)
  # The backbone is frozen, so the validation (centre-view) features never change: extract once.
  val_x, val_y = extract(test_source)
  num_classes = features_lib.num_classes_of(train_source, test_source) or int(val_y.max()) + 1
  settings = {"epochs": int(epochs), "lr": float(lr), "milestones": list(linear_milestones(epochs)),
              "batch_size": int(batch_size), "momentum": float(momentum),
              "weight_decay": float(weight_decay), "cache_features": bool(cache_features),
              "crop_min_scale": float(crop_min_scale), "hflip": bool(hflip)}
  classifier, trained = _fit(backbone, extract, train_source, val_x, val_y, num_classes,
                             settings, image_size=image_size, seed=seed, strategy=strategy,
                             progress=progress)
  sanity_check(backbone, before)
  val = probe_accuracy(classifier, val_x, val_y)
  return {"top1": val[1], "top5": val[5], **trained, **settings,
          "feature_dim": int(val_x.shape[1]), "num_classes": int(num_classes),
          "num_train": int(train_source.num_examples), "num_test": int(len(val_y)),
          "seconds": float(time.time() - start), "backbone_unchanged": True}


def _fit(backbone, extract, train_source: data_lib.DataSource, val_x: np.ndarray,
         val_y: np.ndarray, num_classes: int, settings: dict, *, image_size: int, seed: int,
         strategy: tf.distribute.Strategy | None, progress: Progress | None):
  """(the trained classifier, `_train`'s dict) of the probe with `settings` (see linear_probe)."""
  batch_size, cache_features = settings["batch_size"], settings["cache_features"]
  # Cached features train on one device (a matmul); fresh crops run across the replicas.
  distributed = strategy if strategy is not None and not cache_features else None
  with distributed.scope() if distributed is not None else contextlib.nullcontext():
    classifier = _LinearClassifier(val_x.shape[1], num_classes, seed, settings["momentum"],
                                   settings["weight_decay"])
  steps = _ProbeSteps(classifier, backbone, val_x.shape[1], distributed)
  epoch_batches = (
      functools.partial(_cached_batches, steps, *extract(train_source), batch_size=batch_size)
      if cache_features else
      functools.partial(_crop_batches, steps, train_source, seed=seed, batch_size=batch_size,
                        image_size=image_size, crop_min_scale=settings["crop_min_scale"],
                        hflip=settings["hflip"]))
  trained = _train(classifier, epoch_batches, val_x, val_y, epochs=settings["epochs"],
                   lr=settings["lr"], seed=seed, progress=progress)
  return classifier, trained


def _train(classifier: _LinearClassifier, epoch_batches, val_x: np.ndarray, val_y: np.ndarray, *,
           epochs: int, lr: float, seed: int, progress: Progress | None) -> dict:
  """The probe's epochs: `epoch_batches(epoch, rng, lr)` yields (loss sum, correct, count) steps.

  Returns:
    {"best_top1": the best epoch's validation top-1, "train_top1", "train_loss": the last
    epoch's}.
  """
  rng = np.random.default_rng(seed)
  best_top1, loss_sum, correct, seen = -1.0, 0.0, 0.0, 0.0
  for epoch in range(epochs):
    epoch_start = time.time()
    step_lr = tf.constant(linear_lr(epoch, epochs, lr), tf.float32)
    loss_sum, correct, seen = 0.0, 0.0, 0.0
    for batch_loss, hits, n in epoch_batches(epoch, rng, step_lr):
      loss_sum += float(batch_loss)
      correct += float(hits)
      seen += float(n)
    val_top1 = probe_accuracy(classifier, val_x, val_y, ks=(1,))[1]
    best_top1 = max(best_top1, val_top1)
    features_lib.say(progress, f"linear epoch {epoch + 1}/{epochs}: lr {float(step_lr):g} loss "
                               f"{loss_sum / max(seen, 1):.4f} train top-1 "
                               f"{100.0 * correct / max(seen, 1):.2f}% val top-1 "
                               f"{val_top1:.2f}% ({time.time() - epoch_start:.1f} s)")
  return {"best_top1": float(best_top1), "train_top1": float(100.0 * correct / max(seen, 1)),
          "train_loss": float(loss_sum / max(seen, 1))}
