"""Tests of tfmochi.data.tfds_source."""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import data_fixtures as fx  # tests/data_fixtures.py
from tfmochi import data
from tfmochi import distribute


class TfdsTest(tf.test.TestCase):

  def test_cifar10_mock(self):
    with tfds.testing.mock_data(num_examples=12):
      source = data.load("cifar10", "train", data_dir="/does/not/matter")
      test = data.load("cifar10", "test")
      self.assertEqual((source.num_examples, source.num_classes), (12, 10))
      self.assertEqual(test.split, "test")
      examples = list(source.dataset.as_numpy_iterator())
      self.assertEqual([e["id"] for e in examples], list(range(12)))
      for e in examples:
        self.assertEqual(e["image"].shape, (32, 32, 3))
        self.assertEqual(e["image"].dtype, np.uint8)
        self.assertBetween(e["label"], 0, 9)
      batch = fx.batches(data.pretrain_dataset(source, global_batch_size=4, image_size=fx.SIZE,
                                             seed=0), 1)[0]
      self.assertEqual(batch["view1"].shape, (4, fx.SIZE, fx.SIZE, 3))
      self.assertEqual(batch["view1"].dtype, np.uint8)  # normalised on the device
      evals = fx.batches(data.eval_dataset(test, batch_size=5, image_size=fx.SIZE), 10)
      self.assertEqual([len(b["id"]) for b in evals], [5, 5, 2])
      self.assertEqual(evals[0]["image"].shape, (5, fx.SIZE, fx.SIZE, 3))

  def test_imagenet2012_mock_random_sizes(self):
    with tfds.testing.mock_data(num_examples=8):
      source = data.load("imagenet2012", "train")
      self.assertEqual((source.num_examples, source.num_classes), (8, 1000))
      self.assertEqual(data.load("imagenet2012", "test").split, "test")  # tfds "validation"
      shapes = {e["image"].shape for e in source.dataset.as_numpy_iterator()}
      self.assertGreater(len(shapes), 1)  # mock images have random sizes ...
      batch = fx.batches(data.pretrain_dataset(source, global_batch_size=4, image_size=fx.SIZE,
                                             seed=0), 1)[0]
      self.assertEqual(batch["view2"].shape, (4, fx.SIZE, fx.SIZE, 3))  # ... resized by the pipeline

  def test_imagenet100_filter_and_relabel(self):
    wnids = sorted(data.imagenet100_wnids())
    self.assertLen(wnids, 100)
    with tfds.testing.mock_data(num_examples=300):
      names = tfds.builder("imagenet2012").info.features["label"]
      full = {int(e["id"]): int(e["label"])
              for e in data.load("imagenet2012", "train").dataset.as_numpy_iterator()}
      source = data.load("imagenet100", "train")
      examples = list(source.dataset.as_numpy_iterator())
    expected = {i for i, label in full.items() if names.int2str(label) in set(wnids)}
    self.assertEqual(source.num_classes, 100)
    self.assertEqual(source.num_examples, len(expected))
    self.assertEqual({int(e["id"]) for e in examples}, expected)
    self.assertGreater(len(expected), 10)
    for e in examples:
      self.assertBetween(e["label"], 0, 99)
      self.assertEqual(wnids[e["label"]], names.int2str(full[int(e["id"])]))

  def test_tfds_stream_resume(self):
    # tfds sources shuffle with a seeded buffer; resume must still be exact.
    with tfds.testing.mock_data(num_examples=10):
      source = data.load("cifar10", "train")
      kwargs = dict(global_batch_size=4, image_size=8, seed=5, shuffle_buffer=6)
      full = fx.batches(data.pretrain_dataset(source, **kwargs), 5)  # 2 steps per epoch
      for k in (3,):
        fx.assert_same_batches(self, full[k:], fx.batches(
            data.pretrain_dataset(source, start_step=k, **kwargs), 5 - k))
      self.assertNotEqual(list(full[0]["id"]), list(full[2]["id"]))  # reshuffled per epoch


class PreparedTfdsTest(tf.test.TestCase):
  """The real (unmocked) tfds read path, on a tiny prepared data set written by the test."""

  def setUp(self):
    super().setUp()
    self.root = fx.tempdir(self)
    ds_dir = os.path.join(self.root, "tiny_images", "1.0.0")
    os.makedirs(ds_dir)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)})
    rng = np.random.default_rng(0)
    self.lengths = {"train": [5, 4], "test": [3]}  # two train files: ids need the file offsets
    k = 0
    for split, shards in self.lengths.items():
      for i, n in enumerate(shards):
        path = os.path.join(ds_dir, f"tiny_images-{split}.tfrecord-{i:05d}-of-{len(shards):05d}")
        with tf.io.TFRecordWriter(path) as writer:
          for _ in range(n):
            image = rng.integers(0, 256, (6 + k % 3, 7, 3), dtype=np.uint8)
            writer.write(features.serialize_example({"image": image, "label": k % 3}))
            k += 1
    tfds.folder_dataset.write_metadata(
        data_dir=ds_dir, features=features, filename_template=None, check_data=True,
        split_infos=[tfds.core.SplitInfo(name=s, shard_lengths=l, num_bytes=0)
                     for s, l in self.lengths.items()])

  def test_ids_shards_and_splits(self):
    source = data.load("tiny_images", "train", data_dir=self.root)
    self.assertEqual((source.num_examples, source.num_classes, source.has_labels), (9, 3, True))
    examples = list(source.dataset.as_numpy_iterator())
    self.assertEqual(sorted(int(e["id"]) for e in examples), list(range(9)))
    self.assertEqual({e["image"].shape[0] for e in examples}, {6, 7, 8})
    shards = []
    for index in range(2):
      ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index,
                                       num_replicas_in_sync=2)
      shards.append([int(e["id"]) for e in source.for_input_context(ctx)])
    self.assertEqual(sorted(shards[0] + shards[1]), list(range(9)))
    self.assertBetween(len(shards[0]), 4, 5)
    test = data.load("tiny_images", "test", data_dir=self.root)
    self.assertEqual(test.num_examples, 3)
    self.assertEqual(sorted(int(e["id"]) for e in test.dataset), [0, 1, 2])
    kwargs = dict(global_batch_size=4, image_size=8, seed=0)
    full = fx.batches(data.pretrain_dataset(source, **kwargs), 3)
    fx.assert_same_batches(self, full[2:], fx.batches(
        data.pretrain_dataset(source, start_step=2, **kwargs), 1))


class ErrorTest(tf.test.TestCase):

  def test_imagenet_not_prepared_fails_fast(self):
    empty = fx.tempdir(self)
    for name in ("imagenet2012", "imagenet100"):
      start = time.time()
      with self.assertRaises(data.DataError) as ctx:
        data.load(name, "train", data_dir=empty)
      self.assertLess(time.time() - start, 10.0)
      message = str(ctx.exception)
      for needle in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                     "tfds build imagenet2012", "--manual_dir", f"--data_dir={empty}",
                     os.path.join(empty, "downloads", "manual")):
        self.assertIn(needle, message)
    # With the archives in place the message says the build step is what is missing.
    manual = os.path.join(empty, "downloads", "manual")
    for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
      fx.write(os.path.join(manual, tar), b"")
    with self.assertRaisesRegex(data.DataError, "has not been built"):
      data.load("imagenet2012", "test", data_dir=empty)

  def test_other_tfds_not_prepared(self):
    empty = fx.tempdir(self)
    start = time.time()
    with self.assertRaisesRegex(data.DataError, f"tfds build cifar10 --data_dir={empty}"):
      data.load("cifar10", "train", data_dir=empty)
    self.assertLess(time.time() - start, 10.0)


if __name__ == "__main__":
  tf.test.main()
