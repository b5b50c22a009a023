"""Tests for tfmochi.models: ResNet layout, BN modes, head, encoder, weight copy, name mapping.

Models are tiny-input and cached per (arch, stem) so resnet50 is built twice at most. The
torchvision semantics are checked against an independent NumPy (NCHW, float64) port of
torchvision's ResNet forward that reads the weights by their torchvision names.
"""

from __future__ import annotations

import functools
import math
import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfmochi import distribute
from tfmochi import models
from tfmochi import weightmaps

_EXPECTED_PARAMS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}


@functools.lru_cache(maxsize=None)
def _cached_backbone(arch: str, small_stem: bool = False) -> keras.Model:
  """Shared backbones for read-only tests (weights may be overwritten by the NumPy check)."""
  return models.build_backbone(arch, small_stem=small_stem)


def _num_params(model: keras.Model) -> int:
  return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _randomise_bn(backbone: keras.Model, seed: int) -> None:
  """Non-trivial BN weights and moving statistics, so that BN is not the identity."""
  rng = np.random.default_rng(seed)
  state = weightmaps.torchvision_state_dict(backbone)
  for key, value in state.items():
    if key.endswith((".weight",)) and value.ndim == 1:
      state[key] = rng.uniform(0.5, 1.5, value.shape)
    elif key.endswith((".bias", ".running_mean")):
      state[key] = rng.normal(0.0, 0.1, value.shape)
    elif key.endswith(".running_var"):
      state[key] = rng.uniform(0.5, 1.5, value.shape)
  weightmaps.load_torchvision_state_dict(backbone, state)


# ------------------------------------------------------------------------------------------------
# NumPy reference of torchvision's ResNet (eval mode), NCHW, float64.


def _np_conv(x, w, stride, pad):
  """PyTorch Conv2d(bias=False, padding=pad): x [N, C, H, W], w [O, C, kh, kw]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  _, _, h, wd = x.shape
  _, _, kh, kw = w.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  cols = np.stack([np.stack([x[:, :, a:a + stride * oh:stride, b:b + stride * ow:stride]
                             for b in range(kw)], axis=2) for a in range(kh)], axis=2)
  # cols [N, C, kh, kw, oh, ow] . w [O, C, kh, kw] -> [N, oh, ow, O]
  return np.tensordot(cols, w, axes=([1, 2, 3], [1, 2, 3])).transpose(0, 3, 1, 2)


def _np_bn(x, sd, prefix, eps=1e-5):
  shape = (1, -1, 1, 1)
  scale = sd[f"{prefix}.weight"] / np.sqrt(sd[f"{prefix}.running_var"] + eps)
  return ((x - sd[f"{prefix}.running_mean"].reshape(shape)) * scale.reshape(shape)
          + sd[f"{prefix}.bias"].reshape(shape))


def _np_maxpool_3x3_s2_p1(x):
  """PyTorch MaxPool2d(3, 2, padding=1): pads with -inf."""
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  _, _, h, w = x.shape
  oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
  return np.max(np.stack([x[:, :, a:a + 2 * oh:2, b:b + 2 * ow:2]
                          for a in range(3) for b in range(3)]), axis=0)


def _np_stem(x, sd):
  """conv1 -> bn1 -> relu (-> maxpool unless the CIFAR stem). x [N, 3, H, W]."""
  small = sd["conv1.weight"].shape[-1] == 3
  y = _np_conv(x, sd["conv1.weight"], 1 if small else 2, 1 if small else 3)
  y = np.maximum(_np_bn(y, sd, "bn1"), 0)
  return y if small else _np_maxpool_3x3_s2_p1(y)


def _np_resnet(x, sd):
  """torchvision ResNet forward without fc; returns {"C2".."C5", "pooled"} in NHWC."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  y = _np_stem(x, sd)
  out = {}
  for stage in range(1, 5):
    b = 0
    while f"layer{stage}.{b}.conv1.weight" in sd:
      p = f"layer{stage}.{b}"
      stride = 2 if (stage > 1 and b == 0) else 1
      if f"{p}.conv3.weight" in sd:  # Bottleneck (v1.5: stride on conv2).
        z = np.maximum(_np_bn(_np_conv(y, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1"), 0)
        z = np.maximum(_np_bn(_np_conv(z, sd[f"{p}.conv2.weight"], stride, 1), sd, f"{p}.bn2"), 0)
        z = _np_bn(_np_conv(z, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
      else:  # BasicBlock.
        z = np.maximum(_np_bn(_np_conv(y, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"), 0)
        z = _np_bn(_np_conv(z, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
      if f"{p}.downsample.0.weight" in sd:
        y = _np_bn(_np_conv(y, sd[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1")
      y = np.maximum(z + y, 0)
      b += 1
    out[f"C{stage + 1}"] = y.transpose(0, 2, 3, 1)
  out["pooled"] = y.mean(axis=(2, 3))
  return out


def _torchvision_keys(arch: str) -> list[str]:
  """torchvision's state_dict keys (no fc, no num_batches_tracked), written out independently."""
  bn = ["weight", "bias", "running_mean", "running_var"]
  keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
  bottleneck = arch == "resnet50"
  depths = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}[arch]
  for stage, depth in enumerate(depths, start=1):
    for b in range(depth):
      p = f"layer{stage}.{b}"
      for i in range(1, 4 if bottleneck else 3):
        keys += [f"{p}.conv{i}.weight"] + [f"{p}.bn{i}.{s}" for s in bn]
      if b == 0 and (stage > 1 or bottleneck):
        keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{s}" for s in bn]
  return keys


def _ceil_halvings(n: int, times: int) -> int:
  for _ in range(times):
    n = math.ceil(n / 2)
  return n


# ------------------------------------------------------------------------------------------------


class BackboneTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(arch=models.ARCHS, small_stem=[False, True])
  def test_output_shapes_with_dynamic_size(self, arch, small_stem):
    backbone = _cached_backbone(arch, small_stem)
    self.assertEqual(backbone.input.shape, (None, None, None, 3))
    c = 4 if arch == "resnet50" else 1
    widths = {"C2": 64 * c, "C3": 128 * c, "C4": 256 * c, "C5": 512 * c}
    halvings = {"C2": 0, "C3": 1, "C4": 2, "C5": 3} if small_stem else {
        "C2": 2, "C3": 3, "C4": 4, "C5": 5}
    sizes = [(16, 24), (9, 8)] if small_stem else [(64, 48), (37, 45)]
    for h, w in sizes:  # Two different sizes through the same model.
      out = backbone(np.zeros((2, h, w, 3), np.float32))
      self.assertEqual(set(out), {"C2", "C3", "C4", "C5", "pooled"})
      for level, k in halvings.items():
        self.assertEqual(tuple(out[level].shape),
                         (2, _ceil_halvings(h, k), _ceil_halvings(w, k), widths[level]))
      self.assertEqual(tuple(out["pooled"].shape), (2, models.feature_dim(arch)))

  @parameterized.parameters(*models.ARCHS)
  def test_param_count_matches_torchvision(self, arch):
    self.assertEqual(_num_params(_cached_backbone(arch)), _EXPECTED_PARAMS[arch])

  def test_smoke_arch_is_a_narrow_resnet10_with_the_same_layout(self):
    # resnet10_tiny (tests and smoke runs): one basic block per stage, widths 16-128, the same
    # layer names as resnet18, so every trainer / evaluation code path runs on it.
    backbone = models.build_backbone("resnet10_tiny", small_stem=True)
    out = backbone(np.zeros((2, 8, 8, 3), np.float32))
    self.assertEqual({k: tuple(v.shape) for k, v in out.items()},
                     {"C2": (2, 8, 8, 16), "C3": (2, 4, 4, 32), "C4": (2, 2, 2, 64),
                      "C5": (2, 1, 1, 128), "pooled": (2, 128)})
    self.assertEqual(models.feature_dim("resnet10_tiny"), 128)
    self.assertNotIn("resnet10_tiny", models.ARCHS)  # not a torchvision arch: not exportable
    names = {layer.name for layer in backbone.layers}
    self.assertLessEqual(names, {layer.name for layer in _cached_backbone("resnet18", True).layers})
    self.assertLess(_num_params(backbone), _EXPECTED_PARAMS["resnet18"] // 30)

  def test_feature_dim_and_unknown_arch(self):
    self.assertEqual([models.feature_dim(a) for a in models.ARCHS], [512, 512, 2048])
    with self.assertRaisesRegex(ValueError, "resnet18.*resnet34.*resnet50"):
      models.build_backbone("resnet101")
    with self.assertRaisesRegex(ValueError, "resnet50"):
      models.feature_dim("vit")
    with self.assertRaisesRegex(ValueError, "standard.*sync.*split"):
      models.build_backbone("resnet18", bn_mode="ghost")

  def test_layer_names_and_layout(self):
    backbone = _cached_backbone("resnet50")
    for name in ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.downsample.0",
                 "layer1.0.downsample.1", "layer4.2.conv3", "layer4.2.bn3"]:
      backbone.get_layer(name)  # Raises if absent.
    convs = [l for l in backbone.layers if isinstance(l, keras.layers.Conv2D)]
    bns = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    self.assertFalse(any(l.use_bias for l in convs))
    self.assertTrue(all(l.epsilon == 1e-5 and l.momentum == 0.9 for l in bns))
    # v1.5: the stride sits on the 3x3 conv of the bottleneck.
    self.assertEqual(backbone.get_layer("layer2.0.conv1").strides, (1, 1))
    self.assertEqual(backbone.get_layer("layer2.0.conv2").strides, (2, 2))
    self.assertEqual(backbone.get_layer("layer2.0.downsample.0").strides, (2, 2))
    # BN is not zero-initialised at the end of blocks.
    self.assertAllEqual(backbone.get_layer("layer1.0.bn3").gamma.numpy(), np.ones(256))

  def test_stem_padding_matches_pytorch(self):
    backbone = _cached_backbone("resnet18")
    _randomise_bn(backbone, seed=0)
    stem = keras.Model(backbone.input, backbone.get_layer("maxpool").output)
    sd = weightmaps.torchvision_state_dict(backbone)
    rng = np.random.default_rng(1)
    for h, w in [(13, 16), (16, 11)]:  # Odd and even sizes: TF "same" would differ here.
      x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
      want = _np_stem(x.transpose(0, 3, 1, 2).astype(np.float64),
                      {k: v.astype(np.float64) for k, v in sd.items()}).transpose(0, 2, 3, 1)
      self.assertAllClose(stem(x), want, atol=1e-4, rtol=1e-4)

  @parameterized.parameters(("resnet18", False, (45, 37)), ("resnet18", True, (11, 14)),
                            ("resnet50", False, (45, 37)))
  def test_forward_matches_numpy_torchvision_reference(self, arch, small_stem, size):
    backbone = _cached_backbone(arch, small_stem)
    _randomise_bn(backbone, seed=2)
    x = np.random.default_rng(3).normal(size=(2, *size, 3)).astype(np.float32)
    got = backbone(x, training=False)
    want = _np_resnet(x.transpose(0, 3, 1, 2).astype(np.float64),
                      weightmaps.torchvision_state_dict(backbone))
    for level in ["C2", "C3", "C4", "C5", "pooled"]:
      scale = np.abs(want[level]).max()
      self.assertAllClose(got[level], want[level], atol=1e-4 * scale, rtol=1e-4, msg=level)


class FastGradConvTest(tf.test.TestCase, parameterized.TestCase):
  """models.Conv2D: keras Conv2D's outputs and gradients, 1x1 kernels as matmuls and the input
  gradient of stride-1 "same" ones as a convolution."""

  def _pair(self, kernel, stride, channels=(6, 5), padding=None):
    x = keras.Input((None, None, channels[0]))
    padding = padding or ("same" if stride == 1 else "valid")
    layers = [cls(channels[1], kernel, strides=stride, padding=padding, use_bias=False)
              for cls in (models.Conv2D, keras.layers.Conv2D)]
    for layer in layers:
      layer(x)
    layers[0].set_weights(layers[1].get_weights())
    return layers

  @parameterized.parameters((1, 1, "same", "pointwise"), (1, 1, "valid", "pointwise"),
                            (3, 1, "same", "same"), (7, 1, "same", "same"),
                            (1, 2, "valid", "pointwise"), (1, 3, "valid", "pointwise"),
                            (1, 2, "same", "pointwise"), (3, 2, "valid", "strided"),
                            (7, 2, "valid", "strided"), (3, 1, "valid", None),
                            (3, 2, "same", None))
  def test_values_and_gradients_equal_keras_conv(self, kernel, stride, padding, path):
    fast, plain = self._pair(kernel, stride, padding=padding)
    self.assertEqual(fast._fast_grad_path(), path)
    # Odd and even sizes: a strided conv's last rows/columns may be read or skipped.
    x = tf.constant(np.random.default_rng(kernel).normal(size=(3, 9, 8, 6)), tf.float32)
    self._check_against_keras(fast, plain, x)

  @parameterized.parameters((3, 1, (3, 5, 7, 6), True), ((3, 5), 1, (2, 4, 4, 6), True),
                            (3, 1, (2, 8, 8, 6), True), (3, 1, (2, 9, 8, 6), False),
                            (3, 2, (2, 9, 8, 6), True), (3, 2, (2, 8, 7, 6), True),
                            (3, 3, (2, 11, 10, 6), True), (3, 2, (2, 19, 17, 6), False))
  def test_small_maps_take_the_kernel_gradient_as_matmuls(self, kernel, stride, shape, small):
    fast, plain = self._pair(kernel, stride)
    x = tf.constant(np.random.default_rng(7).normal(size=shape), tf.float32)
    # bfloat16's limit (8x8) on float32 numbers, which can be compared at 1e-4.
    with mock.patch.dict(models.SMALL_MAP_PIXELS, {"float32": 64}), \
         mock.patch.object(models, "_kernel_grad_as_matmuls",
                           wraps=models._kernel_grad_as_matmuls) as spy, \
         mock.patch.object(models, "_input_grad_as_matmul",
                           wraps=models._input_grad_as_matmul) as input_spy:
      self._check_against_keras(fast, plain, x)
    self.assertEqual(spy.called, small)  # output H'·W' <= 64
    # Strided ones take their input gradient as a matmul too (the "same" path's is a conv).
    self.assertEqual(input_spy.called, small and stride > 1)

  @parameterized.parameters(((2, 8, 8, 4), 3, 2), ((2, 9, 8, 4), 3, 2), ((2, 7, 10, 4), 3, 3),
                            ((2, 6, 6, 4), 2, 2), ((2, 9, 9, 4), 5, 2), ((2, 12, 11, 4), 3, 4),
                            ((1, 3, 3, 4), 3, 2))
  def test_input_grad_as_matmul_equals_tensorflows(self, shape, kernel_size, stride):
    # Kernels smaller than, equal to and larger than the stride (phases without taps: zeros),
    # inputs with rows and columns that no output reads, a 1x1 output.
    rng = np.random.default_rng(stride * kernel_size)
    x = tf.constant(rng.normal(size=shape), tf.float32)
    kernel = tf.constant(rng.normal(size=(kernel_size, kernel_size, 4, 3)), tf.float32)
    dy = tf.constant(rng.normal(size=tf.nn.conv2d(x, kernel, stride, "VALID").shape), tf.float32)
    want = tf.raw_ops.Conv2DBackpropInput(input_sizes=shape, filter=kernel, out_backprop=dy,
                                          strides=[1, stride, stride, 1], padding="VALID")
    fn = lambda dy: models._input_grad_as_matmul(dy, kernel, shape[1], shape[2], stride)  # noqa: E731
    for name, run in {"eager": fn, "tf.function": tf.function(fn),
                      "xla": tf.function(fn, jit_compile=True)}.items():
      self.assertAllClose(run(dy), want, atol=1e-4, rtol=1e-4, msg=name)

  def test_small_map_pixels_overrides_inside_its_block_only(self):
    before = dict(models.SMALL_MAP_PIXELS)
    with models.small_map_pixels({"float32": 0, "float16": 16}):
      self.assertEqual(models.SMALL_MAP_PIXELS, {**before, "float32": 0, "float16": 16})
    self.assertEqual(models.SMALL_MAP_PIXELS, before)

  @parameterized.parameters(("float32", 1, 3, True), ("float32", 1, 4, False),
                            ("float32", 2, 8, True), ("bfloat16", 1, 8, True),
                            ("bfloat16", 1, 9, False), ("float16", 1, 2, False))
  def test_small_map_limit_by_dtype(self, dtype, stride, size, small):
    x = tf.zeros([1, size, size, 2], dtype)
    kernel = tf.zeros([3, 3, 2, 2], dtype)
    conv = models._conv_input_grad_as_conv if stride == 1 else (
        lambda x, kernel: models._strided_conv(x, kernel, stride))
    with mock.patch.object(models, "_kernel_grad_as_matmuls",
                           wraps=models._kernel_grad_as_matmuls) as spy:
      with tf.GradientTape() as tape:
        tape.watch(kernel)
        y = conv(x, kernel)
      tape.gradient(y, kernel)
    self.assertEqual(spy.called, small)

  def _check_against_keras(self, fast, plain, x):
    """Output, input gradient and kernel gradient of `fast` equal `plain`'s: eager, tf.function
    and XLA."""

    def loss_and_grads(layer, x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.sin(y))  # a non-trivial output gradient
      return (y,) + tuple(tape.gradient(loss, [x, layer.kernel]))

    want = loss_and_grads(plain, x)
    runs = {"eager": lambda x: loss_and_grads(fast, x),
            "tf.function": tf.function(lambda x: loss_and_grads(fast, x)),
            "xla": tf.function(lambda x: loss_and_grads(fast, x), jit_compile=True)}
    for name, fn in runs.items():
      for got, ref in zip(fn(x), want):
        self.assertAllClose(got, ref, atol=1e-4, rtol=1e-4, msg=name)

  @parameterized.parameters((3, 1), (1, 1), (1, 2))
  def test_bfloat16_policy(self, kernel, stride):
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
      fast, plain = self._pair(kernel, stride)
    finally:
      keras.config.set_dtype_policy("float32")
    x = tf.cast(tf.random.stateless_normal([2, 4, 4, 6], [1, 2]), tf.bfloat16)
    results = []
    for layer in (fast, plain):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
      results.append((y,) + tuple(tape.gradient(loss, [x, layer.kernel])))
    for got, want in zip(*results):
      self.assertEqual(got.dtype, want.dtype)
      self.assertAllClose(tf.cast(got, tf.float32), tf.cast(want, tf.float32), atol=0.1, rtol=0.05)

  def test_backbone_uses_it_unless_asked_not_to(self):
    fast = models.build_backbone("resnet18", small_stem=True)
    plain = models.build_backbone("resnet18", small_stem=True, fast_grad=False)
    self.assertIsInstance(fast.get_layer("layer4.1.conv2"), models.Conv2D)
    self.assertIs(type(plain.get_layer("layer4.1.conv2")), keras.layers.Conv2D)
    # Standard BN trains with the fused kernel alongside (FusedBatchNormTest); sync BN stays Keras's.
    self.assertIsInstance(fast.get_layer("layer4.1.bn2"), models.FusedBatchNorm)
    self.assertIs(type(plain.get_layer("layer4.1.bn2")), keras.layers.BatchNormalization)
    self.assertEqual([w.path for w in fast.weights], [w.path for w in plain.weights])
    sync = models.build_backbone("resnet18", small_stem=True, bn_mode="sync")
    self.assertIs(type(sync.get_layer("bn1")), keras.layers.BatchNormalization)


class SplitBatchNormTest(tf.test.TestCase):

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  def _layer(self, cls, x, seed=0, **kwargs):
    """A built BN layer with random gamma/beta/moving stats."""
    layer = cls(momentum=0.9, epsilon=1e-5, **kwargs)
    layer.build(x.shape)
    rng = np.random.default_rng(seed)
    c = x.shape[-1]
    layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=c),
                       rng.uniform(0.5, 1.5, c)])
    return layer

  def test_training_matches_numpy_groups(self):
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 3, 5, 4)).astype(np.float32)
    layer = self._layer(models.SplitBatchNorm, x, num_splits=4)
    gamma, beta, mm0, mv0 = [w.numpy() for w in layer.weights]
    y = layer(x, training=True)
    groups = x.astype(np.float64).reshape(4, 2, 3, 5, 4)  # Contiguous groups of 2 samples.
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = groups.var(axis=(1, 2, 3), keepdims=True)
    want = ((groups - mean) / np.sqrt(var + 1e-5) * gamma + beta).reshape(x.shape)
    self.assertAllClose(y, want, atol=1e-5, rtol=1e-5)
    self.assertAllClose(layer.moving_mean, 0.9 * mm0 + 0.1 * mean.reshape(4, 4).mean(0),
                        atol=1e-6, rtol=1e-6)
    self.assertAllClose(layer.moving_variance, 0.9 * mv0 + 0.1 * var.reshape(4, 4).mean(0),
                        atol=1e-6, rtol=1e-6)

  def test_one_split_equals_standard_bn(self):
    x = np.random.default_rng(1).normal(1.0, 2.0, size=(6, 4, 4, 5)).astype(np.float32)
    split = self._layer(models.SplitBatchNorm, x, num_splits=1)
    standard = self._layer(keras.layers.BatchNormalization, x)
    self.assertAllClose(split(x, training=True), standard(x, training=True), atol=1e-5)
    for a, b in zip(split.weights, standard.weights):
      self.assertAllClose(a, b, atol=1e-6, rtol=1e-6)

  def test_inference_equals_standard_bn(self):
    x = np.random.default_rng(2).normal(size=(3, 2, 2, 5)).astype(np.float32)
    split = self._layer(models.SplitBatchNorm, x, num_splits=4)  # 3 % 4 != 0 is fine here.
    standard = self._layer(keras.layers.BatchNormalization, x)
    self.assertAllEqual(split(x, training=False), standard(x, training=False))
    self.assertAllEqual(split.moving_mean, standard.moving_mean)

  def test_indivisible_batch_raises(self):
    x = np.zeros((6, 2, 2, 3), np.float32)
    layer = models.SplitBatchNorm(num_splits=4)
    with self.assertRaisesRegex(ValueError, "divisible by num_splits=4; got batch size 6"):
      layer(x, training=True)
    # Unknown batch size at trace time: checked when the graph runs.
    fn = tf.function(lambda t: layer(t, training=True),
                     input_signature=[tf.TensorSpec([None, 2, 2, 3], tf.float32)])
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "divisible"):
      fn(x)
    self.assertEqual(fn(np.ones((8, 2, 2, 3), np.float32)).shape, (8, 2, 2, 3))

  def test_weights_layout_identical_to_standard_bn(self):
    split = models.make_batch_norm("bn", "split", 2)
    standard = models.make_batch_norm("bn", "standard")
    self.assertIsInstance(split, keras.layers.BatchNormalization)
    split.build((None, 4, 4, 7))
    standard.build((None, 4, 4, 7))
    describe = lambda layer: [(w.path, tuple(w.shape), w.trainable) for w in layer.weights]
    self.assertEqual(describe(split), describe(standard))
    restored = models.SplitBatchNorm.from_config(split.get_config())
    self.assertEqual(restored.num_splits, 2)
    with self.assertRaisesRegex(ValueError, "standard.*sync.*split"):
      models.make_batch_norm("bn", "batch")

  def test_float32_statistics_under_mixed_precision(self):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    x = np.random.default_rng(3).normal(100.0, 1.0, size=(4, 3, 3, 2))
    x_bf16 = tf.cast(x, tf.bfloat16)
    layer = models.SplitBatchNorm(num_splits=2, momentum=0.0, epsilon=1e-5)
    y = layer(x_bf16, training=True)
    self.assertEqual(y.dtype, tf.bfloat16)
    self.assertEqual(layer.moving_mean.dtype, "float32")
    xr = tf.cast(x_bf16, tf.float64).numpy().reshape(2, 2, 3, 3, 2)
    # momentum=0: the moving stats are the group averages; float32-exact, far tighter than the
    # ~0.4 resolution bfloat16 has around 100.
    self.assertAllClose(layer.moving_mean, xr.mean(axis=(1, 2, 3)).mean(0), atol=1e-4)
    self.assertAllClose(layer.moving_variance, xr.var(axis=(1, 2, 3)).mean(0), rtol=1e-4)
    want = (xr - xr.mean(axis=(1, 2, 3), keepdims=True)) / np.sqrt(
        xr.var(axis=(1, 2, 3), keepdims=True) + 1e-5)
    self.assertAllClose(tf.cast(y, tf.float32), want.reshape(x.shape), atol=0.05)

  def test_split_backbone_trains_and_checks_batch(self):
    backbone = models.build_backbone("resnet18", small_stem=True, bn_mode="split", bn_splits=4)
    self.assertIsInstance(backbone.get_layer("layer3.0.downsample.1"), models.SplitBatchNorm)
    out = backbone(np.random.default_rng(4).normal(size=(8, 8, 8, 3)), training=True)
    self.assertEqual(tuple(out["pooled"].shape), (8, 512))
    self.assertNotAllClose(backbone.get_layer("bn1").moving_mean, np.zeros(64))
    with self.assertRaisesRegex(ValueError, "divisible"):
      backbone(np.zeros((6, 8, 8, 3), np.float32), training=True)


class FusedBatchNormTest(tf.test.TestCase, parameterized.TestCase):

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  def _pair(self, x):
    """A FusedBatchNorm and a Keras BN with the same random gamma, beta and moving statistics."""
    rng = np.random.default_rng(5)
    c = x.shape[-1]
    weights = [rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=c),
               rng.uniform(0.5, 1.5, c)]
    layers = []
    for cls in (models.FusedBatchNorm, keras.layers.BatchNormalization):
      layer = cls(momentum=0.9, epsilon=1e-5)
      layer.build(x.shape)
      layer.set_weights(weights)
      layers.append(layer)
    return layers

  def _train_call(self, layer, x, compiled):
    def fn(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2 * tf.range(1.0, 1.0 + y.shape[-1]))
      return [y] + tape.gradient(loss, [x] + layer.trainable_weights)
    return (tf.function(fn) if compiled else fn)(x)

  @parameterized.parameters(False, True)
  def test_training_equals_keras_bn(self, compiled):
    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, size=(6, 5, 4, 3)), tf.float32)
    fused, plain = self._pair(x)
    got, want = self._train_call(fused, x, compiled), self._train_call(plain, x, compiled)
    for g, w in zip(got, want):  # outputs, d/dx, d/dgamma, d/dbeta
      self.assertAllClose(g, w, atol=1e-4, rtol=1e-4)
    # The moving variance follows the biased batch variance, as Keras's: 0.9·v + 0.1·var.
    self.assertAllClose(fused.moving_mean, plain.moving_mean, atol=1e-6)
    self.assertAllClose(fused.moving_variance, plain.moving_variance, atol=1e-6)

  def test_inference_and_other_ranks_take_keras_path(self):
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 3, 3, 2)), tf.float32)
    fused, plain = self._pair(x)
    self.assertAllClose(fused(x, training=False), plain(x, training=False))
    flat = tf.constant(np.random.default_rng(2).normal(size=(8, 2)), tf.float32)
    fused, plain = self._pair(flat)
    self.assertAllClose(fused(flat, training=True), plain(flat, training=True), atol=1e-5)
    self.assertAllClose(fused.moving_variance, plain.moving_variance)

  def test_bfloat16_keeps_the_dtype_with_float32_statistics(self):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    x = tf.cast(np.random.default_rng(3).normal(100.0, 1.0, size=(4, 3, 3, 2)), tf.bfloat16)
    fused, plain = self._pair(x)
    y, y_plain = fused(x, training=True), plain(x, training=True)
    self.assertEqual(y.dtype, tf.bfloat16)
    self.assertEqual(fused.moving_mean.dtype, "float32")
    # float32 statistics of bfloat16 inputs: far tighter than bfloat16's ~0.4 step around 100.
    self.assertAllClose(fused.moving_mean, plain.moving_mean, atol=1e-4)
    self.assertAllClose(fused.moving_variance, plain.moving_variance, rtol=1e-3)
    self.assertAllClose(tf.cast(y, tf.float32), tf.cast(y_plain, tf.float32), atol=0.05)


class SyncBatchNormTest(tf.test.TestCase):

  def test_moving_stats_identical_across_replicas(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
      backbone = models.build_backbone("resnet18", small_stem=True, bn_mode="sync")
    self.assertTrue(backbone.get_layer("layer4.1.bn2").synchronized)
    rng = np.random.default_rng(5)
    xs = [rng.normal(i, 1.0 + i, size=(2, 8, 8, 3)).astype(np.float32) for i in range(2)]
    dist_x = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(xs[ctx.replica_id_in_sync_group]))

    @tf.function
    def step(x):
      return strategy.run(lambda t: backbone(t, training=True)["pooled"], args=(x,))

    pooled = strategy.experimental_local_results(step(dist_x))
    self.assertEqual([tuple(p.shape) for p in pooled], [(2, 512), (2, 512)])
    for name in ["bn1", "layer2.0.downsample.1", "layer4.1.bn2"]:
      bn = backbone.get_layer(name)
      for var in (bn.moving_mean, bn.moving_variance):
        copies = strategy.experimental_local_results(var.value)
        self.assertLen(copies, 2)
        self.assertAllClose(copies[0], copies[1], atol=1e-6, rtol=1e-6)
    # The statistics are those of the global batch of 4 images, not of one replica's 2.
    conv1 = keras.Model(backbone.input, backbone.get_layer("conv1").output)
    global_mean = conv1(np.concatenate(xs)).numpy().mean(axis=(0, 1, 2))
    self.assertAllClose(backbone.get_layer("bn1").moving_mean, 0.1 * global_mean,
                        atol=1e-5, rtol=1e-4)


class HeadAndEncoderTest(tf.test.TestCase, parameterized.TestCase):

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  @parameterized.parameters(True, False)
  def test_head_shapes(self, mlp):
    head = models.build_projection_head(32, embedding_dim=8, mlp=mlp)
    shapes = [tuple(w.shape) for w in head.weights]
    want = [(32, 32), (32,), (32, 8), (8,)] if mlp else [(32, 8), (8,)]
    self.assertEqual(shapes, want)
    self.assertEqual(tuple(head(np.ones((3, 32), np.float32)).shape), (3, 8))
    self.assertFalse(any(isinstance(l, keras.layers.BatchNormalization) for l in head.layers))

  @parameterized.parameters(("standard", True), ("split", True), ("split", False))
  def test_head_bn(self, bn_mode, mlp):
    head = models.build_projection_head(32, embedding_dim=8, mlp=mlp, bn=True, bn_mode=bn_mode,
                                        bn_splits=2)
    # MoCo v3's layout: Linear(no bias)-BN-ReLU-Linear(no bias)-BN(no affine).
    names = [l.name for l in head.layers[2:]]
    self.assertEqual(names, ["fc.0", "fc.1", "fc.2", "fc.3", "fc.4"] if mlp else ["fc", "fc_bn"])
    norms = [l for l in head.layers if isinstance(l, keras.layers.BatchNormalization)]
    self.assertLen(norms, 2 if mlp else 1)
    want = models.SplitBatchNorm if bn_mode == "split" else keras.layers.BatchNormalization
    self.assertTrue(all(type(l) is want for l in norms))  # pylint: disable=unidiomatic-typecheck
    self.assertFalse(norms[-1].center or norms[-1].scale)
    self.assertTrue(all(w.dtype == "float32" for w in head.weights))
    x = np.random.default_rng(3).normal(3.0, 2.0, size=(8, 32)).astype(np.float32)
    z = head(x, training=True).numpy()
    # The final BN removes the common component: per group of the batch (split) or overall,
    # each dimension has mean 0 and variance 1 in training.
    groups = z.reshape(2, 4, 8) if bn_mode == "split" else z[None]
    self.assertAllClose(groups.mean(axis=1), np.zeros(groups[:, 0].shape), atol=1e-5)
    self.assertAllClose(groups.var(axis=1), np.ones(groups[:, 0].shape), atol=1e-2)
    encoder = models.build_encoder("resnet18", embedding_dim=8, small_stem=True, bn_mode=bn_mode,
                                   bn_splits=2, head_bn=True, mlp=mlp)
    self.assertLen(encoder.head.weights, len(head.weights))

  def test_float32_under_mixed_precision(self):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    head = models.build_projection_head(16, embedding_dim=4)
    self.assertEqual(head(tf.ones((2, 16), tf.bfloat16)).dtype, tf.float32)
    self.assertTrue(all(w.dtype == "float32" for w in head.weights))
    encoder = models.build_encoder("resnet18", embedding_dim=4, small_stem=True)
    feats = encoder.features(np.zeros((2, 8, 8, 3), np.float32))
    self.assertEqual(feats["pooled"].dtype, tf.bfloat16)  # The backbone does run in bfloat16.
    self.assertEqual(encoder(np.zeros((2, 8, 8, 3), np.float32)).dtype, tf.float32)

  def test_build_encoder(self):
    encoder = models.build_encoder("resnet18", embedding_dim=16, small_stem=True,
                                   bn_mode="split", bn_splits=2, name="enc_q")
    self.assertTrue(encoder.built)
    # Backbone + 2 Dense layers with bias, created eagerly by build_encoder.
    self.assertLen(encoder.weights, len(encoder.backbone.weights) + 4)
    small_stem_delta = 64 * 3 * (3 * 3 - 7 * 7)  # conv1 is 3x3 instead of 7x7.
    self.assertEqual(_num_params(encoder), _EXPECTED_PARAMS["resnet18"] + small_stem_delta
                     + 512 * 512 + 512 + 512 * 16 + 16)
    x = np.random.default_rng(6).normal(size=(4, 8, 8, 3)).astype(np.float32)
    z = encoder(x, training=True)
    self.assertEqual((tuple(z.shape), z.dtype), ((4, 16), tf.float32))
    self.assertEqual(set(encoder.features(x)), {"C2", "C3", "C4", "C5", "pooled"})

  def test_checkpoint_keys_of_existing_runs(self):
    """Runs' checkpoints name the encoder's parts `backbone` and `head` (the projection head):
    renaming either attribute would leave every existing checkpoint unreadable."""
    encoder = models.build_encoder("resnet10_tiny", embedding_dim=4, head_bn=True)
    path = tf.train.Checkpoint(query_encoder=encoder).write(
        os.path.join(self.get_temp_dir(), "ckpt"))
    parts = {name.split("/")[1] for name, _ in tf.train.list_variables(path)
             if name.startswith("query_encoder/")}
    self.assertEqual(parts, {"backbone", "head"})
    again = models.build_encoder("resnet10_tiny", embedding_dim=4, head_bn=True)
    tf.train.Checkpoint(query_encoder=again).read(path).assert_consumed()
    for a, b in zip(encoder.weights, again.weights):
      self.assertAllEqual(a, b)

  def test_copy_weights(self):
    src = models.build_encoder("resnet18", embedding_dim=16, small_stem=True, name="src")
    dst = models.build_encoder("resnet18", embedding_dim=16, small_stem=True, name="dst")
    x = np.random.default_rng(7).normal(size=(4, 8, 8, 3)).astype(np.float32)
    src(x, training=True)  # Moves src's BN statistics away from their initial values.
    self.assertNotAllClose(src(x), dst(x))
    models.copy_weights(src, dst)
    for a, b in zip(src.weights, dst.weights):
      self.assertAllEqual(a, b)
    self.assertAllEqual(src(x), dst(x))
    self.assertAllEqual(src(x, training=True), dst(x, training=True))

  def test_copy_weights_mismatch(self):
    with self.assertRaisesRegex(ValueError, "architectures differ"):
      models.copy_weights(_cached_backbone("resnet18"), _cached_backbone("resnet34"))
    a = models.build_projection_head(8, embedding_dim=4)
    b = models.build_projection_head(8, embedding_dim=5)
    with self.assertRaisesRegex(ValueError, "shape mismatch"):
      models.copy_weights(a, b)


if __name__ == "__main__":
  tf.test.main()
