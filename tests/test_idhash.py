"""Tests of tfmochi.idhash: seeded, stateless per-id draws."""

import numpy as np
import tensorflow as tf

from tfmochi import idhash


class IdHashTest(tf.test.TestCase):

  def test_a_function_of_seed_stream_and_id_only(self):
    ids = np.arange(1000, 1200)
    knn = idhash.id_hash(ids, 5, "knn").numpy()
    self.assertAllEqual(knn, idhash.id_hash(tf.constant(ids), 5, "knn").numpy())
    self.assertAllEqual(knn[::-1], idhash.id_hash(ids[::-1], 5, "knn").numpy())  # not the order
    self.assertNotAllEqual(knn, idhash.id_hash(ids, 6, "knn").numpy())  # the seed
    self.assertNotAllEqual(knn, idhash.id_hash(ids, 5).numpy())  # the stream
    self.assertTrue(np.all((knn >= 0) & (knn < 1 << 62)))

  def test_the_keys_runs_depend_on(self):
    # Changing a key would change which images a run's kNN subset and labelled fraction hold.
    self.assertEqual(int(idhash.id_hash(7, 3, "knn")),
                     int(tf.strings.to_hash_bucket_fast("3:knn:7", 1 << 62)))
    self.assertEqual(float(idhash.id_uniform(7, 3)),
                     int(tf.strings.to_hash_bucket_fast("3:7", 1 << 30)) / (1 << 30))

  def test_uniform_covers_the_unit_interval(self):
    u = idhash.id_uniform(np.arange(4000), 1).numpy()
    self.assertTrue(np.all((u >= 0) & (u < 1)))
    self.assertNear(float(np.mean(u < 0.25)), 0.25, 0.03)


if __name__ == "__main__":
  tf.test.main()
