"""Tests of tfmochi.distribute: strategy construction and cross-replica gathers on 2 logical CPUs."""

import numpy as np
import tensorflow as tf

from tfmochi import distribute


def _gather_ids(strategy, dtype):
  """Every replica all-gathers its replica id (as `dtype`); returns the per-replica results."""

  @tf.function
  def step():
    def fn():
      ctx = tf.distribute.get_replica_context()
      return distribute.all_gather(tf.cast(ctx.replica_id_in_sync_group, dtype)[None], axis=0)
    return strategy.run(fn)

  return [t.numpy() for t in strategy.experimental_local_results(step())]


class MirroredStrategyTest(tf.test.TestCase):

  def test_strategies_in_one_process_do_not_share_collective_keys(self):
    # Plain MirroredStrategy objects all start at collective instance 100: the second one's
    # float gather would hit the first one's int gather ("expected type 2 and data_type 3").
    first = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    for got in _gather_ids(first, tf.int32):
      self.assertAllEqual(got, [0, 1])
    second = distribute.make_strategy("mirrored", cpu_replicas=2)
    self.assertEqual(second.num_replicas_in_sync, 2)
    for got in _gather_ids(second, tf.float32):
      self.assertAllEqual(got, [0.0, 1.0])
    # The first strategy keeps working after the second one ran.
    for got in _gather_ids(first, tf.int32):
      self.assertAllEqual(got, [0, 1])

  def test_uint8_gathers_as_bytes_and_64_bit_integers_are_refused(self):
    """uint8 (images) crosses the replicas packed four bytes to an int32, rows of any size (9
    bytes here: padded for the trip) come back bit for bit; int64 would be a 64-bit collective."""
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    x = np.random.default_rng(0).integers(0, 256, (2, 2, 3, 3), dtype=np.uint8)  # [R, b, 3, 3]
    for shape in ((2, 3, 3), (2, 4, 4, 3), (2,)):
      values = np.resize(x, (2,) + shape)

      @tf.function
      def step(v):
        return strategy.run(distribute.all_gather, args=(v,))

      dist = strategy.experimental_distribute_values_from_function(
          lambda ctx, values=values: tf.constant(values[ctx.replica_id_in_sync_group]))
      for got in strategy.experimental_local_results(step(dist)):
        self.assertEqual(got.dtype, tf.uint8)
        self.assertAllEqual(got, values.reshape((-1,) + shape[1:]))

    @tf.function
    def wide():
      return strategy.run(lambda: distribute.all_gather(tf.constant([1], tf.int64)))

    with self.assertRaisesRegex(TypeError, "64-bit collective"):
      wide()

  def test_all_gather_is_identity_outside_replicas(self):
    x = tf.constant(np.arange(6).reshape(3, 2))
    self.assertIs(distribute.all_gather(x), x)
    self.assertEqual(distribute.replica_context_info()[0], 1)


class MakeStrategyTest(tf.test.TestCase):

  def test_default_is_the_default_strategy(self):
    self.assertIs(distribute.make_strategy("default"), tf.distribute.get_strategy())

  def test_bad_names_and_missing_tf_config(self):
    with self.assertRaisesRegex(ValueError, "one of default, mirrored, multi_worker, tpu"):
      distribute.make_strategy("gpu")
    with self.assertRaisesRegex(ValueError, "TF_CONFIG"):
      distribute.make_strategy("multi_worker")
    with self.assertRaisesRegex(ValueError, "cpu_replicas must be >= 1"):
      distribute.configure_cpu_replicas(0)

  def test_more_cpu_replicas_than_configured_is_refused(self):
    # conftest split the CPU into 8 before the runtime started; 9 cannot be had any more.
    self.assertEqual(distribute.configure_cpu_replicas(2), ["/cpu:0", "/cpu:1"])
    with self.assertRaisesRegex(RuntimeError, "already initialised"):
      distribute.configure_cpu_replicas(9)


if __name__ == "__main__":
  tf.test.main()
