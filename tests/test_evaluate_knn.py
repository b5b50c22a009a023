"""Tests for tfmochi.evaluate.knn: the kNN evaluation, its subsets and the raw-pixel baseline."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmochi import augment
from tfmochi import data as data_lib
from tfmochi import evaluate
import eval_fixtures as fx  # tests/ is on sys.path under pytest
import test_knn  # the NumPy kNN reference
import testdata  # tests/testdata.py


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
    # An explicit k wins over the automatic one (a tenth of 10 per class: 1; tests/test_knn.py).
    result = evaluate.knn_eval(fx.mean_colour_backbone(), train, test, image_size=8, k=5, t=0.1,
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


if __name__ == "__main__":
  tf.test.main()
