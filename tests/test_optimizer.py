"""Tests of tfmochi.optimizer: PyTorch's SGD against a NumPy reference, skipped updates,
checkpoints (and old runs' Keras optimizer state), dynamic loss scaling."""

import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfmochi import optimizer as optimizer_lib

LRS = [0.5, 0.5, 0.1, 0.02, 0.3]  # a changing learning rate (warm-up, decay, a restart)


def _torch_sgd_reference(p, grads, lrs, momentum, weight_decay, nesterov):
  """torch.optim.SGD.step (dampening 0) in NumPy, one call per (g, lr)."""
  p, buf = p.copy(), None
  for g, lr in zip(grads, lrs):
    d_p = g + weight_decay * p
    buf = d_p.copy() if buf is None else momentum * buf + d_p
    p = p - lr * (d_p + momentum * buf if nesterov else buf)
  return p, buf


class SGDTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((0.9, 0.0, False), (0.9, 1e-2, False), (0.9, 1e-2, True),
                            (0.0, 1e-2, False))
  def test_matches_pytorch_with_a_changing_lr(self, momentum, weight_decay, nesterov):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 2)).astype(np.float32)
    grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in LRS]
    var = tf.Variable(p0)
    opt = optimizer_lib.SGD([var], momentum=momentum, weight_decay=weight_decay,
                            nesterov=nesterov)
    for g, lr in zip(grads, LRS):
      opt.apply([tf.constant(g)], [var], lr)
    ref_p, ref_buf = _torch_sgd_reference(p0, grads, LRS, momentum, weight_decay, nesterov)
    self.assertAllClose(var, ref_p, atol=1e-6)
    self.assertAllClose(opt.momentum_buffers[0], ref_buf, atol=1e-6)

  def test_keras_sgd_differs_when_the_lr_changes(self):
    """Why tfmochi has its own SGD: Keras' velocity keeps the old lr after a change."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 2)).astype(np.float32)
    grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in LRS]
    var = keras.Variable(p0)
    keras_sgd = keras.optimizers.SGD(learning_rate=LRS[0], momentum=0.9)
    for g, step_lr in zip(grads, LRS):
      keras_sgd.learning_rate = step_lr
      keras_sgd.apply_gradients([(tf.constant(g), var)])
    ref_p, _ = _torch_sgd_reference(p0, grads, LRS, 0.9, 0.0, False)
    self.assertGreater(np.abs(var.numpy() - ref_p).max(), 1e-2)

  def test_schedule_is_read_at_the_given_step(self):
    opt = optimizer_lib.SGD([tf.Variable([0.0])], learning_rate=lambda step: 0.1 * tf.cast(step, tf.float32))
    self.assertAllClose(opt.learning_rate_at(tf.constant(3, tf.int64)), 0.3)
    self.assertAllClose(optimizer_lib.SGD([tf.Variable([0.0])], 0.2).learning_rate_at(7), 0.2)

  def test_disabled_update_leaves_everything_even_with_nan(self):
    var = tf.Variable([1.0, 2.0])
    opt = optimizer_lib.SGD([var], momentum=0.9, weight_decay=0.1)
    opt.apply([tf.constant([1.0, 1.0])], [var], 0.1)
    before = (var.numpy().copy(), opt.momentum_buffers[0].numpy().copy())
    opt.apply([tf.constant([np.nan, np.inf])], [var], 0.1, enabled=tf.constant(False))
    self.assertAllEqual(var, before[0])
    self.assertAllEqual(opt.momentum_buffers[0], before[1])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, r"momentum must be in \[0, 1\)"):
      optimizer_lib.SGD([], momentum=1.0)
    with self.assertRaisesRegex(ValueError, "weight_decay must be >= 0"):
      optimizer_lib.SGD([], weight_decay=-1.0)
    with self.assertRaisesRegex(ValueError, "built for 1 variables"):
      optimizer_lib.SGD([tf.Variable([0.0])]).apply([], [], 0.1)


class CheckpointTest(tf.test.TestCase):

  def test_buffers_checkpoint_and_restore(self):
    var = tf.Variable([1.0, 2.0])
    opt = optimizer_lib.SGD([var], momentum=0.9)
    opt.apply([tf.constant([1.0, -1.0])], [var], 0.1)
    path = tf.train.Checkpoint(optimizer=opt).save(os.path.join(self.get_temp_dir(), "sgd"))
    optimizer_lib.check_checkpoint(path)  # the current layout passes
    fresh = optimizer_lib.SGD([tf.Variable([0.0, 0.0])], momentum=0.9)
    tf.train.Checkpoint(optimizer=fresh).restore(path).assert_existing_objects_matched()
    self.assertAllEqual(fresh.momentum_buffers[0], [1.0, -1.0])

  def test_keras_optimizer_checkpoint_gets_one_clear_message(self):
    var = keras.Variable([1.0, 2.0])
    for old in (keras.optimizers.SGD(0.1, momentum=0.9),
                keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1, momentum=0.9))):
      old.build([var])
      path = tf.train.Checkpoint(optimizer=old).save(os.path.join(self.get_temp_dir(), "old"))
      with self.assertRaisesRegex(optimizer_lib.LegacyCheckpointError,
                                  "Keras' SGD.*cannot be resumed exactly.*new --model_dir"):
        optimizer_lib.check_checkpoint(path)


class DynamicLossScaleTest(tf.test.TestCase):

  def test_halves_on_overflow_doubles_after_good_steps_never_below_one(self):
    scale = optimizer_lib.DynamicLossScale(4.0, growth_steps=2)
    history = []
    for finite in (False, True, True, True, False, False, False, False):
      scale.update(tf.constant(finite))
      history.append(float(scale.scale.numpy()))
    self.assertEqual(history, [2.0, 2.0, 4.0, 4.0, 2.0, 1.0, 1.0, 1.0])
    self.assertFalse(bool(scale.can_overflow()))
    scale.update(tf.constant(True), enabled=tf.constant(False))  # e.g. a NaN loss: untouched
    self.assertEqual(int(scale.good_steps.numpy()), 0)
    with self.assertRaisesRegex(ValueError, r"initial loss scale must be in \[1, 2\^127\]"):
      optimizer_lib.DynamicLossScale(0.5)


if __name__ == "__main__":
  tf.test.main()
