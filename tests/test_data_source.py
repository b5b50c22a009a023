"""Tests of tfmochi.data.source: DataSource records, subsets and streams."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import data_fixtures as fx  # tests/data_fixtures.py
import testdata  # tests/testdata.py (tests/ is on sys.path under pytest)
from tfmochi import data


class SubsetTest(tf.test.TestCase):

  def test_records_subset_and_with_stream(self):
    source = fx.tiny_source(6)
    raw, labels, ids = source.records()
    self.assertEqual((raw.shape, list(ids)), ((6, 12, 10, 3), list(range(100, 106))))
    subset = source.subset(np.array([4, 1]))
    self.assertEqual((subset.num_examples, list(subset.records()[2])), (2, [104, 101]))
    self.assertAllEqual(next(iter(subset.dataset))["image"], raw[4])
    stream = testdata.streamed(source)
    self.assertIsNone(stream.records())
    self.assertEqual([int(e["id"]) for e in stream.dataset], list(ids))
    self.assertEqual([int(e["id"]) for e in stream.raw(2, 1)], [101, 103, 105])
    with self.assertRaisesRegex(ValueError, "streamed; only in-memory sources"):
      stream.subset(np.array([0]))


if __name__ == "__main__":
  tf.test.main()
