"""Tests of tfmochi.benchmark.head (tiny sizes; never about speed)."""

import tensorflow as tf

import benchmark_fixtures as fx  # tests/fx.py
from tfmochi import config as config_lib
from tfmochi.benchmark import cli


class HeadTest(tf.test.TestCase):

  def test_head_times_moco_and_mochi(self):
    # With MoCHi off in the flags, the head benchmark times the paper's MoCHi(1024, 1024, 512),
    # N capped at K.
    config = config_lib.TrainConfig(**dict(fx.TINY, mochi_num_hard=0, mochi_num_mix=0,
                                            mochi_num_query_mix=0))
    result = cli.run("head", config, warmup=1, timed=5)
    fx.check_result(self, result, "head", ["moco", "mochi"])
    self.assertEqual(result["config"]["mochi"], [16, 1024, 512])

  def test_compare_plain_adds_the_autodiff_heads(self):
    config = config_lib.TrainConfig(**fx.TINY)
    result = cli.run("head", config, warmup=1, timed=5, compare_plain=True)
    fx.check_result(self, result, "head", ["moco", "mochi", "moco_plain", "mochi_plain"])


if __name__ == "__main__":
  tf.test.main()
