"""Tests of tfmochi.benchmark.step (tiny sizes; never about speed)."""

import tensorflow as tf

import benchmark_fixtures as fx  # tests/fx.py
from tfmochi import config as config_lib
from tfmochi.benchmark import cli


class StepTest(tf.test.TestCase):

  def test_step(self):
    # Plain MoCo only: tracing a ResNet training step is what costs time here (the MoCo-vs-MoCHi
    # comparison is checked by the head test, MoCHi steps by tests/test_moco.py).
    config = config_lib.TrainConfig(**dict(fx.TINY, mochi_num_hard=0, mochi_num_mix=0,
                                            mochi_num_query_mix=0))
    result = cli.run("step", config, warmup=1, timed=5, steps_per_call=2,
                           compare_keras_conv=True)
    fx.check_result(self, result, "step", ["moco", "moco_keras_conv"])
    self.assertEqual(result["config"]["steps_per_call"], 2)
    self.assertEqual(result["tracing_count"], {"moco": 1, "moco_keras_conv": 1})
    self.assertGreater(result["ratio_keras_conv_over_fast"], 0)


if __name__ == "__main__":
  tf.test.main()
