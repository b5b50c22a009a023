"""Tests of tfmochi.momentum: the EMA rule, trainable-only pairing, the cosine schedule."""

import keras
import tensorflow as tf

from tfmochi import momentum


def _model():
  return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                           keras.layers.BatchNormalization()])


class MomentumTest(tf.test.TestCase):

  def test_e1_update_rule(self):
    """docs/ALGORITHMS.md §10, E1: θk = [1, 2], θq = [3, −1], m = 0.999 -> [1.002, 1.997]."""
    k, q = tf.Variable([1.0, 2.0]), tf.Variable([3.0, -1.0])
    momentum.momentum_update([(k, q)], 0.999)
    self.assertAllClose(k, [1.002, 1.997], atol=1e-6)

  def test_pairs_cover_trainable_weights_only(self):
    q_model, k_model = _model(), _model()
    pairs = momentum.weight_pairs(q_model, k_model)
    self.assertLen(pairs, 4)  # kernel, bias, gamma, beta; not the BN moving statistics
    k_model.layers[1].moving_mean.assign([5.0, 5.0])
    momentum.momentum_update(pairs, 0.0)  # m = 0 copies θq
    for k_var, q_var in pairs:
      self.assertAllEqual(k_var, q_var)
    self.assertAllEqual(k_model.layers[1].moving_mean, [5.0, 5.0])  # its own statistics
    before = [v.numpy() for v in k_model.weights]
    for v in q_model.trainable_weights:
      v.assign(v + 1.0)
    momentum.momentum_update(pairs, 0.999999)
    for a, b in zip(before, k_model.weights):
      self.assertAllClose(a, b, atol=1e-5)

  def test_mismatched_models(self):
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    with self.assertRaisesRegex(ValueError, "differ"):
      momentum.weight_pairs(_model(), other)

  def test_cosine_schedule(self):
    self.assertAllClose(momentum.cosine_momentum(0, 100, 0.99), 0.99)
    self.assertAllClose(momentum.cosine_momentum(50, 100, 0.99), 0.995)
    self.assertAllClose(momentum.cosine_momentum(100, 100, 0.99), 1.0)
    self.assertAllClose(momentum.cosine_momentum(200, 100, 0.99), 1.0)

  def test_check(self):
    for bad in (-0.1, 1.0, 2):
      with self.assertRaisesRegex(ValueError, r"moco_momentum \(m\) must be in \[0, 1\)"):
        momentum.check_momentum(bad)


if __name__ == "__main__":
  tf.test.main()
