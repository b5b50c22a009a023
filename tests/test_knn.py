"""Tests of tfmochi.knn: the k rule, the class-balanced subset, the weighted vote vs NumPy."""

import numpy as np
import tensorflow as tf

from tfmochi import knn


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
    self.assertEqual(knn.auto_k(labels), 14)  # a tenth of 145
    self.assertLessEqual(knn.auto_k(labels), 145)
    self.assertEqual(knn.auto_k(np.repeat([0, 1], [3, 50])), 1)  # never 0
    self.assertEqual(knn.auto_k(np.repeat([0, 1], [5000, 6000])), 200)  # MoCo's cap
    self.assertEqual(knn.auto_k(np.array([-1, -1, 0, 0, 0, 1, 1])), 1)  # unlabelled ignored

  def test_explicit_k_wins(self):
    labels = np.repeat([0, 1], [150, 150])
    self.assertEqual(knn.auto_k(labels, 200), 200)
    self.assertEqual(knn.auto_k(labels, 3), 3)
    with self.assertRaisesRegex(ValueError, "k must be >= 1"):
      knn.auto_k(labels, -1)

  def test_accuracy_reports_the_k_used_and_matches_numpy(self):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [30, 25, 40, 35])
    bank = rng.normal(size=[len(labels), 8]) + 2.0 * np.eye(8)[labels]
    query_labels = np.repeat(np.arange(4), 10)
    queries = rng.normal(size=[40, 8]) + 2.0 * np.eye(8)[query_labels]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    auto = knn.knn_accuracy(unit(bank), labels, unit(queries), query_labels, 4, t=0.1)
    self.assertEqual(auto["k"], 2)  # a tenth of the smallest class (25)
    self.assertAllClose(auto["top1"], numpy_knn_top1(bank, labels, queries, query_labels, 4, 2,
                                                     0.1))
    given = knn.knn_accuracy(unit(bank), labels, unit(queries), query_labels, 4, k=30, t=0.1)
    self.assertEqual(given["k"], 30)
    self.assertAllClose(given["top1"], numpy_knn_top1(bank, labels, queries, query_labels, 4,
                                                      30, 0.1))


class BalancedIndicesTest(tf.test.TestCase):

  def test_counts_per_class_and_determinism(self):
    labels = np.repeat([0, 1, 2, 3], [40, 7, 25, 60])
    ids = np.arange(len(labels)) * 3 + 1000
    chosen = knn.balanced_indices(labels, ids, per_class=10, seed=5)
    self.assertAllEqual(np.bincount(labels[chosen]), [10, 7, 10, 10])  # class 1 keeps all 7
    self.assertAllEqual(chosen, np.sort(chosen))
    self.assertAllEqual(chosen, knn.balanced_indices(labels, ids, per_class=10, seed=5))
    other = knn.balanced_indices(labels, ids, per_class=10, seed=6)
    self.assertNotAllEqual(chosen, other)  # the seed chooses
    # A function of (seed, id), not of the order the split is stored in.
    order = np.random.default_rng(0).permutation(len(labels))
    shuffled = knn.balanced_indices(labels[order], ids[order], per_class=10, seed=5)
    self.assertAllEqual(np.sort(ids[order][shuffled]), np.sort(ids[chosen]))
    self.assertAllEqual(knn.balanced_indices(labels, ids, 0, 5), np.arange(len(labels)))


if __name__ == "__main__":
  tf.test.main()
