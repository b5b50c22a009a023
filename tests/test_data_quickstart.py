"""Tests of tfmochi.data.quickstart."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmochi import data


class QuickstartTest(tf.test.TestCase):

  def test_splits(self):
    train, test = data.load("quickstart", "train"), data.load("quickstart", "test")
    self.assertEqual((train.num_examples, test.num_examples), (1497, 300))
    self.assertEqual((train.num_classes, train.has_labels, train.name), (10, True, "quickstart"))
    examples = list(test.dataset.as_numpy_iterator())
    self.assertLen(examples, 300)
    self.assertEqual(examples[0]["image"].shape, (8, 8, 3))
    self.assertEqual(examples[0]["image"].dtype, np.uint8)
    self.assertEqual(examples[0]["label"].dtype, np.int64)
    labels = np.array([e["label"] for e in examples])
    self.assertAllEqual(np.unique(labels), np.arange(10))
    self.assertAllInRange(np.bincount(labels), 28, 32)  # stratified: ~30 per class
    self.assertGreater(max(e["image"].max() for e in examples), 200)  # 0..16 scaled to 0..255
    test_ids = {int(e["id"]) for e in examples}
    train_ids = {int(e["id"]) for e in train.dataset.as_numpy_iterator()}
    self.assertLen(train_ids, 1497)
    self.assertEmpty(train_ids & test_ids)
    self.assertEqual(train_ids | test_ids, set(range(1797)))
    again = {int(e["id"]) for e in data.load("quickstart", "test").dataset.as_numpy_iterator()}
    self.assertEqual(again, test_ids)  # deterministic held-out split
    other = data.load("quickstart", "test", seed=1).dataset.as_numpy_iterator()
    self.assertNotEqual({int(e["id"]) for e in other}, test_ids)

  def test_steps_per_epoch(self):
    self.assertEqual(data.steps_per_epoch(1497, 256), 5)
    self.assertEqual(data.steps_per_epoch(10, 10), 1)
    self.assertEqual(data.steps_per_epoch(9, 10), 0)


if __name__ == "__main__":
  tf.test.main()
