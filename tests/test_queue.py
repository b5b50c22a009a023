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


class DeviceIdsTest(tf.test.TestCase):

  def test_ids_below_the_modulus_are_unchanged_and_wider_ones_fold(self):
    big = 2**40 + 5
    ids = np.array([0, 7, 1_281_166, 2**31 - 2, 2**31 - 1, 2**31, big, -1, -9], np.int64)
    got = queue_lib.device_ids(ids)
    self.assertEqual(got.dtype, tf.int32)
    m = queue_lib.ID_MODULUS
    self.assertAllEqual(got, [0, 7, 1_281_166, 2**31 - 2, 0, 1, big % m, -1, -1])
    # The collision rule: a and a + (2^31 - 1) are the same id on the device.
    self.assertEqual(int(queue_lib.device_ids(np.int64(12 + m))), 12)
    # int32 passes through, and folding is idempotent (a restored checkpoint folds again).
    self.assertAllEqual(queue_lib.device_ids(got), got)
    self.assertAllEqual(queue_lib.device_ids(tf.cast(got, tf.int64)), got)
    with self.assertRaisesRegex(TypeError, "must be integers"):
      queue_lib.device_ids(tf.constant([1.0]))


class _QueueBefore32Bit(tf.Module):
  """`NegativeQueue`'s variables as earlier tfmochi versions wrote them: int64 ptr, ids, labels."""

  def __init__(self, keys, ptr, ids, labels):
    super().__init__(name="queue")
    self.keys = tf.Variable(keys, name="keys")
    self.ptr = tf.Variable(tf.constant(ptr, tf.int64), name="ptr")
    self.ids = tf.Variable(np.asarray(ids, np.int64), name="ids")
    self.labels = tf.Variable(np.asarray(labels, np.int64), name="labels")


class CheckpointLayoutTest(tf.test.TestCase):
  """Checkpoints of runs made before the queue's integers became int32 restore into it."""

  def _old_checkpoint(self):
    rng = np.random.default_rng(0)
    values = dict(keys=rng.normal(size=(8, 2)).astype(np.float32), ptr=4,
                  ids=[1_281_166, 3, 2**31 - 2, 2**40 + 5, -1, -1, 0, 9],
                  labels=[999, 3, 0, 1, -1, -1, 7, 2])
    path = tf.train.Checkpoint(queue=_QueueBefore32Bit(**values)).save(
        f"{self.create_tempdir().full_path}/old")
    return path, values

  def _check_restored(self, keys, ptr, ids, labels, values):
    self.assertEqual(ids.dtype, tf.int32)
    self.assertAllEqual(keys, values["keys"])
    self.assertEqual(int(ptr), values["ptr"])
    self.assertAllEqual(ids, queue_lib.device_ids(np.array(values["ids"], np.int64)))
    self.assertAllEqual(ids[:3], values["ids"][:3])  # real ids (< 2^31 - 1) are intact
    self.assertAllEqual(labels, values["labels"])

  def test_old_int64_checkpoint_restores_into_int32_queue(self):
    path, values = self._old_checkpoint()
    q = queue_lib.NegativeQueue(8, 2, seed=5)
    status = tf.train.Checkpoint(queue=q).restore(path)
    status.assert_consumed()  # every saved value found its variable, and the reverse
    self._check_restored(q.keys, q.ptr, q.ids, q.labels, values)
    # New checkpoints keep the old layout (names and int64), so earlier versions read them too.
    new_path = tf.train.Checkpoint(queue=q).save(f"{self.create_tempdir().full_path}/new")
    self.assertEqual(tf.train.list_variables(new_path), tf.train.list_variables(path))
    reader = tf.train.load_checkpoint(new_path)
    for name in ("ptr", "ids", "labels"):
      key = f"queue/{name}/.ATTRIBUTES/VARIABLE_VALUE"
      self.assertEqual(reader.get_variable_to_dtype_map()[key], tf.int64)
    old = _QueueBefore32Bit(np.zeros((8, 2), np.float32), 0, [0] * 8, [0] * 8)
    tf.train.Checkpoint(queue=old).restore(new_path).assert_consumed()
    self.assertAllEqual(old.ids, q.ids)
    self.assertEqual(int(old.ptr), values["ptr"])

  def test_old_checkpoint_restores_into_every_replica(self):
    path, values = self._old_checkpoint()
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
      q = queue_lib.NegativeQueue(8, 2, seed=5)
    tf.train.Checkpoint(queue=q).restore(path).assert_consumed()
    for replica in range(2):
      self._check_restored(*(v.values[replica] for v in (q.keys, q.ptr, q.ids, q.labels)),
                           values)


if __name__ == "__main__":
  tf.test.main()
