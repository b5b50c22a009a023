"""Tests of tfmochi.queue: ring-buffer semantics, read-before-write, replicas stay identical."""

import numpy as np
import tensorflow as tf

from tfmochi import distribute
from tfmochi import queue as queue_lib


class QueueTest(tf.test.TestCase):

  def test_init_unit_norm_and_deterministic(self):
    a = queue_lib.NegativeQueue(16, 4, seed=3)
    b = queue_lib.NegativeQueue(16, 4, seed=3)
    self.assertAllClose(np.linalg.norm(a.keys.numpy(), axis=1), np.ones(16), atol=1e-6)
    self.assertAllEqual(a.keys, b.keys)
    self.assertAllEqual(a.ids, -np.ones(16))
    self.assertAllEqual(a.labels, -np.ones(16))
    self.assertEqual(int(a.ptr), 0)

  def test_pointer_and_fifo(self):
    """docs/ALGORITHMS.md §10, E1: K = 4, B = 2: ptr 0 -> 2 -> 0; step-0 keys in rows 0-1,
    step-1 in 2-3."""
    q = queue_lib.NegativeQueue(4, 2)
    k0 = np.array([[1.0, 0], [0, 1]], np.float32)
    k1 = np.array([[-1.0, 0], [0, -1]], np.float32)
    q.enqueue(k0, ids=[10, 11], labels=[1, 2])
    self.assertEqual(int(q.ptr), 2)
    q.enqueue(k1, ids=[12, 13])
    self.assertEqual(int(q.ptr), 0)
    self.assertAllEqual(q.keys, np.concatenate([k0, k1]))
    self.assertAllEqual(q.ids, [10, 11, 12, 13])
    self.assertAllEqual(q.labels, [1, 2, -1, -1])
    q.enqueue(k1)  # overwrites the oldest
    self.assertAllEqual(q.keys[:2], k1)
    self.assertAllEqual(q.ids[:2], [-1, -1])

  def test_read_before_write_in_one_function(self):
    q = queue_lib.NegativeQueue(4, 2)
    before = q.keys.numpy()

    @tf.function
    def step(k):
      snap, _, _ = q.snapshot()
      q.enqueue(k)
      return snap

    snap = step(tf.constant([[1.0, 0], [0, 1]]))
    self.assertAllEqual(snap, before)
    self.assertNotAllClose(q.keys, before)

  def test_disabled_enqueue_writes_nothing(self):
    """A skipped step (enabled=False) leaves keys, ids, labels and pointer as they were, on the
    in-place path of plain variables, eagerly and in a tf.function."""
    q = queue_lib.NegativeQueue(4, 2, seed=1)
    q.enqueue(np.eye(2, dtype=np.float32), ids=[5, 6], labels=[7, 8])
    before = [v.numpy() for v in (q.keys, q.ids, q.labels, q.ptr)]
    new_keys = tf.constant(-np.eye(2, dtype=np.float32))

    @tf.function
    def step(on):
      q.enqueue(new_keys, ids=[1, 2], labels=[3, 4], enabled=on)

    q.enqueue(new_keys, ids=[1, 2], labels=[3, 4], enabled=tf.constant(False))  # eager
    step(tf.constant(False))
    for got, want in zip((q.keys, q.ids, q.labels, q.ptr), before):
      self.assertAllEqual(got, want)
    step(tf.constant(True))
    self.assertAllEqual(q.keys[2:], -np.eye(2))
    self.assertAllEqual(q.ids, [5, 6, 1, 2])
    self.assertAllEqual(q.labels, [7, 8, 3, 4])
    self.assertEqual(int(q.ptr), 0)

  def test_size_checks(self):
    with self.assertRaisesRegex(ValueError, r"multiple of the global batch size 48.*got 100"):
      queue_lib.check_queue_size(100, 48)
    with self.assertRaisesRegex(ValueError, r"queue_size \(K\) must be a positive integer"):
      queue_lib.NegativeQueue(0, 4)
    queue_lib.check_queue_size(96, 48)

  def test_mirrored_replicas_write_the_global_batch(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
      q = queue_lib.NegativeQueue(8, 2)
    keys = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant([[1.0, 0], [0, 1]]) * (ctx.replica_id_in_sync_group + 1.0))
    ids = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant([0, 1], tf.int64) + 2 * ctx.replica_id_in_sync_group)
    # Labels as the label modes see them: replica 1's second image is unlabelled (-1).
    labels = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant([[7, 8], [9, -1]], tf.int64)[ctx.replica_id_in_sync_group])

    @tf.function
    def step(k, i, lab):
      strategy.run(q.enqueue, args=(k, i, lab))

    step(keys, ids, labels)
    step(keys, ids, labels)
    copies = [v.numpy() for v in q.keys.values]
    self.assertLen(copies, 2)
    self.assertAllEqual(copies[0], copies[1])
    expected = np.array([[1, 0], [0, 1], [2, 0], [0, 2]], np.float32)
    self.assertAllEqual(copies[0], np.concatenate([expected, expected]))
    for replica in range(2):  # id and label buffers are identical on both replicas
      self.assertAllEqual(q.ids.values[replica], [0, 1, 2, 3, 0, 1, 2, 3])
      self.assertAllEqual(q.labels.values[replica], [7, 8, 9, -1, 7, 8, 9, -1])
    self.assertEqual([int(v) for v in q.ptr.values], [0, 0])


if __name__ == "__main__":
  tf.test.main()
