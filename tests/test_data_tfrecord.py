"""Tests of tfmochi.data.tfrecord."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

import data_fixtures as fx  # tests/data_fixtures.py
import testdata  # tests/testdata.py (tests/ is on sys.path under pytest)
from tfmochi import data


class TFRecordTest(tf.test.TestCase):
  """ImageNet-layout TFRecords of real JPEG bytes: labels 1..3 (0 unused), two train files."""

  def setUp(self):
    super().setUp()
    self.root = fx.tempdir(self)
    jpegs = [tf.io.encode_jpeg(p, quality=90).numpy() for p in testdata.photos(12)]
    layout = {"train-00000-of-00002": 5, "train-00001-of-00002": 4,
              "validation-00000-of-00001": 3}
    k = 0
    for name, n in layout.items():
      testdata.write_tfrecord(os.path.join(self.root, name),
                      [testdata.tf_example(jpegs[k + i], 1 + (k + i) % 3) for i in range(n)])
      k += n

  def test_splits_labels_ids_shards_and_resume(self):
    source = data.load("tfrecord", "train", data_dir=self.root)
    by_glob = data.load("tfrecord", "train", data_dir=os.path.join(self.root, "train-*"))
    self.assertEqual((source.num_examples, source.num_classes, source.has_labels), (9, 3, True))
    examples = [(int(e["id"]), int(e["label"]), e["image"].shape) for e in source.dataset]
    self.assertEqual(examples, [(int(e["id"]), int(e["label"]), e["image"].shape)
                                for e in by_glob.dataset])
    # ids: file index << 32 | record index; labels 1..3 -> 0..2.
    self.assertEqual(sorted(i for i, _, _ in examples),
                     [0, 1, 2, 3, 4] + [(1 << 32) + r for r in range(4)])
    self.assertEqual(sorted(y for _, y, _ in examples), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    self.assertEqual({s for _, _, s in examples}, {(18, 24, 3)})
    for held_out in (data.load("tfrecord", "test", data_dir=self.root),
                     data.load("tfrecord", "test", data_dir=os.path.join(self.root, "train-*"))):
      self.assertEqual(held_out.num_examples, 3)
      self.assertEqual([int(e["label"]) for e in held_out.dataset], [0, 1, 2])
    kwargs = dict(global_batch_size=4, image_size=8, seed=0)
    full = fx.batches(data.pretrain_dataset(source, **kwargs), 5)
    self.assertEqual(full[0]["view1"].dtype, np.uint8)
    fx.assert_same_batches(self, full[3:], fx.batches(
        data.pretrain_dataset(source, start_step=3, **kwargs), 2))
    # Two input pipelines read one file each (files per host); three read all records once.
    for pipelines in (2, 3):
      shards = [[int(e["id"]) for e in source.raw(pipelines, i)] for i in range(pipelines)]
      self.assertCountEqual(sum(shards, []), [i for i, _, _ in examples])
      if pipelines == 2:
        self.assertEqual([{i >> 32 for i in shard} for shard in shards], [{0}, {1}])

  def test_bad_input_gets_one_clear_message(self):
    with self.assertRaisesRegex(data.DataError, "no files match .*nothing-\\*"):
      data.load("tfrecord", "train", data_dir=os.path.join(self.root, "nothing-*"))
    with self.assertRaisesRegex(data.DataError, "no 'train' to replace"):
      data.load("tfrecord", "test", data_dir=os.path.join(self.root, "*-of-00002"))
    other = fx.tempdir(self)
    testdata.write_tfrecord(os.path.join(other, "train-0"), [testdata.tf_example(label=1, image=b"x")])
    with self.assertRaisesRegex(data.DataError, "no image/encoded feature .*have: image, "
                                "image/class/label"):
      data.load("tfrecord", "train", data_dir=other)
    fx.write(os.path.join(other, "train-0"), b"this is not a TFRecord file at all")
    with self.assertRaisesRegex(data.DataError, "not a TFRecord file"):
      data.load("tfrecord", "train", data_dir=other)
    jpeg = tf.io.encode_jpeg(testdata.photos(1)[0]).numpy()
    testdata.write_tfrecord(os.path.join(other, "train-0"), [testdata.tf_example(jpeg, y) for y in (0, 1, 2)])
    with self.assertRaisesRegex(data.DataError, "label 0 .*below --tfrecord_label_offset=1"):
      data.load("tfrecord", "train", data_dir=other)
    zero_based = data.load("tfrecord", "train", data_dir=other, tfrecord_label_offset=0)
    self.assertEqual(sorted(int(e["label"]) for e in zero_based.dataset), [0, 1, 2])
    # A bucket this machine may not read (gs:// stand-in: the listing raises PermissionDenied).
    real_glob = tf.io.gfile.glob

    def denied(pattern):
      if pattern.startswith("gs://"):
        raise tf.errors.PermissionDeniedError(None, None, "403 storage.objects.list denied")
      return real_glob(pattern)

    tf.io.gfile.glob = denied
    self.addCleanup(setattr, tf.io.gfile, "glob", real_glob)
    with self.assertRaisesRegex(data.DataError, "Cannot read gs://no-access/train-\\*.*"
                                "403.*roles/storage.objectViewer"):
      data.load("tfrecord", "train", data_dir="gs://no-access/train-*")

  def test_undecodable_record_is_skipped_and_counted(self):
    path = os.path.join(self.root, "train-00001-of-00002")
    jpeg = tf.io.encode_jpeg(testdata.photos(1)[0]).numpy()
    testdata.write_tfrecord(path, [testdata.tf_example(jpeg, 1), testdata.tf_example(b"\xff\xd8\xff broken", 2),
                           testdata.tf_example(jpeg[:40], 3)])
    source = data.load("tfrecord", "train", data_dir=self.root)
    with self.assertLogs("absl", level="WARNING") as logs:
      self.assertLen(list(source.dataset), 6)
    self.assertEqual(source.skipped_while_reading, 2)
    self.assertIn("record 1 of " + path, "".join(logs.output))


if __name__ == "__main__":
  tf.test.main()
