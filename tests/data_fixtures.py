"""What the tests of tfmochi.data share: tiny sources, batches, image bytes, temporary folders."""

from __future__ import annotations

import io
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
import tensorflow as tf

from tfmochi import data

SIZE = 16


def batches(ds: tf.data.Dataset, n: int) -> list[dict[str, np.ndarray]]:
  return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def assert_same_batches(test, a, b):
  test.assertEqual(len(a), len(b))
  for x, y in zip(a, b):
    test.assertAllEqual(x["id"], y["id"])
    test.assertAllEqual(x["label"], y["label"])
    test.assertAllEqual(x["view1"], y["view1"])
    test.assertAllEqual(x["view2"], y["view2"])


def tiny_source(n: int = 10) -> data.DataSource:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 12, 10, 3), dtype=np.uint8)
  return data.from_numpy(images, np.arange(n) % 3, name="tiny", ids=np.arange(n) + 100)


def tempdir(test: tf.test.TestCase) -> str:
  # Plain tempfile: tf.test's create_tempdir needs parsed absl flags, which pytest does not do.
  path = tempfile.mkdtemp(prefix="tfmochi-test-data-")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def png(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buf, "PNG")
  return buf.getvalue()


def jpeg(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def write(path: str, payload: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(payload)
