"""Tests of tfmochi.data.imagenet_to_tfrecord: ImageNet folders -> TFRecords tfmochi reads."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import uuid

import numpy as np
from PIL import Image as PILImage
import scipy.io
import tensorflow as tf

import testdata  # tests/testdata.py (tests/ is on sys.path under pytest)
from tfmochi import data
from tfmochi.data import imagenet_to_tfrecord as convert_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Created out of order: the labels follow the sorted wnids, not the listing.
WNIDS = ("n00000003", "n00000001", "n00000002")
PER_CLASS = 4
VAL_NAMES = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
VAL_WNIDS = ["n00000002", "n00000003", "n00000001", "n00000001", "n00000003", "n00000002"]


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _cmyk_jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PILImage.fromarray(image).convert("CMYK").save(buf, "JPEG", quality=95)
  return buf.getvalue()


def imagenet_folders(root: str) -> dict:
  """train/<wnid>/*.JPEG (real photos; one CMYK JPEG, one PNG named .JPEG), a flat val/ folder,
  its labels file (one wnid per line, file-name order) and a devkit whose ids are not sorted."""
  photos = iter(testdata.photos(len(WNIDS) * PER_CLASS + len(VAL_NAMES), 20, 28))
  for wnid in WNIDS:
    for i in range(PER_CLASS):
      image = next(photos)
      encoded = tf.io.encode_jpeg(image, quality=90).numpy()
      if (wnid, i) == ("n00000001", 1):
        encoded = _cmyk_jpeg(image)
      elif (wnid, i) == ("n00000002", 2):
        encoded = tf.io.encode_png(image).numpy()
      _write(os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), encoded)
  _write(os.path.join(root, "train", "n00000001", "notes.txt"), b"not an image")
  for name in VAL_NAMES:
    _write(os.path.join(root, "val", name), tf.io.encode_jpeg(next(photos)).numpy())
  labels = os.path.join(root, "synset_labels.txt")
  _write(labels, "\n".join(VAL_WNIDS).encode() + b"\n")
  devkit = os.path.join(root, "ILSVRC2012_devkit_t12")
  ids = {"n00000003": 1, "n00000001": 2, "n00000002": 3, "n09999999": 4}  # 4: an inner node
  synsets = np.zeros((len(ids),), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
  for i, (wnid, k) in enumerate(ids.items()):
    synsets[i] = (k, wnid)
  os.makedirs(os.path.join(devkit, "data"))
  scipy.io.savemat(os.path.join(devkit, "data", "meta.mat"), {"synsets": synsets})
  _write(os.path.join(devkit, "data", "ILSVRC2012_validation_ground_truth.txt"),
         "".join(f"{ids[w]}\n" for w in VAL_WNIDS).encode())
  return {"train": os.path.join(root, "train"), "val": os.path.join(root, "val"),
          "labels": labels, "devkit": devkit}


def _remove_quietly(path: str) -> None:
  try:
    tf.io.gfile.rmtree(path)
  except tf.errors.OpError:  # ram:// may refuse; its memory goes with the process
    pass


def read_shards(pattern: str) -> list[dict]:
  """The records of the files matching `pattern`, in file then record order, parsed."""
  out = []
  for path in sorted(tf.io.gfile.glob(pattern)):
    for record in tf.compat.v1.io.tf_record_iterator(path):
      f = tf.train.Example.FromString(record).features.feature
      out.append({k: (v.int64_list.value[0] if v.int64_list.value else v.bytes_list.value[0])
                  for k, v in f.items()} | {"file": os.path.basename(path)})
  return out


class ConvertTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.inputs = imagenet_folders(self.create_tempdir().full_path)
    self.out = f"ram://imagenet-to-tfrecord-{uuid.uuid4().hex[:8]}/tfrecord"
    self.addCleanup(_remove_quietly, self.out)

  def test_layout_labels_order_and_tfmochi_reads_it_back(self):
    result = convert_lib.convert(self.out, self.inputs["train"], self.inputs["val"],
                                 validation_labels=self.inputs["labels"], train_shards=4,
                                 validation_shards=2, seed=0, workers=2)
    self.assertEqual(result["classes"], sorted(WNIDS))
    self.assertEqual((result["train"], result["validation"]), (12, 6))
    self.assertEqual(result["reencoded"], ["n00000001_1.JPEG", "n00000002_2.JPEG"])
    self.assertEqual(sorted(tf.io.gfile.listdir(self.out)),
                     [f"train-0000{i}-of-00004" for i in range(4)]
                     + ["validation-00000-of-00002", "validation-00001-of-00002"])

    train = read_shards(f"{self.out}/train-*")
    expected = [f"{w}_{i}.JPEG" for w in sorted(WNIDS) for i in range(PER_CLASS)]
    random.Random(0).shuffle(expected)  # the seeded training order, cut into 4 shards of 3
    self.assertEqual([r["image/filename"].decode() for r in train], expected)
    self.assertEqual([r["file"] for r in train], [f"train-0000{i}-of-00004" for i in range(4)
                                                  for _ in range(3)])
    labels = [r["image/class/label"] for r in train]
    self.assertNotEqual(labels, sorted(labels))  # mixed classes, not folder order
    for r in train:
      wnid = r["image/class/synset"].decode()
      self.assertEqual(r["image/filename"].decode().split("_")[0], wnid)
      self.assertEqual(r["image/class/label"], sorted(WNIDS).index(wnid) + 1)
      self.assertEqual(r["image/format"], b"JPEG")
      header = convert_lib.jpeg_header(r["image/encoded"])  # every record is an RGB JPEG now
      self.assertEqual(header, (20, 28, 3))
      self.assertEqual((r["image/height"], r["image/width"]), (20, 28))

    validation = read_shards(f"{self.out}/validation-*")
    self.assertEqual([r["image/filename"].decode() for r in validation], VAL_NAMES)
    self.assertEqual([r["image/class/synset"].decode() for r in validation], VAL_WNIDS)

    # tfmochi's reader: labels 1..3 -> 0..2, ids = file index << 32 | record index.
    source = data.load("tfrecord", "train", data_dir=self.out)
    self.assertEqual((source.num_examples, source.num_classes), (12, 3))
    read = sorted((int(e["id"]), int(e["label"]), tuple(e["image"].shape))
                  for e in source.dataset)
    self.assertEqual(read, [((i // 3) << 32 | i % 3, labels[i] - 1, (20, 28, 3))
                            for i in range(12)])
    held_out = data.load("tfrecord", "test", data_dir=self.out)
    self.assertEqual(sorted((int(e["id"]), int(e["label"])) for e in held_out.dataset),
                     [((i // 3) << 32 | i % 3, sorted(WNIDS).index(w))
                      for i, w in enumerate(VAL_WNIDS)])

  def test_validation_labels_from_devkit_name_lines_or_class_folders(self):
    wnids = sorted(WNIDS)
    by_devkit = convert_lib.list_validation(self.inputs["val"], wnids,
                                            devkit_dir=self.inputs["devkit"])
    self.assertEqual([(i.name, i.wnid) for i in by_devkit], list(zip(VAL_NAMES, VAL_WNIDS)))
    named = os.path.join(self.create_tempdir().full_path, "val_labels.csv")
    _write(named, "".join(f"{n},{w}\n" for n, w in reversed(list(zip(VAL_NAMES, VAL_WNIDS))))
           .encode())
    by_name = convert_lib.list_validation(self.inputs["val"], wnids, named)
    self.assertEqual([(i.name, i.wnid) for i in by_name], list(zip(VAL_NAMES, VAL_WNIDS)))
    folders = self.create_tempdir().full_path
    for name, wnid in zip(VAL_NAMES, VAL_WNIDS):
      tf.io.gfile.makedirs(os.path.join(folders, wnid))
      tf.io.gfile.copy(os.path.join(self.inputs["val"], name), os.path.join(folders, wnid, name))
    by_folder = convert_lib.list_validation(folders, wnids)
    self.assertEqual([(i.name, i.wnid) for i in by_folder], list(zip(VAL_NAMES, VAL_WNIDS)))

  def test_bad_input_gets_one_clear_message(self):
    train, val, root = self.inputs["train"], self.inputs["val"], self.create_tempdir().full_path
    wnids = sorted(WNIDS)
    cases = [
        (lambda: convert_lib.list_train(os.path.join(root, "missing")),
         "--train_dir .*missing is not a folder"),
        (lambda: convert_lib.list_train(os.path.dirname(train)),
         "no class folders named by WordNet ids .*holds ILSVRC2012_devkit_t12, synset_labels.txt"),
        (lambda: convert_lib.list_validation(val, wnids), "without class folders: pass "
         "--devkit_dir"),
        (lambda: convert_lib.list_validation(val, wnids[:2], self.inputs["labels"]),
         "names wnids that are not class folders of --train_dir: n00000003\\."),
    ]
    os.makedirs(os.path.join(root, "train", "n00000009"))
    cases.append((lambda: convert_lib.list_train(os.path.join(root, "train")),
                  "n00000009 holds no images"))
    short = os.path.join(root, "short.txt")
    _write(short, b"n00000001\n")
    cases.append((lambda: convert_lib.list_validation(val, wnids, short),
                  "has 1 labels for 6 validation images"))
    for call, message in cases:
      with self.assertRaisesRegex(convert_lib.ConversionError, message):
        call()
    # Shards of another conversion in the output folder would be read with the new ones.
    convert_lib.convert(self.out, train, train_shards=2, workers=1)
    with self.assertRaisesRegex(convert_lib.ConversionError, "already holds 2 shards of another "
                                "conversion .*train-00000-of-00002"):
      convert_lib.convert(self.out, train, train_shards=3, workers=1)
    _write(os.path.join(train, "n00000002", "n00000002_9.JPEG"), b"\xff\xd8\xff garbage")
    with self.assertRaisesRegex(convert_lib.ConversionError, "n00000002_9.JPEG is not an image"):
      convert_lib.convert(self.out, train, train_shards=2, workers=1)

  def test_jpeg_header(self):
    image = testdata.photos(1, 20, 28)[0]
    self.assertEqual(convert_lib.jpeg_header(tf.io.encode_jpeg(image).numpy()), (20, 28, 3))
    gray = tf.io.encode_jpeg(image[..., :1], format="grayscale").numpy()
    self.assertEqual(convert_lib.jpeg_header(gray), (20, 28, 1))
    self.assertEqual(convert_lib.jpeg_header(_cmyk_jpeg(image)), (20, 28, 4))
    self.assertIsNone(convert_lib.jpeg_header(tf.io.encode_png(image).numpy()))


class CommandLineTest(tf.test.TestCase):

  def _run(self, *args):
    return subprocess.run([sys.executable, "-m", "tfmochi.data.imagenet_to_tfrecord", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)

  def test_python_m_converts_or_ends_with_one_message(self):
    inputs = imagenet_folders(self.create_tempdir().full_path)
    out = os.path.join(self.create_tempdir().full_path, "tfrecord")
    done = self._run(f"--train_dir={inputs['train']}", f"--validation_dir={inputs['val']}",
                     f"--devkit_dir={inputs['devkit']}", f"--output_dir={out}",
                     "--train_shards=2", "--validation_shards=1")
    self.assertEqual(done.returncode, 0, done.stderr)
    self.assertIn("Wrote 12 train and 6 validation images of 3 classes", done.stdout)
    self.assertEqual(len(tf.io.gfile.glob(os.path.join(out, "*-of-*"))), 3)
    failed = self._run("--train_dir=/nonexistent/train", f"--output_dir={out}")
    self.assertEqual(failed.returncode, 2)
    self.assertEqual(failed.stderr.strip().splitlines()[-1],
                     "tfmochi.data.imagenet_to_tfrecord: error: --train_dir /nonexistent/train "
                     "is not a folder (or cannot be read).")
