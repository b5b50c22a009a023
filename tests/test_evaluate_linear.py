"""Tests for tfmochi.evaluate.linear: MoCo's linear probe, its schedule and its sanity check."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfmochi import data as data_lib
from tfmochi import evaluate
from tfmochi import models
from tfmochi.evaluate import linear
import eval_fixtures as fx  # tests/ is on sys.path under pytest


class LinearProbeTest(tf.test.TestCase):

  def test_schedule_follows_moco(self):
    self.assertEqual(evaluate.linear_milestones(100), (60, 80))
    self.assertEqual(evaluate.linear_milestones(30), (18, 24))
    lrs = [evaluate.linear_lr(e, 100, 30.0) for e in (0, 59, 60, 79, 80, 99)]
    self.assertAllClose(lrs, [30.0, 30.0, 3.0, 3.0, 0.3, 0.3])
    self.assertEqual(evaluate.default_linear_settings("imagenet2012"),
                     {"epochs": 100, "crop_min_scale": 0.08, "hflip": True})
    self.assertEqual(evaluate.default_linear_settings("quickstart"),
                     {"epochs": 30, "crop_min_scale": 0.5, "hflip": False})

  def test_training_views_flip_only_when_asked(self):
    # Planted structure: the class is which half of the image is bright, and the "backbone"
    # reports the mean of each half. Mirroring turns one class into the other, so with flips
    # half the training labels contradict the features (train top-1 near 50%), without them the
    # probe is perfect. crop_min_scale=1 keeps whole images, so only the flip differs.
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 16)
    images = rng.integers(0, 40, size=[32, 12, 12, 3])
    images[labels == 0, :, :6] += 200
    images[labels == 1, :, 6:] += 200
    train = data_lib.from_numpy(images.astype(np.uint8), labels, name="halves", split="train")
    test = data_lib.from_numpy(images.astype(np.uint8), labels, name="halves", split="test",
                               ids=np.arange(32) + 1000)
    inputs = keras.Input(shape=(None, None, 3))
    halves = keras.layers.Lambda(lambda x: tf.concat(
        [tf.reduce_mean(x[:, :, :6], [1, 2]), tf.reduce_mean(x[:, :, 6:], [1, 2])], -1))(inputs)
    backbone = keras.Model(inputs, {"pooled": halves})
    kwargs = dict(image_size=12, epochs=6, lr=0.5, batch_size=8, crop_min_scale=1.0,
                  progress=lambda _: None)
    plain = evaluate.linear_probe(backbone, train, test, hflip=False, **kwargs)
    flipped = evaluate.linear_probe(backbone, train, test, hflip=True, **kwargs)
    self.assertEqual((plain["hflip"], plain["crop_min_scale"]), (False, 1.0))
    self.assertEqual(plain["top1"], 100.0)
    self.assertEqual(plain["train_top1"], 100.0)
    self.assertBetween(flipped["train_top1"], 20.0, 80.0)
    with self.assertRaisesRegex(evaluate.EvalError, "crop_min_scale in"):
      evaluate.linear_probe(backbone, train, test, crop_min_scale=0.0, **{
          k: v for k, v in kwargs.items() if k != "crop_min_scale"})

  def test_sgd_step_is_pytorch_sgd(self):
    # torch.optim.SGD(momentum=0.9): buf = 0.9 buf + g; p -= lr * buf (lr changes mid-way).
    rng = np.random.default_rng(0)
    feats = rng.normal(size=[6, 4]).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    clf = linear._LinearClassifier(4, 3, seed=0)
    self.assertAllClose(np.std(clf.kernel.numpy()), 0.01, atol=0.007)
    self.assertAllEqual(clf.bias.numpy(), np.zeros(3))
    w, b = clf.kernel.numpy().astype(np.float64), clf.bias.numpy().astype(np.float64)
    bw, bb = np.zeros_like(w), np.zeros_like(b)
    for lr in (0.5, 0.05):
      logits = feats @ w + b
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      p[np.arange(6), labels] -= 1.0
      gw, gb = feats.T @ p / 6.0, p.mean(0)
      bw, bb = 0.9 * bw + gw, 0.9 * bb + gb
      w, b = w - lr * bw, b - lr * bb
      clf.sgd_step(tf.constant(feats), tf.constant(labels, tf.int64), tf.constant(lr))
    self.assertAllClose(clf.kernel.numpy(), w, atol=1e-5)
    self.assertAllClose(clf.bias.numpy(), b, atol=1e-5)

  def test_tiny_probe_beats_chance_and_keeps_the_backbone(self):
    train, test = fx.sources(num_per_class=12, num_classes=3)
    backbone = fx.tiny_bn_backbone()
    before = {v.path: v.numpy().copy() for v in backbone.weights}
    lines = []
    for cache in (False, True):
      result = evaluate.linear_probe(backbone, train, test, image_size=fx.SIZE, epochs=8, lr=0.3,
                                     batch_size=16, cache_features=cache, progress=lines.append)
      self.assertGreaterEqual(result["top1"], 90.0, msg=result)  # chance is 33%
      self.assertTrue(result["backbone_unchanged"])
      self.assertEqual(result["milestones"], [5, 6])
      self.assertEqual(result["cache_features"], cache)
      self.assertEqual(result["feature_dim"], 16)
    self.assertLen(lines, 16)
    for v in backbone.weights:  # independent of the module's own check
      self.assertEqual(v.numpy().tobytes(), before[v.path].tobytes(), msg=v.path)

  def test_resnet_encoder_probe_keeps_the_backbone(self):
    # The real architecture through the protocol's path (fresh crops, backbone every epoch).
    train, test = fx.sources(num_per_class=8, num_classes=2)
    encoder = models.build_encoder("resnet18", small_stem=True)
    before = {v.path: v.numpy().copy() for v in encoder.weights}
    result = evaluate.linear_probe(encoder, train, test, image_size=fx.SIZE, epochs=2, lr=0.01,
                                   batch_size=16, progress=lambda _: None)
    self.assertEqual((result["feature_dim"], result["num_classes"]), (512, 2))
    self.assertBetween(result["top1"], 0.0, 100.0)
    for v in encoder.weights:  # head included: the probe never touches it
      self.assertEqual(v.numpy().tobytes(), before[v.path].tobytes(), msg=v.path)

  def test_sanity_check_catches_a_mutated_weight(self):
    backbone = fx.tiny_bn_backbone()
    snapshot = evaluate.snapshot_weights(backbone)
    evaluate.sanity_check(backbone, snapshot)  # unchanged: passes
    variable = next(v for v in backbone.weights if "moving_mean" in v.path)
    variable.assign_add(tf.fill(variable.shape, 1e-7))
    with self.assertRaisesRegex(evaluate.BackboneChangedError, variable.path):
      evaluate.sanity_check(backbone, snapshot)

  def test_probe_fails_loudly_when_bn_runs_in_training_mode(self):

    class TrainingModeBackbone(keras.Model):
      """The classic bug: BN in training mode during the probe updates its statistics."""

      def __init__(self, inner):
        super().__init__()
        self.inner = inner

      def call(self, images, training=False):
        return self.inner(images, training=True)

    train, test = fx.sources(num_per_class=4, num_classes=2)
    buggy = TrainingModeBackbone(fx.tiny_bn_backbone())
    with self.assertRaisesRegex(evaluate.BackboneChangedError, "moving_"):
      evaluate.linear_probe(buggy, train, test, image_size=fx.SIZE, epochs=1, lr=0.5,
                            batch_size=8, cache_features=True, progress=lambda _: None)

  def test_probe_needs_labels_and_valid_settings(self):
    train, test = fx.sources(labelled=False)
    with self.assertRaisesRegex(evaluate.EvalError, "needs labels"):
      evaluate.linear_probe(fx.mean_colour_backbone(), train, test, image_size=fx.SIZE, epochs=1)
    train, test = fx.sources()
    with self.assertRaisesRegex(evaluate.EvalError, "epochs >= 1"):
      evaluate.linear_probe(fx.mean_colour_backbone(), train, test, image_size=fx.SIZE, epochs=0)


if __name__ == "__main__":
  tf.test.main()
