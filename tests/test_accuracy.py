"""Tests for tfmochi.accuracy: top-k accuracy and its one tie rule, shared by kNN and the probe."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmochi import accuracy
from tfmochi import evaluate
from tfmochi.evaluate import linear


class TopkAccuracyTest(tf.test.TestCase):

  def test_ties_rank_the_lower_class_first(self):
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    self.assertEqual(accuracy.topk_accuracy(scores, [1, 2, 0], ks=(1, 2)), {1: 100 / 3, 2: 100.0})
    # Past 16 classes NumPy's default sort is no longer stable; the rule must still hold.
    zeros = np.zeros([4, 40])
    self.assertEqual(accuracy.topk_accuracy(zeros, [0, 1, 5, 39]), {1: 25.0, 5: 50.0})
    self.assertEqual(accuracy.topk_accuracy(zeros[:, :3], [2, 2, 2, 2], ks=(5,)), {5: 100.0})

  def test_knn_and_linear_probe_resolve_ties_alike(self):
    # 40 classes; classes 1 and 3 tie for the top score, every other class ties at the bottom.
    labels = np.array([1, 3, 0, 39])
    queries = np.tile(np.eye(1, 8, dtype=np.float32), [4, 1])
    bank = np.tile(np.eye(1, 8, dtype=np.float32), [2, 1])  # two equal neighbours: 1 and 3
    knn_result = evaluate.knn_accuracy(bank, np.array([3, 1]), queries, labels, 40, k=2, t=0.1)
    classifier = linear._LinearClassifier(8, 40, seed=0)
    classifier.kernel.assign(tf.zeros([8, 40]))
    classifier.bias.assign(tf.one_hot([1, 3], 40, dtype=tf.float32)[0]
                           + tf.one_hot([1, 3], 40, dtype=tf.float32)[1])
    probe = linear.probe_accuracy(classifier, queries, labels)
    # Stable: [1, 3, 0, 2, 4, ...]: label 1 is top-1; 3 and 0 are in the top 5; 39 is not.
    expected = {1: 25.0, 5: 75.0}
    self.assertEqual((knn_result["top1"], knn_result["top5"]), (expected[1], expected[5]))
    self.assertEqual(probe, expected)


if __name__ == "__main__":
  tf.test.main()
