"""Tests of tfmochi.moco: one MoCo/MoCHi step; 2 replicas == 1 replica for the same global batch."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfmochi import augment
from tfmochi import distribute
from tfmochi import head as head_lib
from tfmochi import mixing
from tfmochi import moco as moco_lib
from tfmochi import optimizer as optimizer_lib

GLOBAL_BATCH = 4


def _encoder(seed):
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)])
  return model


def _config(**head_kw):
  head = head_lib.HeadConfig(temperature=0.2, mochi=mixing.MochiConfig(4, 3, 2), **head_kw)
  return moco_lib.MoCoConfig(queue_size=16, embedding_dim=8, momentum=0.9, bn_mode="shuffle",
                             weight_decay=1e-2, mochi_warmup_steps=1, seed=3, head=head)


def _batches(n):
  rng = np.random.default_rng(0)
  return [{"view1": rng.normal(size=(GLOBAL_BATCH, 4, 4, 3)).astype(np.float32),
           "view2": rng.normal(size=(GLOBAL_BATCH, 4, 4, 3)).astype(np.float32),
           "id": np.arange(GLOBAL_BATCH, dtype=np.int64) + GLOBAL_BATCH * i,
           "label": np.arange(GLOBAL_BATCH, dtype=np.int64) % 2} for i in range(n)]


def _copies(var):
  """The per-replica copies of a (tf or Keras) mirrored variable, as NumPy arrays."""
  var = getattr(var, "_value", var)  # a keras.Variable wraps the tf.Variable
  return [v.numpy() for v in var.values]


def _run(strategy, batches, config):
  with strategy.scope():
    moco = moco_lib.MoCo(_encoder(1), _encoder(2), config, GLOBAL_BATCH)
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
    per = GLOBAL_BATCH // r
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

  def test_two_replicas_equal_one_replica(self):
    batches = _batches(4)
    one, losses1 = _run(tf.distribute.get_strategy(), batches, _config())
    two, losses2 = _run(distribute.mirrored_strategy(["/cpu:0", "/cpu:1"]), batches, _config())
    self.assertAllClose(losses1, losses2, atol=1e-5)
    # Replica copies are identical...
    for var in (two.queue.keys, two.queue.ptr, two.queue.ids, *two.key_encoder.weights):
      copies = _copies(var)
      self.assertLen(copies, 2)
      self.assertAllEqual(copies[0], copies[1])
    # ...and equal to the single-replica run.
    self.assertAllClose(one.queue.keys, _copies(two.queue.keys)[0], atol=1e-5)
    self.assertEqual(int(one.queue.ptr), int(_copies(two.queue.ptr)[0]))
    self.assertEqual(int(one.queue.ptr), 0)  # 4 steps x 4 keys = K
    self.assertAllEqual(one.queue.ids, np.arange(16))
    for a, b in zip(one.key_encoder.weights + one.query_encoder.weights,
                    two.key_encoder.weights + two.query_encoder.weights):
      self.assertAllClose(a, _copies(b)[0], atol=1e-5)

  def test_step_matches_a_numpy_reference(self):
    """One step by hand: momentum update, keys, InfoNCE gradient + coupled L2, SGD, enqueue."""
    config = moco_lib.MoCoConfig(queue_size=8, embedding_dim=8, momentum=0.9, bn_mode="none",
                                 weight_decay=0.01, head=head_lib.HeadConfig(temperature=0.2))
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
      optimizer = keras.optimizers.SGD(0.1)
      optimizer.build(moco.query_encoder.trainable_variables)
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
                                 head=head_lib.HeadConfig(temperature=0.2))
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
                                 weight_decay=0.0, head=head_lib.HeadConfig(temperature=0.2))
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
