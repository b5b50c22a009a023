"""`--what=convs`: each convolution of the run's backbone alone, tfmochi's kernels against Keras's.

For every distinct convolution of the flags' architecture at --image_size and --batch_size (input
shape, filters, kernel, stride, padding; with the number of layers that share it) this times its
forward and both gradients, interleaved: as plain `keras.layers.Conv2D` ("keras"), as tfmochi's
`models.Conv2D` trains it ("tfmochi") and, where `models.SMALL_MAP_PIXELS` decides how the
gradients are computed (the kernel gradient of 3x3 and larger kernels, and the input gradient of
strided ones), with them always as matmuls ("matmul_grads") and always as TensorFlow's ops
("op_grads"). Those limits were measured on one machine kind; this is how to check them, and
`--fast_grad=auto`, on another. Compute dtype: --mixed_precision.
"""

from __future__ import annotations

import statistics

import keras
import tensorflow as tf

from tfmochi import build
from tfmochi import config as config_lib
from tfmochi import models
from tfmochi.benchmark import timing

_UNLIMITED = 1 << 62


def conv_shapes(config: config_lib.TrainConfig) -> list[dict]:
  """The distinct convolutions of the run's backbone, in order of first use.

  Returns:
    [{"input": [B, H, W, Cin], "filters", "kernel": [kh, kw], "stride", "padding", "layers": how
    many of the backbone's convolutions have these settings, "path": `models.Conv2D`'s path}].
  """
  backbone = models.build_backbone(config.arch, small_stem=config.small_stem, fast_grad=True)
  convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
  probe = keras.Model(backbone.inputs, [layer.input for layer in convs])
  inputs = probe(tf.zeros([1, config.image_size, config.image_size, 3]))
  shapes = {}
  for layer, x in zip(convs, inputs):
    key = (tuple(x.shape[1:]), layer.filters, tuple(layer.kernel_size), layer.strides[0],
           layer.padding)
    if key not in shapes:
      shapes[key] = {"input": [config.batch_size, *key[0]], "filters": key[1],
                     "kernel": list(key[2]), "stride": key[3], "padding": key[4], "layers": 0,
                     "path": layer._fast_grad_path() or "keras"}  # pylint: disable=protected-access
    shapes[key]["layers"] += 1
  return list(shapes.values())


def _conv_fns(shape: dict, seed: int) -> dict:
  """{variant: callable} running one convolution's forward and both gradients."""
  dtype = keras.config.dtype_policy().compute_dtype
  x = tf.cast(tf.random.stateless_normal(shape["input"], [seed, 1]), dtype)
  kwargs = dict(filters=shape["filters"], kernel_size=shape["kernel"], strides=shape["stride"],
                padding=shape["padding"], use_bias=False)
  plain, fast = keras.layers.Conv2D(**kwargs), models.Conv2D(**kwargs)
  dy = tf.cast(tf.random.stateless_normal(plain.compute_output_shape(x.shape), [seed, 2]), dtype)
  plain.build(x.shape)
  fast.build(x.shape)
  fast.set_weights(plain.get_weights())

  def traced(layer, limit=None):
    @tf.function
    def step():
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
      return tape.gradient(y, [x, layer.kernel], output_gradients=dy)

    with models.small_map_pixels({} if limit is None else {dtype: limit}):
      step.get_concrete_function()  # traced now, under this limit
    return step

  fns = {"keras": traced(plain), "tfmochi": traced(fast)}
  if shape["path"] in ("same", "strided"):
    fns["matmul_grads"] = traced(fast, _UNLIMITED)
    fns["op_grads"] = traced(fast, 0)
  return fns


def bench_convs(config: config_lib.TrainConfig, *, warmup: int = 2, timed: int = 5) -> dict:
  """Times every distinct convolution (see the module docstring).

  Returns:
    {"what": "convs", "shapes": conv_shapes' dicts each with "ms": {variant: median ms per call},
    "totals_ms": {"keras", "tfmochi": sum over the backbone's convolutions (ms x layers)},
    "config": ...}.
  """
  build.set_precision(config.mixed_precision, config.tf32)  # as the trainer
  shapes = conv_shapes(config)
  totals = {"keras": 0.0, "tfmochi": 0.0}
  for i, shape in enumerate(shapes):
    results = timing.run_interleaved(_conv_fns(shape, config.seed + i), warmup=warmup,
                                     timed=timed, tensorflow_memory=False)
    shape["ms"] = {name: 1e3 * statistics.median(r.seconds_per_step)
                   for name, r in results.items()}
    for name in totals:
      totals[name] += shape["ms"][name] * shape["layers"]
  out = {"what": "convs", "shapes": shapes, "totals_ms": totals,
         "small_map_pixels": dict(models.SMALL_MAP_PIXELS)}
  out["config"] = {k: getattr(config, k) for k in (
      "arch", "small_stem", "image_size", "batch_size", "mixed_precision")}
  return out
