"""Tests of tfmochi.benchmark.encoder (tiny sizes; never about speed)."""

import tensorflow as tf

import benchmark_fixtures as fx  # tests/benchmark_fixtures.py
from tfmochi import config as config_lib
from tfmochi.benchmark import cli
from tfmochi.benchmark import opprofile


class EncoderTest(tf.test.TestCase):

  def test_encoder_forward_and_backward_with_keras_layers_beside(self):
    config = config_lib.TrainConfig(**dict(fx.TINY, bn_mode="shuffle", fast_grad="true"))
    result = cli.run("encoder", config, warmup=1, timed=5, compare_keras_conv=True)
    fx.check_result(self, result, "encoder", ["forward", "forward_backward", "keras_forward",
                                              "keras_forward_backward"])
    self.assertTrue(result["config"]["fast_grad_resolved"])
    self.assertEqual(result["config"]["bn_mode"], "shuffle")  # plain BN, fused here

  def test_op_profile_of_both_calls(self):
    config = config_lib.TrainConfig(**dict(fx.TINY, fast_grad="true"))
    try:
      result = cli.run("encoder", config, warmup=1, timed=5, profile_calls=1)
    except opprofile.OpProfileUnavailable as e:
      self.skipTest(str(e))
    self.assertEqual(set(result["op_profile"]), {"forward", "forward_backward"})
    for name, profile in result["op_profile"].items():
      types = [t["type"] for t in profile["op_types"]]
      self.assertTrue(any("Conv2D" in t for t in types), (name, types))
    backward = [t["type"] for t in result["op_profile"]["forward_backward"]["op_types"]]
    self.assertTrue(any("BackpropFilter" in t for t in backward), backward)


if __name__ == "__main__":
  tf.test.main()
