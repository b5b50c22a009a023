"""Tests of tfmochi.data.subsets: the class-balanced subset (in memory: `balanced_indices`)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import testdata  # tests/testdata.py (tests/ is on sys.path under pytest)
from tfmochi import data
from tfmochi.data import subsets


class SubsetTest(tf.test.TestCase):

  def test_class_balanced_subset_in_memory_and_streamed(self):
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(3), [20, 4, 24]))
    x = rng.integers(0, 256, [len(y), 8, 8, 3], dtype=np.uint8)
    source = data.from_numpy(x, y, name="noise", ids=np.arange(len(y)) * 7 + 3)
    for name, src in (("in memory", source), ("streamed", testdata.streamed(source))):
      with self.subTest(name):
        subset = data.class_balanced_subset(src, per_class=5, seed=3)
        passes = [list(subset.raw().as_numpy_iterator()) for _ in range(2)]
        labels = np.array([ex["label"] for ex in passes[0]])
        counts = np.bincount(labels)
        self.assertAllEqual(counts[[0, 2]], [5, 5])
        # Class 1 has only 4: all of them in memory; a stream considers a seeded half only.
        self.assertEqual(counts[1], 4) if name == "in memory" else self.assertLessEqual(
            counts[1], 4)
        self.assertEqual([ex["id"] for ex in passes[0]], [ex["id"] for ex in passes[1]])
        self.assertLessEqual(len(labels), subset.num_examples)
        self.assertIs(data.class_balanced_subset(src, per_class=0, seed=3), src)


class BalancedIndicesTest(tf.test.TestCase):

  def test_counts_per_class_and_determinism(self):
    labels = np.repeat([0, 1, 2, 3], [40, 7, 25, 60])
    ids = np.arange(len(labels)) * 3 + 1000
    chosen = subsets.balanced_indices(labels, ids, per_class=10, seed=5)
    self.assertAllEqual(np.bincount(labels[chosen]), [10, 7, 10, 10])  # class 1 keeps all 7
    self.assertAllEqual(chosen, np.sort(chosen))
    self.assertAllEqual(chosen, subsets.balanced_indices(labels, ids, per_class=10, seed=5))
    other = subsets.balanced_indices(labels, ids, per_class=10, seed=6)
    self.assertNotAllEqual(chosen, other)  # the seed chooses
    # A function of (seed, id), not of the order the split is stored in.
    order = np.random.default_rng(0).permutation(len(labels))
    shuffled = subsets.balanced_indices(labels[order], ids[order], per_class=10, seed=5)
    self.assertAllEqual(np.sort(ids[order][shuffled]), np.sort(ids[chosen]))
    self.assertAllEqual(subsets.balanced_indices(labels, ids, 0, 5), np.arange(len(labels)))


if __name__ == "__main__":
  tf.test.main()
