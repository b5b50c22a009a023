"""`--what=step`: a full MoCo v2 training step on synthetic images, as the trainer runs it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tfmochi import config as config_lib
from tfmochi.benchmark import timing


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict:
  """A MoCo batch of random normalised views: {"view1", "view2": [B, S, S, 3], "id", "label"}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = [batch_size, image_size, image_size, 3]
  return {"view1": tf.random.stateless_normal(shape, [seed, 11]),
          "view2": tf.random.stateless_normal(shape, [seed, 12]),
          "id": tf.range(batch_size, dtype=tf.int64),
          "label": tf.fill([batch_size], tf.constant(-1, tf.int64))}


def make_train_step_fn(config: config_lib.TrainConfig, strategy, batch: dict,
                       steps_per_call: int = 1, fast_grad: bool | None = None,
                       jit_compile: bool | None = None) -> Callable[[], object]:
  """Builds a MoCo model, its optimizer and a compiled loop of `steps_per_call` training steps.

  The trainer's build (`build.build_train_state`: the model, its SGD optimizer and counters in
  the strategy's scope before tracing, at a constant learning rate here) and its replica step,
  run by a `tf.function` through `strategy.run` inside a `tf.range` loop. `fast_grad=False` builds the
  encoders with plain `keras.layers.Conv2D` (see `models.Conv2D`); None resolves --fast_grad.
  `jit_compile` compiles the replica step with XLA as the trainer does (None: --jit_compile).

  Returns:
    A zero-argument callable running `steps_per_call` steps and returning the last loss.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfmochi import build  # pylint: disable=g-import-not-at-top
  from tfmochi import distribute  # pylint: disable=g-import-not-at-top

  if jit_compile is None:
    jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  # MoCHi synthesises from the first step (its warm-up would only mask the same computation).
  moco_config = config.moco_for_run(steps_per_epoch=1000, total_steps=1_000_000)
  moco_config = dataclasses.replace(moco_config, mochi_warmup_steps=0)
  state = build.build_train_state(config, strategy, moco_config, 0.03, fast_grad)
  step = state.step
  replica_step = distribute.replica_step_function(
      lambda b: state.replica_step(b)["loss"], jit_compile, strategy)

  @tf.function
  def loop(b):
    loss = tf.constant(0.0)
    for _ in tf.range(steps_per_call):
      loss = strategy.reduce("SUM", strategy.run(replica_step, args=(b,)), axis=None)
      step.assign_add(1)
    return loss

  def replica_slice(ctx):  # this replica's rows of the global batch
    per_replica = config.batch_size // ctx.num_replicas_in_sync
    start = ctx.replica_id_in_sync_group * per_replica
    return {k: v[start:start + per_replica] for k, v in batch.items()}

  distributed = strategy.experimental_distribute_values_from_function(replica_slice)
  call = lambda: loop(distributed)  # noqa: E731
  call.tracing_count = loop.experimental_get_tracing_count  # 1 after any number of calls
  return call


def bench_step(config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
               steps_per_call: int = 1, compare_moco: bool = True,
               compare_keras_conv: bool = False, compare_jit: bool = False) -> dict:
  """Times full training steps: the flags' configuration, and plain MoCo next to a MoCHi one.

  Args:
    config: the training configuration (arch, image_size, batch_size, queue_size, MoCHi, ...).
    warmup: untimed calls per variant.
    timed: timed calls per variant (each `steps_per_call` steps).
    steps_per_call: training steps per `tf.function` call.
    compare_moco: with MoCHi on, also time the same step without MoCHi ("moco").
    compare_keras_conv: also time the first variant with plain `keras.layers.Conv2D` convolutions
      ("<name>_keras_conv"), i.e. without tfmochi's fast input gradients.
    compare_jit: also time the first variant with the replica step compiled by XLA
      ("<name>_jit"; the others follow --jit_compile, resolved to off on CPUs).

  Returns:
    The JSON-able result.
  """
  from tfmochi import build  # pylint: disable=g-import-not-at-top
  from tfmochi import distribute  # pylint: disable=g-import-not-at-top

  build.set_precision(config.mixed_precision, config.tf32)  # as the trainer
  strategy = distribute.make_strategy(config.strategy, tpu=config.tpu,
                                      cpu_replicas=config.cpu_replicas)
  batch = synthetic_batch(config.batch_size, config.image_size, config.seed)
  mochi_on = config.moco.objective.mochi.enabled
  variants = {}
  moco_config = dataclasses.replace(config, mochi_num_hard=0, mochi_num_mix=0,
                                    mochi_num_query_mix=0)
  if not mochi_on or compare_moco:
    variants["moco"] = make_train_step_fn(moco_config, strategy, batch, steps_per_call)
  if mochi_on:
    variants["mochi"] = make_train_step_fn(config, strategy, batch, steps_per_call)
  if compare_keras_conv:
    first = next(iter(variants))
    variants[f"{first}_keras_conv"] = make_train_step_fn(
        moco_config if first == "moco" else config, strategy, batch, steps_per_call,
        fast_grad=False)
  if compare_jit:
    first = next(iter(variants))
    variants[f"{first}_jit"] = make_train_step_fn(
        moco_config if first == "moco" else config, strategy, batch, steps_per_call,
        jit_compile=True)
  results = timing.run_interleaved(variants, warmup=warmup, timed=timed,
                                   steps_per_call=steps_per_call)
  out = {"what": "step", **timing.summarize(results, config.batch_size)}
  # A step function traced more than once would be re-traced (slowly) during training too.
  out["tracing_count"] = {name: fn.tracing_count() for name, fn in variants.items()}
  out["config"] = {k: getattr(config, k) for k in (
      "arch", "small_stem", "image_size", "batch_size", "queue_size", "embedding_dim", "bn_mode",
      "bn_splits", "mixed_precision", "temperature", "loss", "mask_duplicates", "mochi_num_hard",
      "mochi_num_mix", "mochi_num_query_mix", "strategy", "cpu_replicas", "jit_compile",
      "fast_grad")}
  out["config"]["steps_per_call"] = steps_per_call
  out["config"]["replicas"] = strategy.num_replicas_in_sync
  return out
