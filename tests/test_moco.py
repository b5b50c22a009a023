"""Tests of tfmochi.moco: one MoCo/MoCHi step; R replicas == 1 replica for the same global batch;
the step compiled by XLA == the plain step."""

import dataclasses
import re
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import testdata  # tests/testdata.py

from tfmochi import augment
from tfmochi import distribute
from tfmochi import objective as objective_lib
from tfmochi import mixing
from tfmochi import moco as moco_lib
from tfmochi import optimizer as optimizer_lib
from tfmochi import topn

GLOBAL_BATCH = 4


def _encoder(seed):
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)])
  return model


def _config(**objective_kw):
  objective = objective_lib.ObjectiveConfig(temperature=0.2, mochi=mixing.MochiConfig(4, 3, 2),
                                            **objective_kw)
  return moco_lib.MoCoConfig(queue_size=16, embedding_dim=8, momentum=0.9, bn_mode="shuffle",
                             weight_decay=1e-2, mochi_warmup_steps=1, seed=3, objective=objective)


def _batches(n, global_batch=GLOBAL_BATCH):
  rng = np.random.default_rng(0)
  return [{"view1": rng.normal(size=(global_batch, 4, 4, 3)).astype(np.float32),
           "view2": rng.normal(size=(global_batch, 4, 4, 3)).astype(np.float32),
           "id": np.arange(global_batch, dtype=np.int64) + global_batch * i,
           "label": np.arange(global_batch, dtype=np.int64) % 2} for i in range(n)]


def _copies(var):
  """The per-replica copies of a (tf or Keras) mirrored variable, as NumPy arrays."""
  var = getattr(var, "_value", var)  # a keras.Variable wraps the tf.Variable
  return [v.numpy() for v in var.values]


def _run(strategy, batches, config):
  global_batch = len(batches[0]["id"])
  with strategy.scope():
    moco = moco_lib.MoCo(_encoder(1), _encoder(2), config, global_batch)
    optimizer = optimizer_lib.SGD(moco.query_encoder.trainable_variables, 0.5, momentum=0.9)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False)

  @tf.function
  def train(batch):
    metrics = strategy.run(moco.train_step, args=(batch, optimizer, step_var))
    step_var.assign_add(1)
    return {k: strategy.reduce("SUM", v, axis=None) for k, v in metrics.items()}

  losses = []
  for batch in batches:
    r = strategy.num_replicas_in_sync
    per = global_batch // r
    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: {k: v[ctx.replica_id_in_sync_group * per:(ctx.replica_id_in_sync_group + 1)
                          * per] for k, v in batch.items()})
    losses.append(float(train(dist)["loss"]))
  return moco, losses


class MoCoStepTest(tf.test.TestCase, parameterized.TestCase):

  def test_key_encoder_starts_as_exact_copy(self):
    moco = moco_lib.MoCo(_encoder(1), _encoder(2), _config(), GLOBAL_BATCH)
    for a, b in zip(moco.query_encoder.weights, moco.key_encoder.weights):
      self.assertAllEqual(a, b)
    # Only the momentum update moves the key encoder; its BN must stay in batch-statistics mode.
    self.assertTrue(moco.key_encoder.trainable)

  @parameterized.named_parameters(("two_replicas", 2), ("eight_replicas", 8))
  def test_r_replicas_equal_one_replica(self, r):
    """R replicas (R = 8: an 8-GPU node; logical CPUs from tests/conftest.py) train exactly as one
    device on the same global batch, shuffle BN's permutation across replicas included."""
    global_batch = 4 if r == 2 else 8
    batches = _batches(16 // global_batch, global_batch)  # the queue (K = 16) fills up once
    config = _config()
    if r == 8:  # MoCHi's synthesis is an XLA function compiled once per device: 2 are enough
      config = dataclasses.replace(config, objective=dataclasses.replace(
          config.objective, mochi=mixing.MochiConfig(0, 0, 0)))
    self.assertEqual(config.bn_mode, "shuffle")
    one, losses1 = _run(tf.distribute.get_strategy(), batches, config)
    many, losses_r = _run(distribute.mirrored_strategy([f"/cpu:{i}" for i in range(r)]), batches,
                          config)
    self.assertAllClose(losses1, losses_r, atol=1e-5)
    # Replica copies are identical...
    for var in (many.queue.keys, many.queue.ptr, many.queue.ids, many.queue.labels,
                *many.key_encoder.weights):
      copies = _copies(var)
      self.assertLen(copies, r)
      for copy in copies[1:]:
        self.assertAllEqual(copies[0], copy)
    # ...and equal to the single-replica run.
    self.assertAllClose(one.queue.keys, _copies(many.queue.keys)[0], atol=1e-5)
    self.assertEqual(int(one.queue.ptr), int(_copies(many.queue.ptr)[0]))
    self.assertEqual(int(one.queue.ptr), 0)  # the steps wrote K = 16 keys
    self.assertAllEqual(one.queue.ids, np.arange(16))
    self.assertAllEqual(one.queue.labels, _copies(many.queue.labels)[0])
    for a, b in zip(one.key_encoder.weights + one.query_encoder.weights,
                    many.key_encoder.weights + many.query_encoder.weights):
      self.assertAllClose(a, _copies(b)[0], atol=1e-5)

  def test_collectives_carry_no_64_bit_integers(self):
    """At R = 2, every tensor the replica step hands to a collective is float32 or int32 (a TPU's
    collectives have no 64-bit integers XLA can emulate): the uint8 key views travel as bytes in
    int32 words, the ids and labels (fed as int64 here) folded into int32."""
    handed = []

    def spy(method, position):  # all_gather(value, axis), all_reduce(reduce_op, value)
      def record(ctx, *args, **kwargs):
        for value in map(tf.convert_to_tensor, tf.nest.flatten(args[position])):
          handed.append((value.dtype, tuple(value.shape)))
        return method(ctx, *args, **kwargs)
      return record

    rng = np.random.default_rng(0)
    batches = [dict(b, view1=rng.integers(0, 256, b["view1"].shape, dtype=np.uint8),
                    view2=rng.integers(0, 256, b["view2"].shape, dtype=np.uint8))
               for b in _batches(2)]
    config = _config(mask_duplicates=True, label_mode="oracle")
    context = tf.distribute.ReplicaContext
    with mock.patch.object(context, "all_gather", spy(context.all_gather, 0)), \
        mock.patch.object(context, "all_reduce", spy(context.all_reduce, 1)):
      many, _ = _run(distribute.mirrored_strategy(["/cpu:0", "/cpu:1"]), batches, config)
    self.assertEqual({dtype for dtype, _ in handed}, {tf.float32, tf.int32})
    # A replica's 2 key views of 4x4x3 bytes cross as 12 int32 words each, never as floats.
    self.assertIn((tf.int32, (2, 12)), handed)
    self.assertNotIn(4, [len(shape) for _, shape in handed])
    self.assertEqual(many.queue.ids.dtype, tf.int32)
    self.assertAllEqual(_copies(many.queue.ids)[0][:8], np.arange(8))

  @parameterized.named_parameters(("two_replicas", False), ("compiled", True))
  def test_uint8_key_views_give_the_keys_of_normalised_views(self, compiled):
    """Shuffle BN gathers the key views as uint8 and normalises the rows it keeps: the keys are
    bit for bit those of the views normalised first and gathered as float32 (the earlier path;
    normalised in the same function, so by the same kernels), across 2 replicas and in the
    XLA-compiled encoder with split BN (one device)."""
    if compiled and not topn.host_xla_available():
      self.skipTest("this TensorFlow build has no XLA for the CPU (tensorflow-tpu's wheel)")
    bn = "split" if compiled else "standard"  # the encoders' BN; MoCo's: split or shuffle
    config = _jit_config(bn_mode="split" if compiled else "shuffle", mochi=False)
    views = np.random.default_rng(0).integers(0, 256, (_JIT_BATCH, 8, 8, 3), dtype=np.uint8)
    step = tf.constant(5, tf.int64)
    if compiled:  # both normalise inside the XLA computation, as the compiled step does
      moco = moco_lib.MoCo(_conv_encoder(1, bn), _conv_encoder(2, bn), config, _JIT_BATCH)
      new = tf.function(lambda v: moco.encode_keys(v, step), jit_compile=True)
      old = tf.function(lambda v: moco.encode_keys(augment.to_model_input(v), step),
                        jit_compile=True)
      for fn, gathered in ((new, tf.uint8), (old, tf.float32)):  # the images shuffle BN gathers
        graph = fn.get_concrete_function(tf.constant(views)).graph
        self.assertEqual([op.inputs[0].dtype for op in graph.get_operations()
                          if op.type == "GatherV2" and op.inputs[0].shape.rank == 4], [gathered])
      keys = [[new(tf.constant(views)).numpy()], [old(tf.constant(views)).numpy()]]
    else:
      strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
      with strategy.scope():
        moco = moco_lib.MoCo(_conv_encoder(1, bn), _conv_encoder(2, bn), config, _JIT_BATCH)

      @tf.function
      def encode(v, normalise_first):
        return strategy.run(lambda x: moco.encode_keys(
            augment.to_model_input(x) if normalise_first else x, step), args=(v,))

      dist = strategy.experimental_distribute_values_from_function(
          lambda ctx: views[ctx.replica_id_in_sync_group * 2:][:2])
      keys = [[k.numpy() for k in strategy.experimental_local_results(encode(dist, first))]
              for first in (False, True)]
    for from_uint8, from_floats in zip(*keys):
      self.assertAllEqual(from_uint8, from_floats)

  def test_step_matches_a_numpy_reference(self):
    """One step by hand: momentum update, keys, InfoNCE gradient + coupled L2, SGD, enqueue."""
    config = moco_lib.MoCoConfig(queue_size=8, embedding_dim=8, momentum=0.9, bn_mode="none",
                                 weight_decay=0.01,
                                 objective=objective_lib.ObjectiveConfig(temperature=0.2))
    moco = moco_lib.MoCo(_encoder(1), _encoder(2), config, GLOBAL_BATCH)
    optimizer = optimizer_lib.SGD(moco.query_encoder.trainable_variables, 0.1, momentum=0.0)
    batch = _batches(1)[0]
    q_before = [v.numpy() for v in moco.query_encoder.trainable_variables]
    queue_before = moco.queue.keys.numpy()
    # Reference loss and gradient with an independent computation.
    with tf.GradientTape() as tape:
      q = tf.math.l2_normalize(moco.query_encoder(batch["view1"]), -1)
      k = tf.math.l2_normalize(moco.key_encoder(batch["view2"]), -1)  # m·θ + (1−m)·θ = θ
      logits = tf.concat([tf.reduce_sum(q * k, -1, keepdims=True), q @ queue_before.T], 1) / 0.2
      ref_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          tf.zeros([GLOBAL_BATCH], tf.int32), logits))
    ref_grads = tape.gradient(ref_loss, moco.query_encoder.trainable_variables)
    metrics = moco.train_step(batch, optimizer, tf.constant(0, tf.int64))
    self.assertAllClose(metrics["loss"], ref_loss, atol=1e-5)
    for before, g, after in zip(q_before, ref_grads, moco.query_encoder.trainable_variables):
      self.assertAllClose(after, before - 0.1 * (g + 0.01 * before), atol=1e-5)
    self.assertAllClose(moco.queue.keys[:4], k, atol=1e-5)
    self.assertAllEqual(moco.queue.keys[4:], queue_before[4:])
    self.assertEqual(int(moco.queue.ptr), 4)

  def test_uint8_views_are_normalised_in_the_step(self):
    """The input pipeline's uint8 views and their normalised floats give the same step."""
    rng = np.random.default_rng(0)
    views = {k: rng.integers(0, 256, (GLOBAL_BATCH, 4, 4, 3), dtype=np.uint8)
             for k in ("view1", "view2")}
    results = []
    for batch in (dict(views), {k: augment.to_model_input(tf.constant(v)).numpy()
                                for k, v in views.items()}):
      moco = moco_lib.MoCo(_encoder(1), _encoder(2), _config(), GLOBAL_BATCH)
      optimizer = optimizer_lib.SGD(moco.query_encoder.trainable_variables, 0.1, momentum=0.0)
      metrics = moco.train_step(dict(batch, id=np.arange(GLOBAL_BATCH, dtype=np.int64)),
                                optimizer, tf.constant(0, tf.int64))
      results.append((float(metrics["loss"]), moco.queue.keys.numpy()))
    self.assertAllClose(results[0][0], results[1][0], atol=1e-6)
    self.assertAllClose(results[0][1], results[1][1], atol=1e-6)

  def test_mochi_warmup_and_metrics(self):
    moco = moco_lib.MoCo(_encoder(1), _encoder(2), _config(), GLOBAL_BATCH)
    optimizer = optimizer_lib.SGD(moco.query_encoder.trainable_variables, 0.1, momentum=0.0)
    batch = _batches(1)[0]
    m0 = moco.train_step(batch, optimizer, tf.constant(0, tf.int64))  # warm-up: no synthesis
    self.assertEqual(float(m0["synthetic_logit"]), 0.0)
    m1 = moco.train_step(batch, optimizer, tf.constant(1, tf.int64))
    self.assertNotEqual(float(m1["synthetic_logit"]), 0.0)
    for key in ("loss", "acc1", "acc5", "hardest_negative", "finite", "momentum"):
      self.assertTrue(np.isfinite(m1[key]), key)
    self.assertEqual(float(m1["finite"]), 1.0)

  def test_cosine_momentum(self):
    cfg = moco_lib.MoCoConfig(queue_size=16, embedding_dim=8, momentum=0.99,
                              momentum_schedule="cosine", total_steps=10)
    moco = moco_lib.MoCo(_encoder(1), _encoder(2), cfg, GLOBAL_BATCH)
    self.assertAllClose(moco.momentum_at(0), 0.99)
    self.assertAllClose(moco.momentum_at(10), 1.0)

  @parameterized.parameters(
      (dict(queue_size=10), "multiple of the global batch size 4"),
      (dict(momentum=1.0), r"moco_momentum \(m\)"),
      (dict(bn_mode="ghost"), "bn_mode must be one of shuffle, split, sync, none"),
      (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
  )
  def test_bad_config(self, override, pattern):
    kw = dict(queue_size=16, embedding_dim=8)
    kw.update(override)
    with self.assertRaisesRegex(ValueError, pattern):
      moco_lib.MoCoConfig(**kw).validate(GLOBAL_BATCH)


if __name__ == "__main__":
  tf.test.main()


def _sqrt_encoder(seed):
  """An encoder whose gradient is NaN (sqrt at 0) while its loss stays finite on zero images."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(16, use_bias=False),
      keras.layers.Lambda(lambda x: tf.sqrt(tf.abs(x))), keras.layers.BatchNormalization(),
      keras.layers.Dense(8)])


def _state(moco, optimizer, loss_scale=None):
  """Every variable a step may touch: {name: [per-replica copies]}."""
  named = {f"q/{v.path}": v for v in moco.query_encoder.weights}
  named.update({f"k/{v.path}": v for v in moco.key_encoder.weights})
  named.update({f"buf{i}": v for i, v in enumerate(optimizer.momentum_buffers)})
  named.update(keys=moco.queue.keys, ptr=moco.queue.ptr, ids=moco.queue.ids)
  if loss_scale is not None:
    named["scale"] = loss_scale.scale
  out = {}
  for name, var in named.items():
    inner = getattr(var, "_value", var)
    out[name] = ([v.numpy() for v in inner.values]
                 if isinstance(inner, tf.distribute.DistributedValues) else [inner.numpy()])
  return out


class SkipDecisionTest(tf.test.TestCase, parameterized.TestCase):
  """One decision for all replicas, from the all-reduced gradients (issue: only replica 0 used
  to decide whether a step was skipped)."""

  @parameterized.named_parameters(("nan_gradient_on_replica_1_then_0", None),
                                  ("loss_scale_overflow", 2.0 ** 127))
  def test_skipped_step_leaves_every_replica_as_it_was(self, initial_scale):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    config = moco_lib.MoCoConfig(queue_size=16, embedding_dim=8, momentum=0.9,
                                 bn_mode="shuffle", weight_decay=1e-2, seed=3,
                                 objective=objective_lib.ObjectiveConfig(temperature=0.2))
    with strategy.scope():
      moco = moco_lib.MoCo(_sqrt_encoder(1), _sqrt_encoder(2), config, GLOBAL_BATCH)
      optimizer = optimizer_lib.SGD(moco.query_encoder.trainable_variables, 0.5, momentum=0.9)
      loss_scale = (optimizer_lib.DynamicLossScale(initial_scale) if initial_scale else None)
      step_var = tf.Variable(0, dtype=tf.int64, trainable=False)

    @tf.function
    def train(batch):
      metrics = strategy.run(moco.train_step, args=(batch, optimizer, step_var, True,
                                                    loss_scale))
      step_var.assign_add(1)
      return {k: strategy.reduce("SUM", v, axis=None) for k, v in metrics.items()}

    def distributed(batch, bad_replica):
      def fn(ctx):
        r = ctx.replica_id_in_sync_group
        part = {k: v[r * 2:(r + 1) * 2] for k, v in batch.items()}
        if r == bad_replica:
          part["view1"] = np.zeros_like(part["view1"])  # sqrt'(0): NaN gradient, finite loss
        return part
      return strategy.experimental_distribute_values_from_function(fn)

    batches = _batches(3)
    if loss_scale is None:
      self.assertEqual(float(train(distributed(batches[0], None))["finite"]), 1.0)
      cases = [(batches[1], 1), (batches[2], 0)]  # the inf on replica 1 only, then on 0 only
    else:
      cases = [(batches[1], None)]  # scale 2^127: the scaled gradients overflow everywhere
    for batch, bad_replica in cases:
      before = _state(moco, optimizer, loss_scale)
      metrics = train(distributed(batch, bad_replica))
      after = _state(moco, optimizer, loss_scale)
      self.assertTrue(np.isfinite(float(metrics["loss"])))
      if loss_scale is None:
        self.assertEqual(float(metrics["finite"]), 0.0)  # a non-finite step...
        self.assertEqual(float(metrics["loss_scale_skip"]), 0.0)
      else:
        self.assertEqual(float(metrics["finite"]), 1.0)  # ...an overflow is not one
        self.assertEqual(float(metrics["loss_scale_skip"]), 1.0)
        self.assertEqual(after.pop("scale"), [2.0 ** 126] * 2)
        before.pop("scale")
      for name, copies in after.items():
        self.assertLen(copies, 2)
        for copy, old in zip(copies, before[name]):
          self.assertTrue(np.all(np.isfinite(copy)), name)
          self.assertAllEqual(copy, old, msg=name)  # unchanged, so identical on both replicas

  def test_skipped_step_still_advances_the_learning_rate_step(self):
    """The step counter drives lr too: after a skipped step 1, step 2 uses lr(2), not lr(1)."""
    config = moco_lib.MoCoConfig(queue_size=16, embedding_dim=8, momentum=0.9, bn_mode="none",
                                 weight_decay=0.0,
                                 objective=objective_lib.ObjectiveConfig(temperature=0.2))
    moco = moco_lib.MoCo(_encoder(1), _encoder(2), config, GLOBAL_BATCH)
    lr = lambda step: tf.where(step < 2, 0.5, 0.0)  # noqa: E731
    optimizer = optimizer_lib.SGD(moco.query_encoder.trainable_variables, lr, momentum=0.9)
    batches = _batches(3)
    batches[1]["view1"] = batches[1]["view1"] * np.nan
    lrs = []
    for step, batch in enumerate(batches):
      metrics = moco.train_step(batch, optimizer, tf.constant(step, tf.int64),
                                skip_nonfinite=True)
      lrs.append(float(metrics["lr"]))
      if step == 0:
        after_first = [v.numpy() for v in moco.query_encoder.trainable_variables]
    self.assertEqual(lrs, [0.5, 0.5, 0.0])
    for v, old in zip(moco.query_encoder.trainable_variables, after_first):
      self.assertAllEqual(v, old)  # step 1 skipped, step 2 at lr 0


class KeyEncoderBatchNormTest(tf.test.TestCase):

  def test_key_encoder_normalises_with_batch_statistics(self):
    """The momentum encoder's BN runs in training mode (batch statistics, moving stats updated)."""
    def enc(seed):
      keras.utils.set_random_seed(seed)
      return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                               keras.layers.Dense(8), keras.layers.BatchNormalization()])
    cfg = moco_lib.MoCoConfig(queue_size=16, embedding_dim=8, bn_mode="none")
    moco = moco_lib.MoCo(enc(1), enc(2), cfg, GLOBAL_BATCH)
    bn = moco.key_encoder.layers[-1]
    before = bn.moving_mean.numpy().copy()
    moco.encode_keys(_batches(1)[0]["view2"] + 3.0, tf.constant(0))
    self.assertNotAllClose(bn.moving_mean, before)


# -------------------------------------------------------------------------------------------------
# The replica step under XLA (--jit_compile; what a TPU compiles).

_JIT_BATCH = 4


def _conv_encoder(seed, bn_mode="standard"):
  """A two-convolution encoder of tfmochi's own layers: `models.Conv2D` on both of its custom
  paths (3x3 "same", its input gradient as a convolution; 1x1 stride 2 as a matmul), the run's
  BN kind, pooling and a dense projection: the layer types of resnet10_tiny, at a fraction of its
  XLA compile time (about 40 s per variant here, which a dozen objectives cannot afford)."""
  from tfmochi import models  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((8, 8, 3)),
      models.Conv2D(8, 3, padding="same", use_bias=False),
      models.make_batch_norm("bn", bn_mode, bn_splits=2),
      keras.layers.ReLU(),
      models.Conv2D(8, 1, strides=2, padding="valid", use_bias=False),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(8)])


def _jit_config(bn_mode="shuffle", mochi=True, **objective_kw):
  objective = objective_lib.ObjectiveConfig(temperature=0.2, mask_duplicates=True,
                             mochi=mixing.MochiConfig(4, 3, 2) if mochi else
                             mixing.MochiConfig(0, 0, 0), **objective_kw)
  return moco_lib.MoCoConfig(queue_size=16, embedding_dim=8, momentum=0.9, bn_mode=bn_mode,
                             weight_decay=1e-2, mochi_warmup_steps=1, seed=3, objective=objective)


def _jit_batches(n):
  rng = np.random.default_rng(1)
  return [{"view1": tf.constant(rng.normal(size=(_JIT_BATCH, 8, 8, 3)), tf.float32),
           "view2": tf.constant(rng.normal(size=(_JIT_BATCH, 8, 8, 3)), tf.float32),
           "id": tf.constant(np.arange(_JIT_BATCH) + _JIT_BATCH * i, tf.int64),
           "label": tf.constant(np.arange(_JIT_BATCH) % 2, tf.int64)} for i in range(n)]


def _run_step(config, encoder_bn, jit, batches, skip_nonfinite=False, float16=False):
  """Trains len(batches) steps through the trainer's replica-step wrapper; returns the model, the
  optimizer (and loss scale), the per-step metrics and the step function."""
  moco = moco_lib.MoCo(_conv_encoder(1, encoder_bn), _conv_encoder(2, encoder_bn), config,
                       _JIT_BATCH)
  optimizer = optimizer_lib.SGD(moco.query_encoder.trainable_variables, 0.05, momentum=0.9)
  # float16 as the trainer runs it: dynamic loss scaling, here from a scale that overflows.
  loss_scale = optimizer_lib.DynamicLossScale(2.0**18) if float16 else None
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  fn = distribute.replica_step_function(
      lambda b: moco.train_step(b, optimizer, step, skip_nonfinite=skip_nonfinite,
                                loss_scale=loss_scale), jit,
      tf.distribute.get_strategy())
  metrics = []
  for batch in batches:
    metrics.append({k: float(v) for k, v in fn(batch).items()})
    step.assign_add(1)
  state = list(optimizer.variables) + (list(loss_scale.variables) if float16 else [])
  return moco, state, metrics, fn


# Every objective a config can select, in four steps to compile (XLA compile time dominates the
# cost of these tests): each option appears at least once, every step with MoCHi crosses the
# warm-up (step 0 plain, step 1 mixed). MoCo v2 runs with --nonfinite=skip and a third, NaN
# batch; MoCHi + debiased in float16 with a loss scale that overflows (skipped, halved) before it
# fits. On one device "shuffle" BN is the plain key encoder (its cross-replica index arithmetic is
# compiled separately below, at R = 8).
_OBJECTIVES = {
    "moco_v2": (dict(mochi=False, skip_nonfinite=True), "standard", "float32"),
    "mochi_debiased_float16": (dict(loss="debiased"), "standard", "float16"),
    "mochi_hard_drop_oracle_split_bn": (
        dict(loss="hard", drop_hardest=25.0, label_mode="oracle", bn_mode="split"), "split",
        "float32"),
    "mochi_supcon_keep_sync_bn_bfloat16": (
        dict(label_mode="supcon", keep_hardest=50.0, bn_mode="sync"), "sync", "bfloat16"),
}


def _dynamic_shapes(hlo: str) -> list[str]:
  """The HLO instructions with a dynamic dimension: XLA writes a bounded one as "f32[<=8]".

  (TF's TopK lowering emits `set-dimension-size` to its constant k: its result stays static.)
  """
  import re  # pylint: disable=g-import-not-at-top
  return [line.strip()[:200] for line in hlo.splitlines() if re.search(r"\[[^\]]*<=", line)]


# The HLO instructions that must not see a 64-bit integer: a TPU emulates s64/u64 with pairs of
# 32-bit words, and XLA's rewriting of them ("X64 rewriting") fails on sorts, reductions,
# collectives and scatters, which XLA:CPU runs natively (so only the HLO shows the problem here).
_NO_64_BIT = frozenset(["sort", "reduce", "scatter", "all-reduce", "all-reduce-start",
                        "all-gather", "all-gather-start", "all-to-all", "reduce-scatter",
                        "collective-permute", "collective-permute-start"])
# `%name = shape opcode(operands), attributes`; a tuple shape "(s64[8]{0}, s32[8]{0})" has spaces.
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_WIDE_INT = re.compile(r"\b[su]64\[")


def _operands(text: str) -> str:
  """The operand list at the start of `text` (after the opcode's "("), up to its closing ")"."""
  depth = 1
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return text[:i]
  return text


def _wide_integer_ops(hlo: str) -> list[str]:
  """The instructions of an HLO module in `_NO_64_BIT` with an s64/u64 result or operand.

  Operands are looked up by name: optimized HLO writes `sort(%a, %b)` without their shapes
  (instruction names are unique within a module).
  """
  shapes, candidates = {}, []
  for line in hlo.splitlines():
    match = _HLO_LINE.match(line)
    if match:
      name, shape, opcode, rest = match.groups()
      shapes[name] = shape
      if opcode in _NO_64_BIT:
        candidates.append((line.strip(), shape, _operands(rest)))
  found = []
  for line, shape, operands in candidates:
    operand_shapes = [shapes.get(name, "") for name in re.findall(r"%([\w.\-]+)", operands)]
    if any(_WIDE_INT.search(text) for text in [shape, operands] + operand_shapes):
      found.append(line[:200])
  return found


def _fed_as_the_trainer_feeds(batch: dict) -> dict:
  """A `_jit_batches` batch as the input pipeline sends it: uint8 views (int64 ids/labels kept,
  the strictest input: the step folds them to int32 itself)."""
  u8 = lambda x: tf.cast(tf.clip_by_value(x * 40.0 + 128.0, 0.0, 255.0), tf.uint8)  # noqa: E731
  return dict(batch, view1=u8(batch["view1"]), view2=u8(batch["view2"]))


class HloCheckerTest(tf.test.TestCase):

  def test_finds_64_bit_sorts_scatters_and_collectives_only(self):
    hlo = """HloModule m
%compare (a: s64[], b: s64[]) -> pred[] {
  %a = s64[] parameter(0)
  %b = s64[] parameter(1)
  ROOT %gt = pred[] compare(s64[] %a, s64[] %b), direction=GT
}
ENTRY %main (p: s64[8], f: f32[8]) -> f32[] {
  %p = s64[8]{0} parameter(0)
  %iota = s32[8]{0} iota(), iota_dimension=0
  %wide_sort = (s64[8]{0}, s32[8]{0}) sort(%p, %iota), dimensions={0}, to_apply=%compare
  %narrow_sort = (s32[8]{0}, s32[8]{0}) sort(s32[8]{0} %iota, s32[8]{0} %iota), dimensions={0}
  %idx = s64[2,1]{1,0} slice(%p), slice={[0:2]}
  %f = f32[8]{0} parameter(1)
  %wide_scatter = f32[8]{0} scatter(f32[8]{0} %f, s64[2,1]{1,0} %idx, f32[2]{0} %u)
  %gather = f32[2]{0} gather(f32[8]{0} %f, s64[2,1]{1,0} %idx), slice_sizes={1}
  %wide_sum = s64[] all-reduce(%p), replica_groups={}, to_apply=%add
  ROOT %sum = f32[] reduce(f32[8]{0} %f, f32[] %zero), dimensions={0}, to_apply=%add
}"""
    found = [line.split(" =")[0] for line in _wide_integer_ops(hlo)]
    self.assertEqual(found, ["%wide_sort", "%wide_scatter", "%wide_sum"])
    self.assertEmpty(_wide_integer_ops(hlo.replace("s64", "s32")))


@testdata.needs_host_xla
class JitStepTest(tf.test.TestCase, parameterized.TestCase):
  """The XLA-compiled replica step equals the plain one.

  How "no op outside XLA" is proven: `replica_step_function` wraps the step in
  `tf.function(jit_compile=True)`, which compiles the whole function as one XLA cluster and raises
  (InvalidArgumentError "Detected unsupported operations") instead of running any op it cannot
  compile with TensorFlow's kernels; a passing call is therefore entirely XLA. "No dynamic shapes":
  XLA needs a compile-time constant for every shape, and the HLO of the step has no bounded-dynamic
  dimension ("<=") and no get/set-dimension-size op.
  """

  @parameterized.named_parameters(*[(name, name) for name in _OBJECTIVES])
  def test_jit_step_equals_plain_step(self, name):
    kw, encoder_bn, precision = _OBJECTIVES[name]
    kw = dict(kw)
    bn_mode = kw.pop("bn_mode", "shuffle")
    mochi = kw.pop("mochi", True)
    skip = kw.pop("skip_nonfinite", False)
    config = _jit_config(bn_mode=bn_mode, mochi=mochi, **kw)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(
        "float32" if precision == "float32" else f"mixed_{precision}")
    self.addCleanup(keras.mixed_precision.set_global_policy, policy)
    batches = _jit_batches(6 if precision == "float16" else 2)
    if skip:
      batches.append(dict(batches[0], view1=batches[0]["view1"] * np.nan))
    f16 = precision == "float16"
    plain, plain_opt, plain_metrics, _ = _run_step(config, encoder_bn, False, batches, skip, f16)
    jit, jit_opt, jit_metrics, fn = _run_step(config, encoder_bn, True, batches, skip, f16)
    self.assertEqual(fn.experimental_get_tracing_count(), 1)
    if skip:  # the NaN step is skipped alike: nothing written (compared below)
      self.assertEqual([m["finite"] for m in jit_metrics], [1.0, 1.0, 0.0])
      plain_metrics, jit_metrics = plain_metrics[:2], jit_metrics[:2]
    # bfloat16 keeps ~3 significant digits, and XLA rounds in other places than TF's kernels.
    tol = 2e-4 if precision == "float32" else 2e-2
    for p, j in zip(plain_metrics, jit_metrics):
      self.assertAllClose(p, j, atol=5 * tol, rtol=5 * tol)
    if f16:  # the first step overflows the scale: skipped alike, then training goes on
      self.assertEqual([m["loss_scale_skip"] for m in plain_metrics],
                       [m["loss_scale_skip"] for m in jit_metrics])
      skips = [m["loss_scale_skip"] for m in jit_metrics]
      self.assertEqual((skips[0], skips[-1]), (1.0, 0.0))  # the scale halved until it fit
    if mochi:  # the warm-up flipped after the first step, without a retrace
      self.assertEqual(jit_metrics[0]["synthetic_logit"], 0.0)
      self.assertNotEqual(jit_metrics[-1]["synthetic_logit"], 0.0)
    for a, b in zip(plain.query_encoder.weights + plain.key_encoder.weights
                    + plain_opt, jit.query_encoder.weights + jit.key_encoder.weights
                    + jit_opt):
      self.assertAllClose(a, b, atol=tol, rtol=tol, msg=a.path if hasattr(a, "path") else a.name)
    self.assertAllClose(plain.queue.keys, jit.queue.keys, atol=tol)
    for a, b in ((plain.queue.ids, jit.queue.ids), (plain.queue.labels, jit.queue.labels),
                 (plain.queue.ptr, jit.queue.ptr)):
      self.assertAllEqual(a, b)
    applied = sum(m["finite"] == 1.0 and not m.get("loss_scale_skip") for m in jit_metrics)
    self.assertEqual(int(jit.queue.ptr), applied * _JIT_BATCH)
    if name == "mochi_hard_drop_oracle_split_bn":
      hlo = fn.experimental_get_compiler_ir(batches[0])(stage="hlo")
      self.assertEmpty(_dynamic_shapes(hlo))

  def test_compiled_step_has_no_64_bit_sort_collective_or_scatter(self):
    """What a TPU compiles has no 64-bit integer where XLA cannot emulate one: the step with the
    permutation drawn (split BN), MoCHi on, duplicate masking and the class oracle, fed as the
    input pipeline feeds it (uint8 views) with int64 ids and labels, in the HLO XLA receives and
    in the HLO it optimised. The int64 step counter and RNG seeds stay, in elementwise ops only."""
    config = _jit_config(bn_mode="split", label_mode="oracle")
    self.assertTrue(config.objective.mask_duplicates and config.objective.mochi.enabled)
    batches = [_fed_as_the_trainer_feeds(b) for b in _jit_batches(2)]
    _, _, metrics, fn = _run_step(config, "split", True, batches)
    self.assertNotEqual(metrics[-1]["synthetic_logit"], 0.0)  # MoCHi ran
    for stage in ("hlo", "optimized_hlo"):
      hlo = fn.experimental_get_compiler_ir(batches[0])(stage=stage)
      opcodes = {m.group(3) for m in map(_HLO_LINE.match, hlo.splitlines()) if m}
      self.assertContainsSubset({"sort", "scatter", "reduce"}, opcodes)  # the checks bite
      self.assertEmpty(_wide_integer_ops(hlo), stage)

  def test_shuffle_bn_indices_compiled_at_eight_replicas(self):
    """The TPU stand-in for shuffle BN across replicas: its index arithmetic, compiled with the
    replica id and count as tensors (R = 8), equals the plain computation on every replica, and
    the all-gather / un-shuffle it drives returns each replica its own keys."""
    r, b = 8, 3

    @tf.function(jit_compile=True)
    def compiled(step, replica_id, num_replicas):
      return moco_lib.shuffle_bn_indices(3, step, replica_id, num_replicas, b)

    x = np.random.default_rng(0).normal(size=(r * b, 5)).astype(np.float32)
    encode = lambda rows: np.tanh(rows * 2.0)  # any row-wise encoder  # noqa: E731
    for step in (0, 7):
      mine, back = [], []
      for replica in range(r):
        m, k = compiled(tf.constant(step, tf.int64), tf.constant(replica), tf.constant(r))
        pm, pk = moco_lib.shuffle_bn_indices(3, tf.constant(step, tf.int64), replica, r, b)
        self.assertAllEqual(m, pm)
        self.assertAllEqual(k, pk)
        mine.append(m.numpy())
        back.append(k.numpy())
      perm = np.concatenate(mine)
      self.assertAllEqual(np.sort(perm), np.arange(r * b))  # a permutation of the global batch
      self.assertNotAllEqual(perm, np.arange(r * b))
      all_k = np.concatenate([encode(x[m]) for m in mine])  # all_gather of the permuted keys
      for replica in range(r):
        self.assertAllClose(all_k[back[replica]], encode(x[replica * b:(replica + 1) * b]))
    self.assertEqual(compiled.experimental_get_tracing_count(), 1)
    ir = compiled.experimental_get_compiler_ir(tf.constant(0, tf.int64), tf.constant(5),
                                               tf.constant(r))
    self.assertEmpty(_dynamic_shapes(ir(stage="hlo")))
    for stage in ("hlo", "optimized_hlo"):  # the permutation is a sort of int32 draws
      self.assertIn(" sort(", ir(stage=stage))
      self.assertEmpty(_wide_integer_ops(ir(stage=stage)), stage)
