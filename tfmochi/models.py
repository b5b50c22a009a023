"""ResNet backbones, projection heads and encoders for MoCo v2 / MoCHi (Keras 3, TF backend).

The backbones are ResNet-18/34/50 in the torchvision ("v1.5") layout, so that every weight maps
one-to-one to torchvision, detectron2 and keras-hub's `ResNetBackbone`:

* convolutions have no bias; BN epsilon 1e-5, Keras momentum 0.9 (= PyTorch momentum 0.1);
* bottlenecks put the stride on the 3x3 conv (v1.5), basic blocks on their first 3x3 conv;
* the shortcut is 1x1 conv + BN ("downsample") when the stride or the width changes;
* stride-2 convs and the 3x3/2 max-pool use explicit symmetric `ZeroPadding2D` + "valid"
  padding, which reproduces PyTorch's `padding=k//2`. TF's "same" padding would pad
  (0 before, 1 after) for even sizes and shift the sampling grid by one pixel, so the
  weights would transfer but the features would not match. Zero padding before the max-pool is
  equivalent to PyTorch's -inf padding because it follows a ReLU (inputs >= 0) and every
  3x3 window contains at least one real pixel;
* conv kernels use torchvision's Kaiming-normal (fan_out, ReLU gain) init; BN gamma = 1 and
  beta = 0 everywhere (no zero-init of the last BN of a block: MoCo does not use it).

Layer names are the torchvision module names (Keras 3 accepts dots in layer names; only "/"
is rejected): `conv1`, `bn1`, `layer{s}.{b}.conv{i}`, `layer{s}.{b}.bn{i}`,
`layer{s}.{b}.downsample.0` (1x1 conv), `layer{s}.{b}.downsample.1` (its BN), with s = 1..4,
b = 0-based block index and i = 1..2 (basic) or 1..3 (bottleneck). Weight-less helper layers
are named `conv1_pad`, `relu`, `maxpool_pad`, `maxpool`, `layer{s}.{b}.conv{i}_pad`,
`layer{s}.{b}.relu{i}`, `layer{s}.{b}.add`, `layer{s}.{b}.relu` and `avgpool`. The torchvision
state-dict key of a weight is `<layer name>.<weight|bias|running_mean|running_var>`; detectron2
keys follow from `weightmaps.torchvision_to_detectron2_key` (docs/ALGORITHMS.md §8) and keras-hub
`ResNetBackbone` layer names from `keras_hub_layer_name` (verified bit-identical outputs).

Data format is channels-last throughout; torchvision conv kernels (OIHW) are transposed to
Keras' HWIO by `weightmaps.torchvision_state_dict` / `weightmaps.load_torchvision_state_dict`.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf

# The torchvision-layout ResNets: every weight maps to torchvision, detectron2 and keras-hub, and
# tfmochi.export accepts them.
ARCHS = ("resnet18", "resnet34", "resnet50")
# Small: the same layer names and code paths at 1/36 of ResNet-18's parameters (one basic block per
# stage, widths 16-128), for what must run in minutes on 2 CPU cores: tests (soak, multi-process
# faults), the quickstart (configs/quickstart.flags) and the digits comparison. No pretrained or
# torchvision counterpart exists: tfmochi.export writes it as saved_model, hub or keras, never as
# torchvision or detectron2 weight files.
SMOKE_ARCHS = ("resnet10_tiny",)
BN_MODES = ("standard", "sync", "split")

_WIDTHS = (64, 128, 256, 512)
# (block type, blocks per stage, stage widths); bottleneck blocks expand the width by 4 at their
# output.
_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), _WIDTHS),
    "resnet34": ("basic", (3, 4, 6, 3), _WIDTHS),
    "resnet50": ("bottleneck", (3, 4, 6, 3), _WIDTHS),
    "resnet10_tiny": ("basic", (1, 1, 1, 1), (16, 32, 64, 128)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

BN_EPSILON = 1e-5
# Keras momentum is the weight of the old value: 0.9 here == PyTorch's momentum=0.1.
BN_MOMENTUM = 0.9


def _check_arch(arch: str) -> str:
  if arch not in _SPECS:
    raise ValueError(f"Unknown arch {arch!r}; choose one of {list(ARCHS)} (or "
                     f"{list(SMOKE_ARCHS)} for tests).")
  return arch


def feature_dim(arch: str) -> int:
  """Width F of the pooled backbone features: 512 (resnet18/34), 2048 (resnet50), 128
  (resnet10_tiny)."""
  block, _, widths = _SPECS[_check_arch(arch)]
  return widths[-1] * _EXPANSION[block]


# ------------------------------------------------------------------------------------------------
# Batch normalisation.


@keras.saving.register_keras_serializable(package="tfmochi")
class SplitBatchNorm(keras.layers.BatchNormalization):
  """BatchNorm whose training statistics are computed per group of the batch (MoCo CIFAR demo).

  In training the batch `[B, ..., C]` is split into `num_splits` contiguous groups of B / S
  samples (group g = rows [g*B/S, (g+1)*B/S)), and each group is normalised with its own
  mean / (biased) variance, as if each group sat on its own GPU with per-GPU BN. On one device
  this recreates the "per-replica statistics" that Shuffle BN relies on (docs/ALGORITHMS.md §3).
  The moving statistics are updated once with the average of the group statistics (identical
  to updating them per group and averaging, as the PyTorch demo does). Inference uses the moving
  statistics exactly like `keras.layers.BatchNormalization`, and the weights (gamma, beta,
  moving_mean, moving_variance) are the same, so checkpoints and exports are layout-identical.

  Differences to facebookresearch/moco's colab `SplitBatchNorm`: that one reshapes
  `[N, C, H, W] -> [N/S, S*C, H, W]`, i.e. sample n lands in group n mod S (interleaved);
  here groups are contiguous, matching a replica-major global batch (what `all_gather`
  produces). Under a random key shuffle both are equivalent. The moving variance is the biased
  batch variance, as everywhere in Keras (PyTorch uses the unbiased one).

  Statistics and normalisation are computed in float32 (inputs are up-cast) even under a
  mixed-precision policy; the output is cast back to the layer's compute dtype.

  Only the channels-last axis (-1) is supported. With `num_splits=1` it computes exactly what
  standard BN computes.
  """

  def __init__(self, num_splits: int = 8, **kwargs):
    if kwargs.get("synchronized", False):
      raise ValueError("SplitBatchNorm cannot be synchronized; use bn_mode='sync' instead.")
    if kwargs.get("renorm", False):
      raise ValueError("SplitBatchNorm does not support renorm.")
    super().__init__(**kwargs)
    num_splits = int(num_splits)
    if num_splits < 1:
      raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
    self.num_splits = num_splits

  def build(self, input_shape):
    rank = len(input_shape)
    if self.axis not in (-1, rank - 1):
      raise ValueError(
          f"SplitBatchNorm only supports the last (channels) axis, got axis={self.axis} for "
          f"rank-{rank} inputs.")
    super().build(input_shape)

  def _check_divisible(self, inputs):
    """Raises ValueError (static batch) or adds a runtime assertion (dynamic batch)."""
    batch = inputs.shape[0]
    message = (f"SplitBatchNorm '{self.name}': the batch size must be divisible by "
               f"num_splits={self.num_splits}")
    if batch is not None:
      if batch % self.num_splits:
        raise ValueError(f"{message}; got batch size {batch}.")
      return []
    # Inside a tf.function traced with an unknown batch size the check can only run at
    # execution time, where it raises tf.errors.InvalidArgumentError.
    return [tf.debugging.assert_equal(
        tf.math.floormod(tf.shape(inputs)[0], self.num_splits), 0, message=message)]

  def call(self, inputs, training=None, mask=None):
    if not (training and self.trainable):
      # Same inference path (and same frozen-BN semantics) as standard BN.
      return super().call(inputs, training=training, mask=mask)
    if mask is not None:
      raise NotImplementedError("SplitBatchNorm does not support masks in training.")
    checks = self._check_divisible(inputs)
    # float32 statistics even for bfloat16/float16 activations (overflow, precision).
    x = tf.cast(inputs, "float32")
    with tf.control_dependencies(checks):
      # identity: tf.cast of a float32 tensor creates no op to hang the dependency on.
      x = tf.identity(x)
    shape = tf.shape(x)
    rank = len(inputs.shape)
    # [B, ..., C] -> [S, B/S, ..., C]; statistics over everything but the group and channel.
    grouped = tf.reshape(x, tf.concat([[self.num_splits, -1], shape[1:]], axis=0))
    axes = list(range(1, rank))
    mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)  # [S, 1, ..., 1, C]
    gamma = tf.cast(self.gamma, "float32") if self.scale else None
    beta = tf.cast(self.beta, "float32") if self.center else None
    outputs = tf.nn.batch_normalization(
        grouped, mean, variance, offset=beta, scale=gamma, variance_epsilon=self.epsilon)
    outputs = tf.reshape(outputs, shape)
    # Average of the group statistics, [C].
    group_mean = tf.reduce_mean(tf.reshape(mean, [self.num_splits, -1]), axis=0)
    group_var = tf.reduce_mean(tf.reshape(variance, [self.num_splits, -1]), axis=0)
    self.moving_mean.assign(
        self.moving_mean * self.momentum + group_mean * (1.0 - self.momentum))
    self.moving_variance.assign(
        self.moving_variance * self.momentum + group_var * (1.0 - self.momentum))
    return tf.cast(outputs, self.compute_dtype)

  def get_config(self):
    return {**super().get_config(), "num_splits": self.num_splits}


class FusedBatchNorm(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` that trains with TensorFlow's fused kernel.

  Keras 3 builds training-mode BN from moments and element-wise ops (with float32 up-casts under
  mixed precision); on a CPU its forward and backward cost several times those of the fused
  kernel (FusedBatchNormV3, oneDNN's on x86), which also keeps bfloat16/float16 activations in
  their dtype with float32 statistics. Same variables, outputs and gradients up to float
  rounding, and the same moving statistics: the kernel returns the unbiased batch variance,
  rescaled here by (n - 1) / n to the biased one Keras averages. Inference, masks, renorm,
  synchronized BN and inputs other than [B, H, W, C] take Keras's own path. The backbone uses it
  with `fast_grad` (tfmochi's CPU kernels); exports rebuild with plain Keras BN.
  """

  def call(self, inputs, training=None, mask=None):
    fused = (training is True and self.trainable and mask is None and not self.renorm
             and not self.synchronized and len(inputs.shape) == 4 and self.axis in (-1, 3))
    if not fused:
      return super().call(inputs, training=training, mask=mask)
    x = tf.convert_to_tensor(inputs)
    if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
      x = tf.cast(x, tf.float32)
    channels = x.shape[-1]
    scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
    offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
    empty = tf.constant([], tf.float32)
    # The raw op: tf.compat.v1.nn.fused_batch_norm would raise epsilon to cuDNN's 1.001e-5.
    y, mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    shape = tf.shape(x)
    n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
    variance = unbiased * ((n - 1.0) / tf.maximum(n, 1.0))
    self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(
        self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return tf.cast(y, self.compute_dtype)


def make_batch_norm(name: str, bn_mode: str = "standard", bn_splits: int = 8, fused: bool = False,
                    **options):
  """One BN layer (epsilon 1e-5, momentum 0.9) for `bn_mode` in BN_MODES.

  * "standard": `BatchNormalization`, per-replica batch statistics. Under a tf.distribute
    strategy the moving statistics then differ between replicas; reads and checkpoints see
    replica 0's copy.
  * "sync": `BatchNormalization(synchronized=True)`: sum, sum of squares and count are
    all-reduced across replicas (TF backend only), so statistics and moving averages are
    global and identical on every replica. Outside a replica context it is standard BN.
  * "split": `SplitBatchNorm(num_splits=bn_splits)`, per-group statistics on one device.

  `fused` trains "standard" BN with TensorFlow's fused kernel (`FusedBatchNorm`: the same
  layer, faster on CPUs). `options` go to the layer as they are (the projection head passes
  dtype, center, scale).
  """
  kwargs = dict(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name, **options)
  if bn_mode == "standard":
    return (FusedBatchNorm if fused else keras.layers.BatchNormalization)(**kwargs)
  if bn_mode == "sync":
    return keras.layers.BatchNormalization(synchronized=True, **kwargs)
  if bn_mode == "split":
    return SplitBatchNorm(num_splits=bn_splits, **kwargs)
  raise ValueError(f"Unknown bn_mode {bn_mode!r}; choose one of {list(BN_MODES)}.")


# ------------------------------------------------------------------------------------------------
# Convolution.


# Convolutions whose output maps have at most this many pixels take their kernel gradient as one
# matmul per kernel tap (`_kernel_grad_as_matmuls`), and strided ones their input gradient as one
# matmul (`_input_grad_as_matmul`), by compute dtype; other dtypes never. Where it was measured
# (AMD Zen 4, docs/BENCHMARKS.md), oneDNN's bfloat16 kernel-gradient kernel ran 1.1-3.8x slower
# than the matmuls on maps up to 8x8, its float32 one only on 3x3 maps; on an AVX2-only AMD Zen 3
# TensorFlow's input gradient of the 3x3 stride-2 convolution to a 3x3 map took 4-6x the matmul.
SMALL_MAP_PIXELS = {"bfloat16": 64, "float32": 9}


@contextlib.contextmanager
def small_map_pixels(limits: dict[str, int]):
  """SMALL_MAP_PIXELS updated with `limits` inside the block (for functions traced there; the
  benchmark compares both kernel-gradient paths this way)."""
  saved = dict(SMALL_MAP_PIXELS)
  SMALL_MAP_PIXELS.update(limits)
  try:
    yield
  finally:
    SMALL_MAP_PIXELS.clear()
    SMALL_MAP_PIXELS.update(saved)


def _small_map(dy: tf.Tensor) -> bool:
  """Whether dy [B, H', W', C] has static H', W' with H'·W' <= SMALL_MAP_PIXELS[its dtype]."""
  height, width = dy.shape[1], dy.shape[2]
  limit = SMALL_MAP_PIXELS.get(dy.dtype.name, 0)
  return height is not None and width is not None and height * width <= limit


def _kernel_grad_as_matmuls(x: tf.Tensor, dy: tf.Tensor, kh: int, kw: int,
                            stride: int = 1) -> tf.Tensor:
  """The kernel gradient of a "VALID" convolution as kh·kw matmuls, one per kernel tap.

  Tap (a, b) of the kernel reads the input pixels (a + s·i, b + s·j), so its gradient is those
  pixels, as [B·H'·W', Cin], transposed times dy as [B·H'·W', Cout]. On small maps with many
  channels this beats TensorFlow's CPU Conv2DBackpropFilter, by most in bfloat16: stride 1 at
  [32, 3, 3, 512] 6.2 ms against 18.9 (float32 10.6 against 11.9), stride 2 to [32, 3, 3, 512]
  6.0 against 22.9 (float32 12.4 against 24.4); on larger maps the shifted copies of the input
  cost more than they win (docs/BENCHMARKS.md).

  Args:
    x: [B, H, W, Cin], already padded as the convolution pads it.
    dy: [B, H', W', Cout] with static H', W'.
    kh, kw: the kernel's height and width.
    stride: s, on both spatial axes.

  Returns:
    [kh, kw, Cin, Cout].
  """
  channels_in, channels_out = x.shape[-1], dy.shape[-1]
  rows, cols = stride * (dy.shape[1] - 1) + 1, stride * (dy.shape[2] - 1) + 1
  dy_rows = tf.reshape(dy, [-1, channels_out])
  taps = []
  for a in range(kh):
    for b in range(kw):
      tap = _subsample(tf.slice(x, [0, a, b, 0], [-1, rows, cols, -1]), stride)
      taps.append(tf.matmul(tf.reshape(tap, [-1, channels_in]), dy_rows, transpose_a=True))
  return tf.reshape(tf.stack(taps), [kh, kw, channels_in, channels_out])


def _kernel_grad(x: tf.Tensor, dy: tf.Tensor, kernel: tf.Tensor, stride: int,
                 padding: str) -> tf.Tensor:
  """The kernel gradient of conv2d(x, kernel, stride, padding): `_kernel_grad_as_matmuls` on
  small maps (`_small_map`), TensorFlow's Conv2DBackpropFilter elsewhere. padding: "SAME" (odd
  kernel, stride 1) or "VALID"."""
  kh, kw = kernel.shape[0], kernel.shape[1]
  if not _small_map(dy):
    return tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, stride, stride, 1],
        padding=padding)
  if padding == "SAME":
    x = tf.pad(x, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
  return _kernel_grad_as_matmuls(x, dy, kh, kw, stride)


def _input_grad_as_matmul(dy: tf.Tensor, kernel: tf.Tensor, height: int, width: int,
                          stride: int) -> tf.Tensor:
  """The input gradient of a stride-s "VALID" convolution as one matmul and a sum of phases.

  dy [B·H'·W', Cout] times the kernel as [Cout, kh·kw·Cin] gives every tap's share at once; tap
  (a, b) of output pixel (i, j) goes to input pixel (a + s·i, b + s·j). The input pixels whose
  row and column leave remainders (p, q) modulo s form a phase, an [B, ⌈H/s⌉, ⌈W/s⌉, Cin] grid
  in which tap (a, b) lands in phase (a mod s, b mod s), shifted by (a // s, b // s): each phase
  is a sum of padded taps, and the phases interleave into the input by a stack and a reshape.
  On small output maps TensorFlow's CPU Conv2DBackpropInput is many times the forward
  convolution (144 ms against 17 ms for a [32, 8, 8, 512] input, stride 2, 3x3 kernel, on an
  AVX2-only AMD EPYC; this: the forward's arithmetic in one matmul; docs/BENCHMARKS.md).

  Args:
    dy: [B, H', W', Cout], static H', W'.
    kernel: [kh, kw, Cin, Cout].
    height, width: H, W of the convolution's input (static).
    stride: s.

  Returns:
    [B, H, W, Cin].
  """
  kh, kw, channels_in, channels_out = kernel.shape
  out_h, out_w = dy.shape[1], dy.shape[2]
  rows, cols = -(-height // stride), -(-width // stride)
  weights = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]), [channels_out, kh * kw * channels_in])
  shares = tf.matmul(tf.reshape(dy, [-1, channels_out]), weights)
  taps = tf.unstack(tf.reshape(shares, [-1, out_h, out_w, kh * kw, channels_in]), axis=3)
  phases = [[[] for _ in range(stride)] for _ in range(stride)]
  for a in range(kh):
    for b in range(kw):
      top, left = a // stride, b // stride
      phases[a % stride][b % stride].append(tf.pad(taps[a * kw + b], [
          [0, 0], [top, rows - out_h - top], [left, cols - out_w - left], [0, 0]]))
  def phase(parts):  # kernels smaller than the stride leave phases without taps
    return tf.add_n(parts) if parts else tf.zeros([tf.shape(dy)[0], rows, cols, channels_in],
                                                  dy.dtype)

  grid = tf.stack([tf.stack([phase(parts) for parts in row], axis=3)
                   for row in phases], axis=2)  # [B, rows, s, cols, s, Cin]
  grid = tf.reshape(grid, [-1, rows * stride, cols * stride, channels_in])
  return grid[:, :height, :width, :]


def _strided_conv(x: tf.Tensor, kernel: tf.Tensor, stride: int) -> tf.Tensor:
  """`conv2d(x, kernel, stride, "VALID")`, with both gradients as matmuls on small maps.

  ResNet's strided 3x3 convolutions (the first block of layers 2-4, padded explicitly before)
  keep TensorFlow's forward. Where the output map is small (SMALL_MAP_PIXELS) the input gradient
  is `_input_grad_as_matmul` and the kernel gradient `_kernel_grad_as_matmuls`; elsewhere both
  are TensorFlow's ops (on AMD Zen 4 an exact rewrite of the input gradient as four phase
  convolutions lost to TensorFlow's op at every shape, docs/BENCHMARKS.md).

  Args:
    x: [B, H, W, Cin].
    kernel: [kh, kw, Cin, Cout].
    stride: s >= 2 (both spatial axes).

  Returns:
    [B, (H - kh) // s + 1, (W - kw) // s + 1, Cout].
  """

  @tf.custom_gradient
  def conv(x, kernel):
    y = tf.nn.conv2d(x, kernel, strides=stride, padding="VALID")

    def grad(dy):
      height, width = x.shape[1], x.shape[2]
      if _small_map(dy) and height is not None and width is not None:
        dx = _input_grad_as_matmul(dy, kernel, height, width, stride)
      else:
        dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel,
                                            out_backprop=dy, strides=[1, stride, stride, 1],
                                            padding="VALID")
      return dx, _kernel_grad(x, dy, kernel, stride, "VALID")

    return y, grad

  return conv(x, kernel)


def _conv_input_grad_as_conv(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
  """`conv2d(x, kernel, stride 1, "SAME")` for an odd kernel, with faster exact gradients.

  Why: TensorFlow's CPU kernel for the input gradient (Conv2DBackpropInput) is pathologically slow
  on small feature maps with many channels (ResNet's last stage at 16-96 px: 2x2 or 3x3 maps,
  512 channels), many times the forward convolution, which dominates the backward pass of a
  small-image ResNet (docs/BENCHMARKS.md has the timings).
  For stride 1, symmetric ("SAME", odd kernel) padding and no dilation, that gradient *is* a
  forward convolution of the output gradient with the kernel flipped in space and transposed in
  channels, so it is computed that way. The kernel gradient is TensorFlow's op, or on small maps
  (SMALL_MAP_PIXELS) one matmul per kernel tap (`_kernel_grad_as_matmuls`).

  Args:
    x: [B, H, W, Cin].
    kernel: [k, k, Cin, Cout], k odd.

  Returns:
    [B, H, W, Cout].
  """

  @tf.custom_gradient
  def conv(x, kernel):
    y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")

    def grad(dy):
      flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])  # [k, k, Cout, Cin]
      dx = tf.nn.conv2d(dy, flipped, strides=1, padding="SAME")
      return dx, _kernel_grad(x, dy, kernel, 1, "SAME")

    return y, grad

  return conv(x, kernel)


def _subsample(x: tf.Tensor, stride: int) -> tf.Tensor:
  """x[:, ::s, ::s, :] as a reshape and a slice of whole pixels. [B, H, W, C] -> [B, H', W', C].

  TensorFlow's CPU StridedSlice copies element by element: 11 ms for [32, 24, 24, 256] here,
  against 1.5 ms for this slice of contiguous C-channel runs (docs/BENCHMARKS.md). H and W are
  padded up to multiples of s first where they are not (the padding is never read).
  """
  if stride == 1:
    return x
  height, width, channels = x.shape[1], x.shape[2], x.shape[3]
  if height is None or width is None or height % stride or width % stride:
    shape = tf.shape(x)
    x = tf.pad(x, [[0, 0], [0, -shape[1] % stride], [0, -shape[2] % stride], [0, 0]])
  shape = tf.shape(x)
  rows, cols = shape[1] // stride, shape[2] // stride
  x = tf.reshape(x, [shape[0], rows, stride, cols, stride * channels])
  # tf.slice, not x[:, :, 0, :, :C]: StridedSlice's gradient op is as slow as its forward, Slice's
  # (a Pad) is not.
  x = tf.slice(x, [0, 0, 0, 0, 0], [-1, -1, 1, -1, channels])
  return tf.reshape(x, [shape[0], rows, cols, channels])


def _pointwise_as_matmul(x: tf.Tensor, kernel: tf.Tensor, stride: int) -> tf.Tensor:
  """A 1x1 convolution of any stride as one matmul: [B·H'·W', Cin] x [Cin, Cout].

  Why: on a CPU, TensorFlow's (oneDNN's) bfloat16 1x1 convolutions run below its matmul on the
  same numbers (a ResNet-50 encoder's forward and backward 7% faster this way; float32 about
  even), and the input gradient of the strided ones (ResNet's projection shortcuts,
  `downsample.0`) costs 1.2-1.9x their forward (docs/BENCHMARKS.md has the timings). A 1x1
  stride-s convolution reads only the pixels (s·i, s·j) ("same" and "valid" padding agree for a
  1x1 kernel), so it is a subsample (`_subsample`) and a matmul, and autodiff gives its gradients
  as the two transposed matmuls (dy·Wᵀ put back in place by the slice's gradient, a Pad, and
  xᵀ·dy).

  Args:
    x: [B, H, W, Cin].
    kernel: [1, 1, Cin, Cout].
    stride: s >= 1 (both spatial axes).

  Returns:
    [B, ceil(H/s), ceil(W/s), Cout].
  """
  x = _subsample(x, stride)
  shape = tf.shape(x)
  rows = tf.reshape(x, [-1, kernel.shape[2]])
  y = tf.matmul(rows, tf.reshape(kernel, kernel.shape[2:]))
  return tf.reshape(y, tf.concat([shape[:3], [kernel.shape[3]]], axis=0))


@keras.saving.register_keras_serializable(package="tfmochi")
class Conv2D(keras.layers.Conv2D):
  """`keras.layers.Conv2D` with faster exact kernels on CPUs.

  1x1 convolutions of any stride are matmuls (`_pointwise_as_matmul`); the other stride-1 "same"
  ones compute their input gradient as a convolution (`_conv_input_grad_as_conv`), and they and
  the strided "valid" ones (`_strided_conv`) their kernel gradient as matmuls on small maps;
  anything else is `keras.layers.Conv2D` unchanged. Outputs, weights and gradients are those of
  `keras.layers.Conv2D` up to float rounding. Exports rebuild the backbone with plain
  `keras.layers.Conv2D` (`fast_grad=False`), so exported models need no tfmochi import.
  """

  def _fast_grad_path(self) -> str | None:
    """"pointwise" (1x1), "same" (stride 1, odd kernel), "strided" ("valid", stride > 1), or
    None (keras' own convolution)."""
    plain = (self.rank == 2 and tuple(self.dilation_rate) == (1, 1) and self.groups == 1
             and self.data_format == "channels_last")
    if not plain:
      return None
    if tuple(self.kernel_size) == (1, 1) and self.strides[0] == self.strides[1]:
      return "pointwise"
    if (self.padding == "same" and tuple(self.strides) == (1, 1)
        and all(k % 2 == 1 for k in self.kernel_size)):
      return "same"
    if self.padding == "valid" and self.strides[0] == self.strides[1] > 1:
      return "strided"
    return None

  def convolution_op(self, inputs, kernel):
    path = self._fast_grad_path()
    if path is None:
      return super().convolution_op(inputs, kernel)
    x = tf.convert_to_tensor(inputs)
    kernel = tf.cast(tf.convert_to_tensor(kernel), x.dtype)
    if path == "same":
      return _conv_input_grad_as_conv(x, kernel)
    if path == "strided":
      return _strided_conv(x, kernel, int(self.strides[0]))
    return _pointwise_as_matmul(x, kernel, int(self.strides[0]))


def resolve_fast_grad(setting: str | bool) -> bool:
  """--fast_grad=auto|true|false as a bool: auto is on only when no GPU/TPU is visible.

  `Conv2D`'s input gradients were written for (and measured on) TensorFlow's CPU kernels; cuDNN
  and XLA have good kernels of their own, where the rewrite has never been measured.
  """
  if isinstance(setting, bool):
    return setting
  if setting not in ("auto", "true", "false"):
    raise ValueError(f"fast_grad must be auto, true or false; got {setting!r}.")
  from tfmochi import distribute  # pylint: disable=g-import-not-at-top

  return not distribute.accelerator_visible() if setting == "auto" else setting == "true"


def _conv(x, filters: int, kernel: int, stride: int, name: str, fast_grad: bool = True):
  """Bias-free conv with PyTorch padding (k // 2 on each side). [B, H, W, Cin] -> [B, H', W', F]."""
  # A fresh initializer per layer: Keras 3 initializers fix their seed at construction, so a
  # shared instance would give every same-shaped kernel identical values.
  init = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")
  pad = kernel // 2
  if stride > 1 and pad > 0:
    x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    padding = "valid"
  else:
    # Stride 1 with an odd kernel: "same" is exactly symmetric k // 2 padding.
    padding = "same"
  conv_class = Conv2D if fast_grad else keras.layers.Conv2D
  return conv_class(filters, kernel, strides=stride, padding=padding, use_bias=False,
                    kernel_initializer=init, name=name)(x)


# ------------------------------------------------------------------------------------------------
# Backbone.


def _block(x, block: str, width: int, stride: int, prefix: str, bn, conv):
  """One residual block (torchvision BasicBlock / Bottleneck v1.5)."""
  out_width = width * _EXPANSION[block]
  shortcut = x
  if block == "basic":
    y = conv(x, width, 3, stride, f"{prefix}.conv1")
    y = bn(f"{prefix}.bn1")(y)
    y = keras.layers.ReLU(name=f"{prefix}.relu1")(y)
    y = conv(y, width, 3, 1, f"{prefix}.conv2")
    y = bn(f"{prefix}.bn2")(y)
  else:
    y = conv(x, width, 1, 1, f"{prefix}.conv1")
    y = bn(f"{prefix}.bn1")(y)
    y = keras.layers.ReLU(name=f"{prefix}.relu1")(y)
    y = conv(y, width, 3, stride, f"{prefix}.conv2")  # v1.5: stride on the 3x3.
    y = bn(f"{prefix}.bn2")(y)
    y = keras.layers.ReLU(name=f"{prefix}.relu2")(y)
    y = conv(y, out_width, 1, 1, f"{prefix}.conv3")
    y = bn(f"{prefix}.bn3")(y)
  if stride != 1 or x.shape[-1] != out_width:
    shortcut = conv(x, out_width, 1, stride, f"{prefix}.downsample.0")
    shortcut = bn(f"{prefix}.downsample.1")(shortcut)
  y = keras.layers.Add(name=f"{prefix}.add")([y, shortcut])
  return keras.layers.ReLU(name=f"{prefix}.relu")(y)


def build_backbone(arch: str, *, small_stem: bool = False, bn_mode: str = "standard",
                   bn_splits: int = 8, name: str = "backbone",
                   fast_grad: bool = True) -> keras.Model:
  """Builds a ResNet backbone (no fc) in the torchvision layout.

  Args:
    arch: one of ARCHS (or SMOKE_ARCHS, for tests).
    small_stem: CIFAR-style stem as in the MoCo CIFAR demo: `conv1` is 3x3 stride 1 and there
      is no max-pool, so C2..C5 have strides 1, 2, 4, 8 instead of 4, 8, 16, 32.
    bn_mode: one of BN_MODES (see `make_batch_norm`).
    bn_splits: number of groups for bn_mode="split".
    name: model name.
    fast_grad: use `Conv2D` (same outputs and weights, a faster exact input gradient on CPUs)
      instead of `keras.layers.Conv2D`, and `FusedBatchNorm` for standard BN; exports pass
      False so that they need no custom objects.

  Returns:
    A functional model mapping normalised images `[B, H, W, 3]` (float, H and W may differ
    between calls) to a dict with `C2` `[B, H/4, W/4, c2]`, `C3` `[B, H/8, W/8, c3]`,
    `C4` `[B, H/16, W/16, c4]`, `C5` `[B, H/32, W/32, c5]` (sizes rounded up; c = 64, 128,
    256, 512 for resnet18/34, 256, 512, 1024, 2048 for resnet50 and 16, 32, 64, 128 for
    resnet10_tiny) and `pooled` `[B, F]`,
    the global average of C5 (F = `feature_dim(arch)`). Outputs are in the compute dtype of
    the global dtype policy.
  """
  block, depths, widths = _SPECS[_check_arch(arch)]
  if bn_mode not in BN_MODES:
    raise ValueError(f"Unknown bn_mode {bn_mode!r}; choose one of {list(BN_MODES)}.")

  def bn(layer_name):
    return make_batch_norm(layer_name, bn_mode, bn_splits, fused=fast_grad)

  def conv(x, filters, kernel, stride, layer_name):
    return _conv(x, filters, kernel, stride, layer_name, fast_grad=fast_grad)

  images = keras.Input(shape=(None, None, 3), name="images")
  if small_stem:
    x = conv(images, widths[0], 3, 1, "conv1")
  else:
    x = conv(images, widths[0], 7, 2, "conv1")
  x = bn("bn1")(x)
  x = keras.layers.ReLU(name="relu")(x)
  if not small_stem:
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
  outputs = {}
  for stage, (width, depth) in enumerate(zip(widths, depths)):
    for b in range(depth):
      stride = 2 if (stage > 0 and b == 0) else 1
      x = _block(x, block, width, stride, f"layer{stage + 1}.{b}", bn, conv)
    outputs[f"C{stage + 2}"] = x
  outputs["pooled"] = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
  return keras.Model(images, outputs, name=name)


# ------------------------------------------------------------------------------------------------
# Projection head and encoder.


def _torch_linear(in_dim: int, units: int, name: str,
                  use_bias: bool = True) -> keras.layers.Dense:
  """Dense with PyTorch nn.Linear's default init: U(+-1/sqrt(in_dim)) for kernel and bias."""
  bound = 1.0 / float(np.sqrt(in_dim))
  return keras.layers.Dense(
      units, dtype="float32", name=name, use_bias=use_bias,
      kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
      bias_initializer=keras.initializers.RandomUniform(-bound, bound))


def build_projection_head(in_dim: int, embedding_dim: int = 128, mlp: bool = True,
                          name: str = "head", bn: bool = False, bn_mode: str = "standard",
                          bn_splits: int = 8) -> keras.Model:
  """MoCo projection head, `[B, in_dim]` -> `[B, embedding_dim]` float32 (not normalised).

  mlp=True (MoCo v2): `fc.0` Dense(in_dim) -> `fc.1` ReLU -> `fc.2` Dense(embedding_dim)
  (PyTorch's `nn.Sequential` indices). mlp=False (MoCo v1): a single `fc` Dense. No BN.
  bn=True (MoCo v3's layout): `fc.0` Dense(in_dim, no bias) -> `fc.1` BN -> `fc.2` ReLU ->
  `fc.3` Dense(embedding_dim, no bias) -> `fc.4` BN without affine (or `fc` Dense -> `fc_bn`
  BN for the linear head), with the backbone's BN kind (`bn_mode`, `bn_splits`).

  Why the BN option: the final BN removes the component all embeddings share, without which a
  short run on a tiny data set collapses (docs/ALGORITHMS.md §6).

  All layers are float32 even under a mixed-precision policy, and the input is cast to
  float32, because the logits, the loss and the negatives queue must stay float32.
  """
  inputs = keras.Input(shape=(in_dim,), name=f"{name}_features", dtype="float32")
  x = keras.layers.Activation("linear", dtype="float32", name="cast")(inputs)

  def norm(layer_name, affine=True):
    return make_batch_norm(layer_name, bn_mode, bn_splits, dtype="float32", center=affine,
                           scale=affine)

  if mlp and bn:
    x = _torch_linear(in_dim, in_dim, "fc.0", use_bias=False)(x)
    x = norm("fc.1")(x)
    x = keras.layers.ReLU(dtype="float32", name="fc.2")(x)
    x = _torch_linear(in_dim, embedding_dim, "fc.3", use_bias=False)(x)
    x = norm("fc.4", affine=False)(x)
  elif mlp:
    x = _torch_linear(in_dim, in_dim, "fc.0")(x)
    x = keras.layers.ReLU(dtype="float32", name="fc.1")(x)
    x = _torch_linear(in_dim, embedding_dim, "fc.2")(x)
  else:
    x = _torch_linear(in_dim, embedding_dim, "fc", use_bias=not bn)(x)
    if bn:
      x = norm("fc_bn", affine=False)(x)
  return keras.Model(inputs, x, name=name)


@keras.saving.register_keras_serializable(package="tfmochi")
class Encoder(keras.Model):
  """Backbone + projection head: images `[B, H, W, 3]` -> embeddings `[B, D]` float32.

  The embeddings are NOT L2-normalised (callers normalise). Weight order (`.weights`) is the
  backbone's followed by the projection head's.

  Attributes:
    backbone: `build_backbone`'s model (what is exported).
    head: the projection head (`build_projection_head`). Its attribute name is the checkpoint
      key of every run (`query_encoder/head/...`), so it stays `head`.
  """

  def __init__(self, backbone: keras.Model, head: keras.Model, **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self.head = head

  def call(self, images, training=False):
    """`[B, H, W, 3]` -> `[B, embedding_dim]` float32."""
    return self.head(self.backbone(images, training=training)["pooled"], training=training)

  def features(self, images, training=False) -> dict:
    """The backbone dict (`C2`..`C5`, `pooled`) for `[B, H, W, 3]` images."""
    return self.backbone(images, training=training)

  def get_config(self):
    return {**super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "head": keras.saving.serialize_keras_object(self.head)}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    backbone = keras.saving.deserialize_keras_object(config.pop("backbone"))
    head = keras.saving.deserialize_keras_object(config.pop("head"))
    return cls(backbone, head, **config)


def build_encoder(arch: str, *, embedding_dim: int = 128, mlp: bool = True,
                  small_stem: bool = False, bn_mode: str = "standard", bn_splits: int = 8,
                  name: str = "encoder", fast_grad: bool = True,
                  head_bn: bool = False) -> Encoder:
  """Builds an `Encoder` (see `build_backbone`, `build_projection_head`) with all variables created.

  `head_bn` puts BatchNorm (of the same `bn_mode`) in the projection head
  (`build_projection_head`).
  """
  backbone = build_backbone(arch, small_stem=small_stem, bn_mode=bn_mode, bn_splits=bn_splits,
                            name=f"{name}_backbone", fast_grad=fast_grad)
  head = build_projection_head(feature_dim(arch), embedding_dim, mlp, name=f"{name}_head",
                               bn=head_bn, bn_mode=bn_mode, bn_splits=bn_splits)
  encoder = Encoder(backbone, head, name=name)
  # One cheap inference call so that the model is built and `weights` is complete right away
  # (e.g. before copy_weights or optimizer.build inside a strategy scope).
  encoder(tf.zeros([1, 32, 32, 3]), training=False)
  return encoder


def check_same_weights(src: keras.Model, dst: keras.Model) -> None:
  """Raises ValueError unless `src` and `dst` have as many weights, of the same shapes, in order.

  The one check behind every pairing of two encoders' weights by position (`copy_weights`, the
  momentum encoder's `momentum.weight_pairs`): pairing by position is only right when the two
  models are the same architecture.
  """
  src_w, dst_w = src.weights, dst.weights
  if len(src_w) != len(dst_w):
    raise ValueError(f"{src.name!r} has {len(src_w)} variables but {dst.name!r} has "
                     f"{len(dst_w)}; the architectures differ.")
  bad = [f"#{i} {s.path} {tuple(s.shape)} vs {d.path} {tuple(d.shape)}"
         for i, (s, d) in enumerate(zip(src_w, dst_w)) if tuple(s.shape) != tuple(d.shape)]
  if bad:
    raise ValueError(f"shape mismatch between {src.name!r} and {dst.name!r} (the architectures "
                     "differ): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))


def copy_weights(src: keras.Model, dst: keras.Model) -> None:
  """Assigns every variable of `src` (trainable and not, incl. BN moving stats) to `dst`.

  Variables are matched by position in `.weights` after `check_same_weights`, so nothing is
  assigned on a mismatch. Use it to start the key encoder from the query encoder:
  `keras.models.clone_model` gives fresh random weights.

  Raises:
    ValueError: different number of variables or any shape mismatch.
  """
  check_same_weights(src, dst)
  for s, d in zip(src.weights, dst.weights):
    d.assign(s.value)
