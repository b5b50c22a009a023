"""Tests for tfmochi.analyze.pipeline: refusals, MoCHi settings and the output directory."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from tfmochi import analyze
from tfmochi import config as config_lib
from tfmochi import data as data_lib
import eval_fixtures as fx  # tests/ is on sys.path under pytest

# MoCHi off (explicitly: the defaults turned it on), so the analysis uses its own defaults.
MOCHI_OFF = {"mochi_num_hard": 0, "mochi_num_mix": 0, "mochi_num_query_mix": 0}


class RunTest(tf.test.TestCase):

  def test_unlabelled_data_is_refused(self):
    model_dir = fx.make_run(os.path.join(self.create_tempdir().full_path, "run"), **MOCHI_OFF)
    images = np.zeros([8, 8, 8, 3], np.uint8)
    with self.assertRaisesRegex(analyze.AnalyzeError, "has no labels"):
      analyze.analyze_run(model_dir, os.path.join(model_dir, "out"),
                          source=data_lib.from_numpy(images))

  def test_mochi_settings(self):
    on = config_lib.TrainConfig(mochi_num_hard=64, mochi_num_mix=64, mochi_num_query_mix=32)
    mochi, note = analyze.mochi_for_analysis(on, 256)
    self.assertEqual((mochi.num_hard, mochi.num_mix, mochi.num_query_mix), (64, 64, 32))
    self.assertIn("run's", note)
    mochi, _ = analyze.mochi_for_analysis(on, 40)  # N capped by a smaller analysis queue
    self.assertEqual(mochi.num_hard, 40)
    off = dataclasses.replace(on, mochi_num_hard=0, mochi_num_mix=0, mochi_num_query_mix=0)
    mochi, note = analyze.mochi_for_analysis(off, 65536)
    self.assertEqual((mochi.num_hard, mochi.num_mix, mochi.num_query_mix), (1024, 1024, 512))
    self.assertIn("defaults", note)
    self.assertEqual(analyze.mochi_for_analysis(off, 1497)[0].num_hard, 187)

  def test_unwritable_output_dir(self):
    blocker = os.path.join(self.create_tempdir().full_path, "file")
    with open(blocker, "w") as f:
      f.write("x")
    with self.assertRaisesRegex(analyze.AnalyzeError, "--output_dir .* is not writable"):
      analyze.check_output_dir(os.path.join(blocker, "out"))


if __name__ == "__main__":
  tf.test.main()
