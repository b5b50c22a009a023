"""Tests of tfmochi.data.pipelines: the pretraining and eval pipelines, determinism, resume,
distribution."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import data_fixtures as fx  # tests/data_fixtures.py
from tfmochi import data
from tfmochi import distribute


class PretrainPipelineTest(tf.test.TestCase):

  def test_deterministic_and_seeded(self):
    source = data.load("quickstart", "train")
    kwargs = dict(global_batch_size=16, image_size=fx.SIZE)
    a = fx.batches(data.pretrain_dataset(source, seed=1, **kwargs), 2)
    b = fx.batches(data.pretrain_dataset(source, seed=1, **kwargs), 2)
    fx.assert_same_batches(self, a, b)
    c = fx.batches(data.pretrain_dataset(source, seed=2, **kwargs), 1)
    self.assertNotEqual(list(a[0]["id"]), list(c[0]["id"]))
    first = a[0]
    self.assertEqual(first["view1"].shape, (16, fx.SIZE, fx.SIZE, 3))
    self.assertEqual(first["label"].dtype, np.int64)
    self.assertGreater(np.abs(first["view1"] - first["view2"]).mean(), 1e-2)
    self.assertLen(set(first["id"]), 16)

  def test_resume_is_exact_across_epochs(self):
    source = fx.tiny_source(10)  # batch 4 -> 2 steps per epoch, 2 examples unused per epoch
    kwargs = dict(global_batch_size=4, image_size=8, seed=3)
    full = fx.batches(data.pretrain_dataset(source, **kwargs), 7)
    for k in (3, 4):  # mid-epoch after a boundary, and exactly at one
      fx.assert_same_batches(self, full[k:], fx.batches(
          data.pretrain_dataset(source, start_step=k, **kwargs), 7 - k))
    for epoch in range(3):
      ids = np.concatenate([full[2 * epoch]["id"], full[2 * epoch + 1]["id"]])
      self.assertLen(set(ids), 8)  # no repeats within an epoch
    self.assertNotEqual(list(full[0]["id"]), list(full[2]["id"]))
    # The same sample gets new views in a new epoch (seed includes the epoch).
    views = {}
    for b in full[:4]:
      for i, v in zip(b["id"], b["view1"]):
        views.setdefault(int(i), []).append(v)
    twice = [v for v in views.values() if len(v) == 2]
    self.assertNotEmpty(twice)
    self.assertNotAllClose(twice[0][0], twice[0][1])

  def test_batch_larger_than_data(self):
    with self.assertRaisesRegex(data.DataError, "larger than"):
      data.pretrain_dataset(fx.tiny_source(3), global_batch_size=4, image_size=8, seed=0)

  def test_input_pipelines_read_disjoint_shards(self):
    source = fx.tiny_source(10)
    ids = []
    for index in range(2):
      ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index,
                                       num_replicas_in_sync=2)
      batches = fx.batches(data.pretrain_dataset(source, global_batch_size=4, image_size=8, seed=0,
                                               recipe="mocov1", input_context=ctx), 2)  # 1 epoch
      self.assertEqual(batches[0]["view1"].shape, (2, 8, 8, 3))
      ids.append(set(np.concatenate([b["id"] for b in batches])))
    self.assertEmpty(ids[0] & ids[1])
    self.assertLen(ids[0] | ids[1], 8)

  def test_mirrored_strategy(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    source = fx.tiny_source(10)
    kwargs = dict(global_batch_size=4, image_size=8, seed=0)
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: data.pretrain_dataset(source, input_context=ctx, **kwargs))
    batch = next(iter(dist))
    views = strategy.experimental_local_results(batch["view1"])
    ids = strategy.experimental_local_results(batch["id"])
    self.assertLen(views, 2)
    for v in views:
      self.assertEqual(v.shape, (2, 8, 8, 3))
    # One pipeline feeding two replicas: step 0 holds the same examples as without a context.
    single = fx.batches(data.pretrain_dataset(source, **kwargs), 1)[0]
    self.assertAllEqual(np.concatenate([i.numpy() for i in ids]), single["id"])


class EvalPipelineTest(tf.test.TestCase):

  def test_eval_dataset(self):
    source = data.load("quickstart", "test")
    batches = fx.batches(data.eval_dataset(source, batch_size=128, image_size=fx.SIZE), 10)
    self.assertEqual([len(b["id"]) for b in batches], [128, 128, 44])
    self.assertEqual(batches[0]["image"].shape, (128, fx.SIZE, fx.SIZE, 3))
    self.assertEqual(batches[0]["image"].dtype, np.float32)
    ids = np.concatenate([b["id"] for b in batches])
    self.assertLen(set(ids), 300)
    again = fx.batches(data.eval_dataset(source, batch_size=128, image_size=fx.SIZE), 1)[0]
    self.assertAllEqual(again["image"], batches[0]["image"])
    aug = lambda seed: data.eval_dataset(  # noqa: E731
        source, batch_size=64, image_size=fx.SIZE, train_augment=True, seed=seed)
    aug0 = aug(0)
    self.assertAllEqual(fx.batches(aug0, 1)[0]["image"], fx.batches(aug0, 1)[0]["image"])
    self.assertNotAllClose(fx.batches(aug0, 1)[0]["image"], fx.batches(aug(1), 1)[0]["image"])
    shuffled = fx.batches(data.eval_dataset(source, batch_size=300, image_size=fx.SIZE, shuffle=True),
                        1)[0]["id"]
    self.assertCountEqual(shuffled, ids)
    self.assertNotEqual(list(shuffled), list(ids))


if __name__ == "__main__":
  tf.test.main()
