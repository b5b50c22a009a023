"""Tests for tfmochi.evaluate.knn: the k rule, the weighted vote vs NumPy, the kNN evaluation,
its subsets and the raw-pixel baseline."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmochi import augment
from tfmochi import data as data_lib
from tfmochi import evaluate
import eval_fixtures as fx  # tests/ is on sys.path under pytest
import testdata  # tests/testdata.py


def numpy_knn_top1(bank, bank_labels, queries, labels, num_classes, k, t):
  """Reference: cosine similarities, the k largest, votes weighted by exp(sim / t)."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sim = queries @ bank.T
  top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  scores = np.zeros([len(queries), num_classes])
  for i, row in enumerate(top):
    np.add.at(scores[i], bank_labels[row], np.exp(sim[i, row] / t))
  return 100.0 * np.mean(scores.argmax(1) == labels)


class AutoKTest(tf.test.TestCase):

  def test_small_bank_gets_k_no_larger_than_its_smallest_class(self):
    labels = np.repeat([0, 1, 2], [150, 145, 160])
    self.assertEqual(evaluate.auto_k(labels), 14)  # a tenth of 145
    self.assertLessEqual(evaluate.auto_k(labels), 145)
    self.assertEqual(evaluate.auto_k(np.repeat([0, 1], [3, 50])), 1)  # never 0
    self.assertEqual(evaluate.auto_k(np.repeat([0, 1], [5000, 6000])), 200)  # MoCo's cap
    self.assertEqual(evaluate.auto_k(np.array([-1, -1, 0, 0, 0, 1, 1])), 1)  # unlabelled ignored

  def test_explicit_k_wins(self):
    labels = np.repeat([0, 1], [150, 150])
    self.assertEqual(evaluate.auto_k(labels, 200), 200)
    self.assertEqual(evaluate.auto_k(labels, 3), 3)
    with self.assertRaisesRegex(ValueError, "k must be >= 1"):
      evaluate.auto_k(labels, -1)

  def test_accuracy_reports_the_k_used_and_matches_numpy(self):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [30, 25, 40, 35])
    bank = rng.normal(size=[len(labels), 8]) + 2.0 * np.eye(8)[labels]
    query_labels = np.repeat(np.arange(4), 10)
    queries = rng.normal(size=[40, 8]) + 2.0 * np.eye(8)[query_labels]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    auto = evaluate.knn_accuracy(unit(bank), labels, unit(queries), query_labels, 4, t=0.1)
    self.assertEqual(auto["k"], 2)  # a tenth of the smallest class (25)
    self.assertAllClose(auto["top1"], numpy_knn_top1(bank, labels, queries, query_labels, 4, 2,
                                                     0.1))
    given = evaluate.knn_accuracy(unit(bank), labels, unit(queries), query_labels, 4, k=30, t=0.1)
    self.assertEqual(given["k"], 30)
    self.assertAllClose(given["top1"], numpy_knn_top1(bank, labels, queries, query_labels, 4,
                                                      30, 0.1))


class KnnTest(tf.test.TestCase):

  def test_separable_features_give_100_percent(self):
    train, test = fx.sources()
    result = evaluate.knn_eval(fx.mean_colour_backbone(), train, test, image_size=fx.SIZE, k=5,
                               t=0.1, batch_size=16)
    self.assertEqual(result["top1"], 100.0)
    self.assertEqual(result["top5"], 100.0)
    self.assertEqual((result["num_train"], result["num_test"], result["num_classes"]), (36, 12, 3))

  def test_needs_labels(self):
    train, test = fx.sources(labelled=False)
    with self.assertRaisesRegex(evaluate.EvalError, "needs labels"):
      evaluate.knn_eval(fx.mean_colour_backbone(), train, test, image_size=fx.SIZE)

  def test_bad_k_and_t(self):
    train, test = fx.sources()
    with self.assertRaisesRegex(evaluate.EvalError, r"k >= 1 \(or 0 = auto\) and t > 0"):
      evaluate.knn_eval(fx.mean_colour_backbone(), train, test, image_size=fx.SIZE, k=-1)

  def test_k_is_recorded_and_raw_pixels_use_the_same_split(self):
    # Noise images with random labels: the accuracy depends on exactly which images and k.
    x, y = fx.noise_images(num_per_class=[40, 36, 44], seed=3)
    xt, yt = fx.noise_images(num_per_class=[8, 8, 8], seed=4)
    train = testdata.streamed(data_lib.from_numpy(x, y, name="noise"))
    test = data_lib.from_numpy(xt, yt, name="noise", split="test", ids=np.arange(24) + 500)
    # An explicit k wins over the automatic one (a tenth of 10 per class: 1; AutoKTest).
    result = evaluate.knn_eval(fx.mean_colour_backbone(), train, test, image_size=8, k=5, t=0.1,
                               batch_size=64, train_per_class=10, test_per_class=5, seed=2)
    self.assertEqual((result["num_train"], result["num_test"]), (30, 15))
    self.assertEqual((result["k"], result["k_auto"], result["smallest_class"]), (5, False, 10))
    # NumPy reference: the same subsets, the eval views flattened, the weighted kNN.
    def views(source, per_class):
      rows = list(data_lib.class_balanced_subset(source, per_class, 2).raw().as_numpy_iterator())
      images = np.stack([augment.center_view(tf.constant(r["raw"]), 8).numpy() for r in rows])
      return images.reshape([len(rows), -1]), np.array([r["label"] for r in rows])
    bank, bank_labels = views(train, 10)
    queries, labels = views(test, 5)
    self.assertAllClose(result["raw_pixels_top1"],
                        numpy_knn_top1(bank, bank_labels, queries, labels, 3, 5, 0.1))
    # The stored 8 px images are the eval views' size: no second baseline.
    self.assertNotIn("raw_pixels_stored_top1", result)
    # Raw pixels by default only for small eval views (<= 32 px).
    self.assertEqual([evaluate.raw_pixels_meaningful(s) for s in (8, 32, 33, 224)],
                     [True, True, False, False])

  def test_stored_pixels_baseline_when_the_views_resize(self):
    """Eval views at 16 px of 8 px images: the same kNN on the stored uint8 pixels as well."""
    x, y = fx.noise_images(num_per_class=[20, 20], seed=5, size=8)
    xt, yt = fx.noise_images(num_per_class=[6, 6], seed=6, size=8)
    train = data_lib.from_numpy(x, y, name="noise")
    test = data_lib.from_numpy(xt, yt, name="noise", split="test", ids=np.arange(12) + 100)
    result = evaluate.knn_eval(fx.mean_colour_backbone(), train, test, image_size=16, k=3, t=0.1,
                               batch_size=64)
    self.assertEqual(result["raw_pixels_stored_size"], 8)
    self.assertAllClose(result["raw_pixels_stored_top1"],
                        numpy_knn_top1(x.reshape(40, -1).astype(np.float64), y,
                                       xt.reshape(12, -1).astype(np.float64), yt, 2, 3, 0.1))
    self.assertIn("stored 8 px pixels", evaluate.baselines_text(result))
    pixels, labels, side = evaluate.stored_pixels(test)
    self.assertEqual((pixels.shape, side), ((12, 8 * 8 * 3), 8))
    self.assertAllEqual(labels, yt)


if __name__ == "__main__":
  tf.test.main()
