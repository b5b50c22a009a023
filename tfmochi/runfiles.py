"""The files of a run directory by name, and the readers and local writer that need no TensorFlow.

`tfmochi.rundir` owns a run directory and does its I/O through tf.io.gfile; it takes the file names
from here. The comparison sweep (`tfmochi.compare`) only starts processes and reads what they
wrote, so it reads runs through `read_json` / `read_text`, which import TensorFlow only for a path
with a scheme (gs://, ram://), and writes its local results through `write_local`, the local
branch of `rundir.write_bytes` too.
"""

from __future__ import annotations

import json
import os
import uuid

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
KNN_RANDOM_INIT_FILE = "knn_random_init.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"


def is_local(path: str) -> bool:
  """True for paths of the local file system (no scheme, or file://): rename there is atomic."""
  return "://" not in path or path.startswith("file://")


def _os_path(path: str) -> str:
  return path[len("file://"):] if path.startswith("file://") else path


def read_text(path: str) -> str | None:
  """The text at `path` (local, or through tf.io.gfile for a scheme); None if absent/unreadable."""
  try:
    if not is_local(path):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with tf.io.gfile.GFile(path) as f:
        return f.read()
    with open(_os_path(path), encoding="utf-8") as f:
      return f.read()
  except (OSError, ValueError):  # ValueError: undecodable bytes
    return None
  except Exception as e:  # noqa: BLE001  tf.errors.NotFoundError, without importing TF here
    if type(e).__name__ == "NotFoundError":
      return None
    raise


def read_json(path: str):
  """The JSON at `path` (as `read_text`), or None when absent, unreadable or not JSON."""
  text = read_text(path)
  try:
    return None if text is None else json.loads(text)
  except ValueError:
    return None


def write_local(path: str, data: bytes | str) -> None:
  """Writes `data` to the local `path` through a temporary sibling and a rename: readers see the
  old file or the whole new one (POSIX rename is atomic). The directory must exist."""
  path = _os_path(path)
  if isinstance(data, str):
    data = data.encode("utf-8")
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
