"""Tests of tfmochi.benchmark.encoder (tiny sizes; never about speed)."""

import tensorflow as tf

import benchmark_fixtures as fx  # tests/benchmark_fixtures.py
from tfmochi import config as config_lib
from tfmochi.benchmark import cli


class EncoderTest(tf.test.TestCase):

  def test_encoder_forward_and_backward_with_keras_layers_beside(self):
    config = config_lib.TrainConfig(**dict(fx.TINY, bn_mode="shuffle", fast_grad="true"))
    result = cli.run("encoder", config, warmup=1, timed=5, compare_keras_conv=True)
    fx.check_result(self, result, "encoder", ["forward", "forward_backward", "keras_forward",
                                              "keras_forward_backward"])
    self.assertTrue(result["config"]["fast_grad_resolved"])
    self.assertEqual(result["config"]["bn_mode"], "shuffle")  # plain BN, fused here


if __name__ == "__main__":
  tf.test.main()
