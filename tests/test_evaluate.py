"""Tests for tfmochi.evaluate: kNN, MoCo's linear probe with its sanity check, side-car, CLI.

The CLI subprocesses (a kNN evaluation of a quickstart run at 16 px, and the error cases) start
first and run while the in-process tests use tiny in-memory data sets, so on 2 cores most of
their cost (the TensorFlow import) overlaps.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmochi import augment
from tfmochi import checkpoints as ckpt_lib
from tfmochi import config as config_lib
from tfmochi import data as data_lib
from tfmochi import distribute
from tfmochi import evaluate
from tfmochi import models
from tfmochi import rundir
import testdata  # tests/testdata.py
import test_knn  # noqa: E402  (tests/ is on sys.path under pytest; the NumPy kNN reference)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SIZE = 16


# -------------------------------------------------------------------------------------------------
# Helpers


@functools.lru_cache(maxsize=None)
def _workdir() -> str:
  path = tempfile.mkdtemp(prefix="tfmochi-test-evaluate-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def _save_checkpoint(model_dir: str, encoder, step: int) -> None:
  ckpt = tf.train.Checkpoint(step=tf.Variable(step, dtype=tf.int64), query_encoder=encoder)
  tf.train.CheckpointManager(ckpt, os.path.join(model_dir, "checkpoints"), max_to_keep=3).save(
      checkpoint_number=step)


def _make_run(model_dir: str, checkpoint: bool = True) -> str:
  """A run directory as the trainer leaves it (config.json + a query-encoder checkpoint)."""
  os.makedirs(model_dir, exist_ok=True)
  if checkpoint:
    _save_checkpoint(model_dir, models.build_encoder("resnet18", small_stem=True,
                                                     name="query_encoder"), 1)
  # head_bn=False: the checkpoint above holds build_encoder's default (MoCo v2) head.
  config = config_lib.TrainConfig(dataset="quickstart", arch="resnet18", small_stem=True,
                                  head_bn=False, image_size=_SIZE, model_dir=model_dir,
                                  bn_mode="none",
                                  queue_size=256, batch_size=32)
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    f.write(json.dumps(dataclasses.asdict(config)))
  return model_dir


def _colour_images(num_per_class: int, num_classes: int, seed: int, size: int = 12):
  """Solid-colour images (one colour per class) with mild noise: linearly separable."""
  rng = np.random.default_rng(seed)
  palette = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]])
  labels = np.repeat(np.arange(num_classes), num_per_class)
  noise = rng.integers(-20, 21, size=[len(labels), size, size, 3])
  images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
  order = rng.permutation(len(labels))
  return images[order], labels[order]


def _sources(num_per_class: int = 12, num_classes: int = 3, labelled: bool = True):
  x, y = _colour_images(num_per_class, num_classes, seed=1)
  xt, yt = _colour_images(max(2, num_per_class // 3), num_classes, seed=2)
  train = data_lib.from_numpy(x, y if labelled else None, name="colours", split="train")
  test = data_lib.from_numpy(xt, yt if labelled else None, name="colours", split="test",
                             ids=np.arange(len(xt)) + 10_000)
  return train, test


def _noise_images(num_per_class, seed: int = 0, size: int = 8):
  """Uniform noise images, `num_per_class[c]` of class c, in a shuffled order."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(num_per_class)), num_per_class))
  return rng.integers(0, 256, [len(labels), size, size, 3], dtype=np.uint8), labels


def _tiny_bn_backbone(seed: int = 0) -> keras.Model:
  """Conv -> BN -> ReLU -> average pool: a seeded, well-conditioned backbone with BN statistics.

  (A random-init ResNet's pooled features share a large common component, so whether a few
  dozen SGD steps separate them depends on the draw; this one separates the colours reliably.)
  """
  images = keras.Input(shape=(None, None, 3))
  x = keras.layers.Conv2D(16, 3, use_bias=False,
                          kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(images)
  bn = keras.layers.BatchNormalization()
  x = keras.layers.ReLU()(bn(x))
  model = keras.Model(images, {"pooled": keras.layers.GlobalAveragePooling2D()(x)})
  # Non-trivial moving statistics, so that inference mode differs from training mode.
  bn.moving_mean.assign(np.full([16], 0.1, np.float32))
  bn.moving_variance.assign(np.full([16], 2.0, np.float32))
  return model


def _mean_colour_backbone() -> keras.Model:
  """A 'backbone' whose pooled feature is the mean colour: separable for _colour_images."""
  images = keras.Input(shape=(None, None, 3))
  pooled = keras.layers.GlobalAveragePooling2D()(images)
  return keras.Model(images, {"pooled": pooled})


_STARTED: list[subprocess.Popen] = []


@atexit.register
def _stop_started() -> None:
  for process in _STARTED:
    if process.poll() is None:
      process.kill()


def _python(*args: str) -> subprocess.Popen:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": _REPO,
         "CUDA_VISIBLE_DEVICES": ""}
  process = subprocess.Popen([sys.executable, "-m", "tfmochi.evaluate", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=_workdir())
  _STARTED.append(process)
  return process


@functools.lru_cache(maxsize=None)
def _cli() -> dict:
  """Starts every CLI case at once; returns {name: Popen}."""
  root = _workdir()
  good = _make_run(os.path.join(root, "run"))
  empty = _make_run(os.path.join(root, "empty"), checkpoint=False)
  return {
      "knn": (_python(f"--model_dir={good}", "--mode=knn"), good),
      "no_checkpoint": (_python(f"--model_dir={empty}", "--mode=knn"), empty),
      "random_init": (_python(f"--model_dir={empty}", "--mode=knn", "--random_init"), empty),
      "bad_mode": (_python(f"--model_dir={good}", "--mode=svm"), good),
      "bad_k": (_python(f"--model_dir={good}", "--knn_k=abc"), good),
      "bad_strategy": (_python(f"--model_dir={good}", "--strategy=multi_worker"), good),
  }


@functools.lru_cache(maxsize=None)
def _finished(name: str) -> tuple[int, str, str, str]:
  process, model_dir = _cli()[name]
  stdout, stderr = process.communicate(timeout=240)
  return process.returncode, stdout, stderr, model_dir


# -------------------------------------------------------------------------------------------------
# kNN


class KnnTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # In one process the CLI subprocesses overlap with the in-process tests. Under pytest-xdist
    # the single CLI test starts them itself, so only the worker that runs it pays for them.
    if "PYTEST_XDIST_WORKER" not in os.environ:
      _cli()

  def test_separable_features_give_100_percent(self):
    train, test = _sources()
    result = evaluate.knn_eval(_mean_colour_backbone(), train, test, image_size=_SIZE, k=5,
                               t=0.1, batch_size=16)
    self.assertEqual(result["top1"], 100.0)
    self.assertEqual(result["top5"], 100.0)
    self.assertEqual((result["num_train"], result["num_test"], result["num_classes"]), (36, 12, 3))

  def test_needs_labels(self):
    train, test = _sources(labelled=False)
    with self.assertRaisesRegex(evaluate.EvalError, "needs labels"):
      evaluate.knn_eval(_mean_colour_backbone(), train, test, image_size=_SIZE)

  def test_bad_k_and_t(self):
    train, test = _sources()
    with self.assertRaisesRegex(evaluate.EvalError, r"k >= 1 \(or 0 = auto\) and t > 0"):
      evaluate.knn_eval(_mean_colour_backbone(), train, test, image_size=_SIZE, k=-1)

  def test_k_is_recorded_and_raw_pixels_use_the_same_split(self):
    # Noise images with random labels: the accuracy depends on exactly which images and k.
    x, y = _noise_images(num_per_class=[40, 36, 44], seed=3)
    xt, yt = _noise_images(num_per_class=[8, 8, 8], seed=4)
    train = testdata.streamed(data_lib.from_numpy(x, y, name="noise"))
    test = data_lib.from_numpy(xt, yt, name="noise", split="test", ids=np.arange(24) + 500)
    # An explicit k wins over the automatic one (a tenth of 10 per class: 1; tests/test_knn.py).
    result = evaluate.knn_eval(_mean_colour_backbone(), train, test, image_size=8, k=5, t=0.1,
                               batch_size=64, train_per_class=10, test_per_class=5, seed=2)
    self.assertEqual((result["num_train"], result["num_test"]), (30, 15))
    self.assertEqual((result["k"], result["k_auto"], result["smallest_class"]), (5, False, 10))
    # NumPy reference: the same subsets, the eval views flattened, the weighted kNN.
    def views(source, per_class):
      rows = list(evaluate.class_balanced_subset(source, per_class, 2).raw().as_numpy_iterator())
      images = np.stack([augment.center_view(tf.constant(r["raw"]), 8).numpy() for r in rows])
      return images.reshape([len(rows), -1]), np.array([r["label"] for r in rows])
    bank, bank_labels = views(train, 10)
    queries, labels = views(test, 5)
    self.assertAllClose(result["raw_pixels_top1"],
                        test_knn.numpy_knn_top1(bank, bank_labels, queries, labels, 3, 5, 0.1))
    # Raw pixels by default only for small eval views (<= 32 px).
    self.assertEqual([evaluate.raw_pixels_meaningful(s) for s in (8, 32, 33, 224)],
                     [True, True, False, False])


# -------------------------------------------------------------------------------------------------
# Linear probe


class LinearProbeTest(tf.test.TestCase):

  def test_schedule_follows_moco(self):
    self.assertEqual(evaluate.linear_milestones(100), (60, 80))
    self.assertEqual(evaluate.linear_milestones(30), (18, 24))
    lrs = [evaluate.linear_lr(e, 100, 30.0) for e in (0, 59, 60, 79, 80, 99)]
    self.assertAllClose(lrs, [30.0, 30.0, 3.0, 3.0, 0.3, 0.3])
    self.assertEqual(evaluate.default_linear_epochs("imagenet2012"), 100)
    self.assertEqual(evaluate.default_linear_epochs("quickstart"), 30)
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
    clf = evaluate._LinearClassifier(4, 3, seed=0)
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
    train, test = _sources(num_per_class=12, num_classes=3)
    backbone = _tiny_bn_backbone()
    before = {v.path: v.numpy().copy() for v in backbone.weights}
    lines = []
    for cache in (False, True):
      result = evaluate.linear_probe(backbone, train, test, image_size=_SIZE, epochs=8, lr=0.3,
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
    train, test = _sources(num_per_class=8, num_classes=2)
    encoder = models.build_encoder("resnet18", small_stem=True)
    before = {v.path: v.numpy().copy() for v in encoder.weights}
    result = evaluate.linear_probe(encoder, train, test, image_size=_SIZE, epochs=2, lr=0.01,
                                   batch_size=16, progress=lambda _: None)
    self.assertEqual((result["feature_dim"], result["num_classes"]), (512, 2))
    self.assertBetween(result["top1"], 0.0, 100.0)
    for v in encoder.weights:  # head included: the probe never touches it
      self.assertEqual(v.numpy().tobytes(), before[v.path].tobytes(), msg=v.path)

  def test_sanity_check_catches_a_mutated_weight(self):
    backbone = _tiny_bn_backbone()
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

    train, test = _sources(num_per_class=4, num_classes=2)
    buggy = TrainingModeBackbone(_tiny_bn_backbone())
    with self.assertRaisesRegex(evaluate.BackboneChangedError, "moving_"):
      evaluate.linear_probe(buggy, train, test, image_size=_SIZE, epochs=1, lr=0.5,
                            batch_size=8, cache_features=True, progress=lambda _: None)

  def test_probe_needs_labels_and_valid_settings(self):
    train, test = _sources(labelled=False)
    with self.assertRaisesRegex(evaluate.EvalError, "needs labels"):
      evaluate.linear_probe(_mean_colour_backbone(), train, test, image_size=_SIZE, epochs=1)
    train, test = _sources()
    with self.assertRaisesRegex(evaluate.EvalError, "epochs >= 1"):
      evaluate.linear_probe(_mean_colour_backbone(), train, test, image_size=_SIZE, epochs=0)


# -------------------------------------------------------------------------------------------------
# Over 2 replicas (logical CPUs)


class DistributedTest(tf.test.TestCase):
  """knn_eval and linear_probe spread over a MirroredStrategy agree with one device."""

  def test_two_replicas_equal_one_device(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    # 39 training images in batches of 8: the last batch (7 rows) is padded to 8 and split 4/4,
    # so one replica holds a padded row, which must count nowhere.
    train, test = _sources(num_per_class=13, num_classes=3)
    with strategy.scope():
      backbone = _tiny_bn_backbone()
    kwargs = dict(image_size=_SIZE, epochs=3, lr=0.3, batch_size=8, seed=4,
                  progress=lambda _: None)
    one = evaluate.linear_probe(backbone, train, test, **kwargs)
    two = evaluate.linear_probe(backbone, train, test, strategy=strategy, **kwargs)
    for key in ("top1", "top5", "best_top1", "train_top1", "num_test", "feature_dim"):
      self.assertEqual(one[key], two[key], msg=key)
    self.assertAllClose(one["train_loss"], two["train_loss"], rtol=1e-5)
    self.assertTrue(two["backbone_unchanged"])

    knn_one = evaluate.knn_eval(backbone, train, test, image_size=_SIZE, k=5, batch_size=8)
    knn_two = evaluate.knn_eval(backbone, train, test, image_size=_SIZE, k=5, batch_size=8,
                                strategy=strategy)
    self.assertEqual((knn_one["top1"], knn_one["num_train"]),
                     (knn_two["top1"], knn_two["num_train"]))
    feats_one, labels_one = evaluate.extract_pooled(
        backbone, data_lib.eval_dataset(train, batch_size=8, image_size=_SIZE), batch_size=8)
    feats_two, labels_two = evaluate.extract_pooled(
        backbone, data_lib.eval_dataset(train, batch_size=8, image_size=_SIZE), batch_size=8,
        strategy=strategy)
    self.assertEqual(feats_two.shape, (39, 16))
    self.assertAllEqual(labels_one, labels_two)  # same rows, same order
    self.assertAllClose(feats_one, feats_two, atol=1e-6)

  def test_batch_must_split_over_the_replicas(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with self.assertRaisesRegex(evaluate.EvalError, "divisible by the 2 replicas"):
      evaluate.check_strategy(strategy, 7)
    self.assertIsNone(evaluate.check_strategy(None, 7))
    self.assertIsNone(evaluate.check_strategy(tf.distribute.get_strategy(), 7))


# -------------------------------------------------------------------------------------------------
# Checkpoints of a run: one, and the side-car


class RunTest(tf.test.TestCase):

  def test_settings_are_validated(self):
    with self.assertRaisesRegex(evaluate.EvalError, "--mode must be one of knn, linear"):
      evaluate.EvalSettings(mode="svm").validate()
    with self.assertRaisesRegex(evaluate.EvalError, "--knn_t must be > 0.*--batch_size"):
      evaluate.EvalSettings(knn_t=0.0, batch_size=0).validate()

  def test_no_checkpoint_is_a_clear_error(self):
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "run"), checkpoint=False)
    with self.assertRaisesRegex(ckpt_lib.CheckpointError, "no checkpoint yet"):
      evaluate.evaluate_checkpoint(model_dir, evaluate.EvalSettings(), sources=_sources())

  def test_unlabelled_sources_are_refused(self):
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "run"))
    with self.assertRaisesRegex(evaluate.EvalError, "needs labels"):
      evaluate.evaluate_checkpoint(model_dir, evaluate.EvalSettings(),
                                   sources=_sources(labelled=False))

  def test_random_init_baseline(self):
    # A run that has not written a checkpoint yet still has its baseline: the initial network.
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "run"), checkpoint=False)
    sources = _sources()
    settings = evaluate.EvalSettings(mode="knn", knn_k=5, batch_size=32, random_init=True)
    baseline = evaluate.evaluate_checkpoint(model_dir, settings, sources=sources)
    self.assertEqual((baseline["checkpoint_step"], baseline["random_init"]), (0, True))
    self.assertIsNone(baseline["checkpoint"])
    self.assertTrue(os.path.exists(os.path.join(model_dir, "eval_knn_random_init.json")))
    self.assertFalse(os.path.exists(evaluate.eval_json_path(model_dir, "knn")))
    # The same weights as a second rebuild: the baseline is reproducible.
    again = evaluate.evaluate_checkpoint(model_dir, settings, sources=sources, write=False)
    self.assertEqual(again["top1"], baseline["top1"])
    # Evaluations of checkpoints report it next to their own figure.
    _save_checkpoint(model_dir, models.build_encoder("resnet18", small_stem=True,
                                                     name="query_encoder"), 3)
    result = evaluate.evaluate_checkpoint(model_dir, dataclasses.replace(settings,
                                                                         random_init=False),
                                          sources=sources)
    self.assertEqual((result["checkpoint_step"], result["random_init"]), (3, False))
    self.assertEqual(result["random_init_top1"], baseline["top1"])
    with open(evaluate.eval_json_path(model_dir, "knn")) as f:
      self.assertEqual(json.load(f)["random_init_top1"], baseline["top1"])
    # Without evaluate's file, the trainer's knn_random_init.json is the kNN baseline.
    os.remove(evaluate.eval_json_path(model_dir, "knn", random_init=True))
    rundir.write_json(os.path.join(model_dir, "knn_random_init.json"), {"top1": 12.5})
    self.assertEqual(evaluate.random_init_result(model_dir, "knn")["top1"], 12.5)
    # ... unless the monitor ran on class-balanced subsets (another protocol).
    rundir.write_json(os.path.join(model_dir, "knn_random_init.json"),
                               {"top1": 12.5, "train_per_class": 20, "test_per_class": 10})
    self.assertIsNone(evaluate.random_init_result(model_dir, "knn"))
    self.assertIsNone(evaluate.random_init_result(model_dir, "linear"))
    # No checkpoint to pick, nothing to follow.
    with self.assertRaisesRegex(evaluate.EvalError, "takes no --checkpoint"):
      evaluate.evaluate_checkpoint(model_dir, settings, sources=sources,
                                   checkpoint_path=result["checkpoint"])
    with self.assertRaisesRegex(evaluate.EvalError, "--random_init and --sidecar"):
      evaluate.run_sidecar(model_dir, settings, sources=sources)
    with self.assertRaisesRegex(evaluate.EvalError, "linear_crop_min_scale"):
      evaluate.EvalSettings(linear_crop_min_scale=1.5).validate()

  def test_training_finished(self):
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "run"))
    latest = tf.train.latest_checkpoint(ckpt_lib.checkpoint_dir(model_dir))
    self.assertFalse(evaluate.training_finished(model_dir, latest))  # no summary.json yet
    summary = os.path.join(model_dir, "summary.json")
    with open(summary, "w") as f:
      json.dump({"global_step": 1}, f)
    self.assertFalse(evaluate.training_finished(model_dir, None))  # newest not evaluated
    self.assertTrue(evaluate.training_finished(model_dir, latest))
    with open(summary, "w") as f:  # a stale summary of an earlier, since resumed run
      json.dump({"global_step": 0}, f)
    self.assertFalse(evaluate.training_finished(model_dir, latest))

  def test_sidecar_follows_checkpoints_until_the_summary(self):
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "run"))
    sources = _sources()
    # The "trainer": after the side-car has evaluated step 1, it writes step 2 and finishes.
    next_encoder = models.build_encoder("resnet18", small_stem=True, name="query_encoder")
    lines = []

    def progress(line):
      lines.append(line)
      if line.startswith("side-car: step 1:"):
        _save_checkpoint(model_dir, next_encoder, 2)
        rundir.write_json(os.path.join(model_dir, "summary.json"), {"global_step": 2})

    settings = evaluate.EvalSettings(mode="knn", knn_k=5, batch_size=32)
    results = evaluate.run_sidecar(model_dir, settings, timeout=120, poll_interval=0.5,
                                   sources=sources, progress=progress)
    self.assertEqual([r["checkpoint_step"] for r in results], [1, 2], msg=lines)
    with open(evaluate.eval_json_path(model_dir, "knn")) as f:
      written = json.load(f)
    self.assertEqual(written["checkpoint_step"], 2)
    self.assertEqual([h["checkpoint_step"] for h in written["history"]], [1, 2])
    self.assertEqual(written["k"], 5)

  def test_sidecar_times_out_without_checkpoints(self):
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "run"), checkpoint=False)
    with self.assertLogs(tf.get_logger(), "INFO") as logs:
      results = evaluate.run_sidecar(model_dir, evaluate.EvalSettings(), timeout=3,
                                     poll_interval=0.5, sources=_sources())
    self.assertEqual(results, [])
    waits = [r for r in logs.output if "Waiting for new checkpoint" in r]
    self.assertBetween(len(waits), 1, 4)  # it sleeps between polls, it does not spin


# -------------------------------------------------------------------------------------------------
# Command line (subprocesses)


class CommandLineTest(tf.test.TestCase):

  def _succeeded(self, name: str, written: str) -> tuple[str, dict, str]:
    """(stdout, the JSON file it wrote, model_dir) of a CLI case that must exit 0."""
    code, stdout, stderr, model_dir = _finished(name)
    self.assertEqual(code, 0, msg=stderr[-3000:])
    with open(os.path.join(model_dir, written)) as f:
      return stdout, json.load(f), model_dir

  @pytest.mark.filterwarnings("ignore")
  def test_cli(self):
    """One test, so that under pytest-xdist a single worker starts the subprocesses."""
    _cli()
    with self.subTest("errors exit 2 without a traceback"):
      expected = {"no_checkpoint": "no checkpoint yet", "bad_mode": "--mode must be one of",
                  "bad_k": "knn_k", "bad_strategy": "--strategy must be one of"}
      for name, message in expected.items():
        code, _, stderr, _ = _finished(name)
        self.assertEqual(code, 2, msg=f"{name}: {stderr[-2000:]}")
        self.assertIn("tfmochi.evaluate: error:", stderr, msg=name)
        self.assertIn(message, stderr, msg=name)
        self.assertNotIn("Traceback", stderr, msg=name)

    with self.subTest("--mode=knn writes eval_knn.json and TensorBoard scalars"):
      stdout, result, model_dir = self._succeeded("knn", "eval_knn.json")
      self.assertIn("kNN top-1", stdout)
      for key in ("top1", "top5", "checkpoint_step", "k", "t", "num_train", "num_test",
                  "history"):
        self.assertIn(key, result)
      self.assertEqual(result["checkpoint_step"], 1)
      # k auto (the run's --knn_k=0): a tenth of the smallest class of the 1,497 digits (145).
      self.assertEqual((result["k"], result["t"]), (14, 0.1))
      self.assertIn("k=14", stdout)
      self.assertIn("raw pixels", stdout)
      self.assertAlmostEqual(result["raw_pixels_top1"], 96.67, places=1)
      self.assertEqual((result["num_train"], result["num_test"]), (1497, 300))
      self.assertBetween(result["top1"], 0.0, 100.0)
      self.assertGreaterEqual(result["top5"], result["top1"])
      events = tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*"))
      self.assertNotEmpty(events)
      tags = {value.tag for path in events
              for event in tf.compat.v1.train.summary_iterator(path)
              for value in event.summary.value if event.step == 1}
      self.assertContainsSubset({"knn_top1", "knn_top5", "knn_k"}, tags)

    with self.subTest("--random_init needs no checkpoint and writes its own file"):
      stdout, result, model_dir = self._succeeded("random_init", "eval_knn_random_init.json")
      self.assertIn("(random init,", stdout)
      self.assertEqual((result["checkpoint_step"], result["random_init"]), (0, True))
      self.assertEqual((result["num_train"], result["num_test"]), (1497, 300))
      self.assertFalse(os.path.exists(os.path.join(model_dir, "eval_knn.json")))


if __name__ == "__main__":
  tf.test.main()
