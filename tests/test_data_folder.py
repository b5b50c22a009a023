"""Tests of tfmochi.data.folder."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
import tensorflow as tf

import data_fixtures as fx  # tests/data_fixtures.py
from tfmochi import data


class ErrorTest(tf.test.TestCase):

  def test_folder_errors(self):
    with self.assertRaisesRegex(data.DataError, "needs --data_dir"):
      data.load("folder")
    root = fx.tempdir(self)
    with self.assertRaisesRegex(data.DataError, "does not exist"):
      data.load("folder", data_dir=os.path.join(root, "missing"))
    with self.assertRaisesRegex(data.DataError, "no class subfolders"):
      data.load("folder", data_dir=root)
    fx.write(os.path.join(root, "a.png"), fx.png(np.zeros((4, 4, 3), np.uint8)))
    with self.assertRaisesRegex(data.DataError, r"1 image file\(s\) directly in it"):
      data.load("folder", data_dir=root)
    os.makedirs(os.path.join(root, "cat"))
    with self.assertRaisesRegex(data.DataError, "no image files"):
      data.load("folder", data_dir=root)
    fx.write(os.path.join(root, "cat", "bad.jpg"), b"not an image")
    with self.assertRaisesRegex(data.DataError, "none of the 1 image files"):
      data.load("folder", data_dir=root, holdout_fraction=0.0, validate="decode")
    with self.assertRaisesRegex(data.DataError, "'train' and 'test'"):
      data.load("quickstart", "unlabelled")


class FolderTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.root = fx.tempdir(self)
    self.rgb = np.zeros((10, 14, 3), np.uint8)
    self.rgb[..., 0], self.rgb[..., 1], self.rgb[..., 2] = 200, 60, 110
    noise = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    train = os.path.join(self.root, "train")
    files = {
        "cat/rgb.png": fx.png(noise(12, 9)),
        "cat/photo.JPG": fx.jpeg(noise(20, 16)),
        "cat/gray.png": fx.png(noise(8, 8), "L"),
        "cat/alpha.png": fx.png(self.rgb, "RGBA"),
        "cat/gray_alpha.png": fx.png(noise(6, 7), "LA"),
        "dog/palette.png": fx.png(noise(9, 9), "P"),
        "dog/cmyk.jpg": fx.jpeg(self.rgb, "CMYK"),
        "dog/sub/nested.bmp": (lambda b: (Image.fromarray(noise(5, 5)).save(b, "BMP"),
                                          b.getvalue())[1])(io.BytesIO()),
        "dog/corrupt.jpg": b"this is not a jpeg at all",
        "dog/truncated.png": fx.png(noise(30, 30))[:150],
        "dog/notes.txt": b"ignored: not an image extension",
    }
    for name, payload in files.items():
      fx.write(os.path.join(train, name), payload)
    fx.write(os.path.join(self.root, "val", "cat", "v.png"), fx.png(noise(7, 7)))
    fx.write(os.path.join(self.root, "val", "dog", "v.jpeg"), fx.jpeg(noise(7, 9)))

  def test_validate_images_decodes_every_file_at_start_up(self):
    with self.assertLogs("absl", level="WARNING") as logs:
      source = data.load("folder", "train", data_dir=self.root, validate="decode")
    self.assertEqual(source.num_examples, 8)
    self.assertEqual(source.num_skipped, 2)
    self.assertEqual(sorted(os.path.basename(p) for p in source.skipped_files),
                     ["corrupt.jpg", "truncated.png"])
    self.assertIn("skipped 2 of 10", logs.output[0])
    self.assertIn("truncated.png", logs.output[0])
    self.assertEqual((source.num_classes, source.has_labels), (2, True))
    examples = list(source.dataset.as_numpy_iterator())
    self.assertLen(examples, 8)
    for e in examples:
      self.assertEqual(e["image"].ndim, 3)
      self.assertEqual(e["image"].shape[-1], 3)
      self.assertEqual(e["image"].dtype, np.uint8)
    self.assertEqual(sorted(e["label"] for e in examples), [0] * 5 + [1] * 3)
    # ids follow the sorted listing of train/: cat/alpha.png is 0, dog/cmyk.jpg is 5. The CMYK
    # JPEG (Adobe-inverted, as Pillow writes it) decodes to the original colour; RGBA drops alpha.
    by_id = {int(e["id"]): e["image"] for e in examples}
    self.assertNotIn(6, by_id)  # dog/corrupt.jpg
    for i in (0, 5):
      self.assertEqual(by_id[i].shape, (10, 14, 3))
      self.assertAllClose(by_id[i].mean(axis=(0, 1)), [200, 60, 110], atol=4)
    test = data.load("folder", "test", data_dir=self.root)
    self.assertEqual((test.num_examples, test.num_skipped), (2, 0))
    batch = fx.batches(data.pretrain_dataset(source, global_batch_size=4, image_size=fx.SIZE,
                                           seed=0), 2)
    self.assertEqual(batch[1]["view1"].shape, (4, fx.SIZE, fx.SIZE, 3))

  def test_header_only_validation_drops_bad_files_in_the_pipeline(self):
    source = data.load("folder", "train", data_dir=self.root, validate="header")
    self.assertEqual((source.num_examples, source.num_skipped), (9, 1))  # truncated passes
    self.assertLen(list(source.dataset.as_numpy_iterator()), 8)

  def test_held_out_split_without_split_folders(self):
    flat = os.path.join(self.root, "train")  # class folders only
    train = data.load("folder", "train", data_dir=flat, holdout_fraction=0.25)
    test = data.load("folder", "test", data_dir=flat, holdout_fraction=0.25)
    train_ids = {int(e["id"]) for e in train.dataset.as_numpy_iterator()}
    test_ids = {int(e["id"]) for e in test.dataset.as_numpy_iterator()}
    self.assertEmpty(train_ids & test_ids)
    # 10 files listed, 2 or 3 held out (stratified 25%); the 2 bad files, wherever they fell,
    # are dropped and counted when read.
    self.assertEqual(train.num_examples + test.num_examples, 10)
    self.assertEqual(len(train_ids) + len(test_ids), 8)
    self.assertEqual(train.skipped_while_reading + test.skipped_while_reading, 2)

  def test_listing_only_then_skip_and_count_while_training(self):
    # The default lists the files (through tf.io.gfile: a ram:// folder stands in for gs://)
    # without reading them; the pipeline drops and counts the two undecodable ones.
    ram = "ram://tfmochi-test-folder"
    for path in tf.io.gfile.glob(os.path.join(self.root, "train", "*", "*")):
      if not tf.io.gfile.isdir(path):
        tf.io.gfile.makedirs(os.path.dirname(path.replace(self.root, ram)))
        tf.io.gfile.copy(path, path.replace(self.root, ram), overwrite=True)
    self.addCleanup(tf.io.gfile.rmtree, ram)
    source = data.load("folder", "train", data_dir=ram, holdout_fraction=0.0)
    self.assertEqual((source.num_examples, source.num_skipped), (9, 0))  # nested.bmp not copied
    with self.assertLogs("absl", level="WARNING") as logs:
      self.assertLen(list(source.dataset), 7)
    self.assertEqual(source.skipped_while_reading, 2)
    self.assertIn("corrupt.jpg", "".join(logs.output))
    self.assertIn("2 skipped so far", "".join(logs.output))
    # Training batches stay full: a dropped image's place goes to the stream's next example.
    batches = fx.batches(data.pretrain_dataset(source, global_batch_size=9, image_size=fx.SIZE,
                                             seed=0), 2)
    self.assertEqual(batches[0]["view1"].dtype, np.uint8)
    self.assertGreaterEqual(source.skipped_while_reading, 4)
    ids = set(batches[0]["id"])
    self.assertNotIn(6, ids)  # dog/corrupt.jpg


if __name__ == "__main__":
  tf.test.main()
