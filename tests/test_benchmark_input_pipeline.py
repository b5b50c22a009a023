"""Tests of tfmochi.benchmark.input_pipeline (tiny sizes; never about speed)."""

import tensorflow as tf

import benchmark_fixtures as fx  # tests/fx.py
from tfmochi import config as config_lib
from tfmochi.benchmark import cli
from tfmochi.benchmark import input_pipeline


class InputPipelineTest(tf.test.TestCase):

  def test_input_pipeline(self):
    config = config_lib.TrainConfig(**dict(fx.TINY, image_size=8))
    source = input_pipeline.synthetic_source(8, 12)
    result = cli.run("input", config, warmup=1, timed=5, source=source)
    fx.check_result(self, result, "input", ["input"])
    self.assertEqual(result["config"]["source_examples"], 8)


if __name__ == "__main__":
  tf.test.main()
