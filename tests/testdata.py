"""Test data shared by the test modules: real photos, ImageNet-layout TFRecords, streamed sources.

Imported as `import testdata` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os

import numpy as np
import pytest
import tensorflow as tf

from tfmochi import data
from tfmochi import topn


def optional_module(module: str, distribution: str):
  """`module` from an optional extra: the test is skipped when `distribution` is not installed and
  fails when it is installed but does not import (a broken extra must not pass as a skip)."""
  try:
    importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"{distribution} is not installed (the test extra)")
  return importlib.import_module(module)


# tensorflow-tpu's wheel has no XLA backend for the CPU. The tests that compile on the CPU on
# purpose (the TPU stand-in, XLA against TensorFlow's kernels, optimized-HLO checks) need the CPU
# wheel of the same TensorFlow version; everything else also runs on the TPU wheel.
needs_host_xla = pytest.mark.skipif(
    not topn.host_xla_available(),
    reason="this TensorFlow build has no XLA for the CPU (tensorflow-tpu's wheel)")


@functools.lru_cache(maxsize=None)
def _sample_photos() -> tuple[np.ndarray, ...]:
  """scikit-learn's two sample photographs (427 x 640 RGB), shipped with it (no download)."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  return tuple(load_sample_images().images)


def _crop(photo: int, y: int, x: int, height: int, width: int) -> np.ndarray:
  """The 96 x 128 window at (y, x) of sample photo `photo`, resized: uint8 [height, width, 3]."""
  window = _sample_photos()[photo][y:y + 96, x:x + 128]
  return tf.cast(tf.image.resize(window, [height, width]), tf.uint8).numpy()


def photos(n: int, height: int = 18, width: int = 24) -> list[np.ndarray]:
  """n small real photos: seeded crops of the two sample photographs, resized."""
  rng = np.random.default_rng(0)
  return [_crop(i % 2, rng.integers(0, 300), rng.integers(0, 480), height, width)
          for i in range(n)]


def tf_example(encoded: bytes | None = None, label: int | None = None, **extra: bytes) -> bytes:
  """A serialized tf.train.Example in the ImageNet layout (plus bytes features `extra`)."""
  feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
             for k, v in extra.items()}
  if encoded is not None:
    feature[data.TFRECORD_IMAGE_KEY] = tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[encoded]))
  if label is not None:
    feature[data.TFRECORD_LABEL_KEY] = tf.train.Feature(
        int64_list=tf.train.Int64List(value=[label]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord(path: str, records: list[bytes]) -> None:
  with tf.io.TFRecordWriter(path) as writer:
    for r in records:
      writer.write(r)


def write_imagenet_tfrecords(root: str, num_classes: int = 4, train_per_class: int = 12,
                             val_per_class: int = 3) -> str:
  """ImageNet-layout shards of real JPEG bytes: train-0000i-of-00002, validation-00000-of-00001.

  Labels run 1..num_classes (0 unused), as the TensorFlow ImageNet conversion scripts write them.
  Each class is one region of a sample photograph, so the classes are learnable. Returns root.
  """
  rng = np.random.default_rng(0)

  def example(label):
    y = int(rng.integers(0, 200)) + 100 * (label % 2)
    x = int(rng.integers(0, 300)) + 120 * (label // 2)
    image = _crop(label % 2, y, x, 24, 32)
    return tf_example(tf.io.encode_jpeg(image, quality=90).numpy(), label + 1)

  train = [example(c) for _ in range(train_per_class) for c in range(num_classes)]
  val = [example(c) for _ in range(val_per_class) for c in range(num_classes)]
  shards = {"train-00000-of-00002": train[::2], "train-00001-of-00002": train[1::2],
            "validation-00000-of-00001": val}
  for name, records in shards.items():
    write_tfrecord(os.path.join(root, name), records)
  return root


def streamed(source: data.DataSource) -> data.DataSource:
  """An in-memory `source` read as a stream (as tfds and TFRecords are), not by random access."""
  records = dict(zip(("raw", "label", "id"), source.records()))

  def open_stream(num_shards, index):
    return tf.data.Dataset.from_tensor_slices(records).shard(num_shards, index)

  return source.with_stream(open_stream)
