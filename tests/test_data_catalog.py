"""Tests of tfmochi.data.catalog: data set names and their errors."""

from __future__ import annotations

import tensorflow as tf

from tfmochi import data


class ErrorTest(tf.test.TestCase):

  def test_unknown_name(self):
    with self.assertRaisesRegex(data.DataError, "quickstart.*folder.*tensorflow-datasets"):
      data.load("no_such_data_set_xyz")
    with self.assertRaisesRegex(data.DataError, "Did you mean 'quickstart'"):
      data.load("quikstart")


if __name__ == "__main__":
  tf.test.main()
