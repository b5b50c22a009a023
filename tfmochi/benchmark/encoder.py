"""`--what=encoder`: where a step's time goes, the query encoder's forward and backward alone.

A MoCo step is the query encoder's forward and backward, the key encoder's forward and a small
rest (head, momentum update, SGD). This times one encoder of the flags' architecture on random
images, training-mode BN: its forward ("forward", what the key encoder costs) and its forward with
the gradients of every trainable variable ("forward_backward"), interleaved; with
`--compare_keras_conv` also both with plain Keras Conv2D and BatchNormalization layers
(`--fast_grad=false`); with `--profile_calls=n` also the time per TensorFlow op type of n more
calls of each of the first two, from TensorFlow's profiler (`opprofile`). Images per second count
the batch; the arithmetic of a ResNet is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import tensorflow as tf

from tfmochi import build
from tfmochi import config as config_lib
from tfmochi import models
from tfmochi.benchmark import opprofile
from tfmochi.benchmark import timing


def make_encoder_fns(config: config_lib.TrainConfig, images: tf.Tensor,
                     fast_grad: bool) -> dict:
  """{"forward", "forward_backward"} callables of a fresh encoder on `images` [B, S, S, 3]."""
  encoder = build.build_run_encoder(config, "encoder", fast_grad=fast_grad)

  @tf.function
  def forward(x):
    return encoder(x, training=True)

  @tf.function
  def forward_backward(x):
    with tf.GradientTape() as tape:
      y = encoder(x, training=True)
      loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, encoder.trainable_variables)

  return {"forward": lambda: forward(images),
          "forward_backward": lambda: forward_backward(images)}


def bench_encoder(config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
                  compare_keras_conv: bool = False, profile_calls: int = 0) -> dict:
  """Times the encoder's forward and forward + backward (see the module docstring); with
  `profile_calls` > 0 also profiles that many calls of each per op type ("op_profile")."""
  build.set_precision(config.mixed_precision, config.tf32)  # as the trainer
  images = tf.random.stateless_normal(
      [config.batch_size, config.image_size, config.image_size, 3], [config.seed, 0])
  fast = models.resolve_fast_grad(config.fast_grad)
  variants = make_encoder_fns(config, images, fast)
  if compare_keras_conv and fast:
    variants.update({f"keras_{name}": fn for name, fn in
                     make_encoder_fns(config, images, fast_grad=False).items()})
  results = timing.run_interleaved(variants, warmup=warmup, timed=timed)
  out = {"what": "encoder", **timing.summarize(results, config.batch_size)}
  if profile_calls:
    out["op_profile"] = {name: opprofile.profile_op_types(variants[name], profile_calls)
                         for name in ("forward", "forward_backward")}
  out["config"] = {k: getattr(config, k) for k in (
      "arch", "small_stem", "image_size", "batch_size", "embedding_dim", "mlp_head", "head_bn",
      "bn_mode", "bn_splits", "mixed_precision", "fast_grad")}
  out["config"]["fast_grad_resolved"] = fast
  return out
