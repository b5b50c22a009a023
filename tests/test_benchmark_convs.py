"""Tests of tfmochi.benchmark.convs (tiny sizes; never about speed)."""

import keras
import tensorflow as tf

import benchmark_fixtures as fx  # tests/benchmark_fixtures.py
from tfmochi import config as config_lib
from tfmochi import models
from tfmochi.benchmark import cli
from tfmochi.benchmark import convs


class ConvsTest(tf.test.TestCase):

  def test_every_convolution_of_the_backbone_is_timed_once_per_shape(self):
    config = config_lib.TrainConfig(**fx.TINY)
    result = cli.run("convs", config, warmup=1, timed=5)
    self.assertEqual(result["what"], "convs")
    backbone = models.build_backbone(config.arch, small_stem=config.small_stem)
    layers = [l for l in backbone.layers if isinstance(l, keras.layers.Conv2D)]
    shapes = result["shapes"]
    self.assertEqual(sum(s["layers"] for s in shapes), len(layers))
    self.assertLen({(tuple(s["input"]), s["filters"], tuple(s["kernel"]), s["stride"])
                    for s in shapes}, len(shapes))
    # resnet18, 3x3 stem at 16 px: the 16x16x3 stem, 3x3 convolutions at 16, 8, 4 and 2 px,
    # stride-2 ones between them, 1x1 stride-2 shortcuts.
    self.assertEqual(shapes[0]["input"], [config.batch_size, 16, 16, 3])
    self.assertEqual({s["path"] for s in shapes}, {"same", "strided", "pointwise"})
    for shape in shapes:
      expected = {"keras", "tfmochi"}
      if shape["path"] in ("same", "strided"):
        expected |= {"matmul_grads", "op_grads"}
      self.assertEqual(set(shape["ms"]), expected, shape)
      self.assertTrue(all(ms > 0 for ms in shape["ms"].values()), shape)
    for name in ("keras", "tfmochi"):
      self.assertAllClose(result["totals_ms"][name],
                          sum(s["ms"][name] * s["layers"] for s in shapes))
    self.assertEqual(result["small_map_pixels"], models.SMALL_MAP_PIXELS)

  def test_the_kernel_gradient_variants_take_their_paths(self):
    # A 4x4 float32 map: above float32's limit, so "tfmochi" uses TensorFlow's op; the forced
    # variants take one path each whatever the limit, also for a dtype without one (float16).
    shape = {"input": [2, 4, 4, 3], "filters": 5, "kernel": [3, 3], "stride": 1,
             "padding": "same", "path": "same", "layers": 1}
    keras.config.set_dtype_policy("mixed_float16")
    try:
      graph = convs._conv_fns(shape, seed=0)["matmul_grads"].get_concrete_function().graph
    finally:
      keras.config.set_dtype_policy("float32")
    self.assertNotIn("Conv2DBackpropFilter", self._op_types(graph.as_graph_def()))
    fns = convs._conv_fns(shape, seed=0)
    graphs = {name: fn.get_concrete_function().graph.as_graph_def() for name, fn in fns.items()}

    def op_types(name):
      return self._op_types(graphs[name])

    self.assertIn("Conv2DBackpropFilter", op_types("tfmochi"))
    self.assertIn("Conv2DBackpropFilter", op_types("op_grads"))
    self.assertNotIn("Conv2DBackpropFilter", op_types("matmul_grads"))
    grads = {name: fn() for name, fn in fns.items()}
    for name in ("tfmochi", "matmul_grads", "op_grads"):
      for got, want in zip(grads[name], grads["keras"]):
        self.assertAllClose(got, want, atol=1e-4, rtol=1e-4, msg=name)

  def test_a_strided_convolution_forces_both_gradients(self):
    # 9x9 to 4x4 at stride 2: above float32's limit (3x3), so "tfmochi" takes TensorFlow's ops.
    shape = {"input": [2, 9, 9, 3], "filters": 5, "kernel": [3, 3], "stride": 2,
             "padding": "valid", "path": "strided", "layers": 1}
    fns = convs._conv_fns(shape, seed=0)
    ops = {name: self._op_types(fn.get_concrete_function().graph.as_graph_def())
           for name, fn in fns.items()}
    backprops = {"Conv2DBackpropFilter", "Conv2DBackpropInput"}
    self.assertLessEqual(backprops, ops["tfmochi"])
    self.assertLessEqual(backprops, ops["op_grads"])
    self.assertFalse(backprops & ops["matmul_grads"])
    grads = {name: fn() for name, fn in fns.items()}
    for name in ("tfmochi", "matmul_grads", "op_grads"):
      for got, want in zip(grads[name], grads["keras"]):
        self.assertAllClose(got, want, atol=1e-4, rtol=1e-4, msg=name)

  @staticmethod
  def _op_types(graph_def):
    ops = {n.op for n in graph_def.node}
    for f in graph_def.library.function:
      ops |= {n.op for n in f.node_def}
    return ops


if __name__ == "__main__":
  tf.test.main()
