"""Images in class folders: `data_dir/<class>/...`, or split folders `train/` + `val/`.

`data_dir/<class>/...` (recursively, like torchvision ImageFolder), or with split folders
`data_dir/train/<class>/...` + `data_dir/{val|validation|test}/<class>/...`. Without split folders
tfmochi holds out a stratified, seeded share as "test" (ids are indices into the whole listing,
so train and test ids never collide). Start-up only lists the files (tf.io.gfile: gs:// works);
an image that cannot be decoded is skipped and counted while reading (`SkipLog`), or, with
validate="decode" (--validate_images), every file is decoded once at start-up instead.
"""

from __future__ import annotations

import concurrent.futures
import os

from absl import logging
import numpy as np
import tensorflow as tf

from tfmochi import augment
from tfmochi.data.source import MAX_LISTED_SKIPS, DataError, DataSource, Reader, SkipLog
from tfmochi.data.subsets import stratified_holdout

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_HELD_OUT_DIRS = ("val", "validation", "test")


def _sniff(header: bytes) -> str | None:
  """Image type from the file signature, None if it is none of the supported formats."""
  if header.startswith(b"\xff\xd8\xff"):
    return "jpeg"
  if header.startswith(b"\x89PNG\r\n\x1a\n"):
    return "png"
  if header.startswith(b"BM"):
    return "bmp"
  if header.startswith((b"GIF87a", b"GIF89a")):
    return "gif"
  return None


def _check_image(path: str, full: bool) -> str | None:
  """Returns why `path` is not a usable image, or None if it is."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read() if full else f.read(16)
  except (tf.errors.OpError, OSError) as e:
    return f"unreadable ({type(e).__name__})"
  if not data:
    return "empty file"
  if _sniff(data[:16]) is None:
    return "not a JPEG/PNG/BMP/GIF file"
  if full:
    try:
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
      return "cannot be decoded: " + str(getattr(e, "message", e)).strip().splitlines()[0][:120]
    if image.shape[0] == 0 or image.shape[1] == 0:
      return "empty image"
  return None


def _list_images(class_dir: str) -> list[str]:
  """Image files under class_dir (recursively, like torchvision ImageFolder), sorted."""
  paths = []
  for root, _, files in tf.io.gfile.walk(class_dir):
    paths += [os.path.join(root, f) for f in files
              if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
  return sorted(paths)


def _subdirs(path: str) -> list[str]:
  return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                if not d.startswith(".") and tf.io.gfile.isdir(os.path.join(path, d)))


def _folder_error(data_dir: str, problem: str) -> DataError:
  return DataError(
      f"--dataset=folder: {problem}. Expected images in {data_dir}/<class>/*.jpg (also .jpeg, "
      ".png, .bmp, .gif), or split folders train/<class>/... and val/<class>/... "
      "(or validation/, test/).")


def _decode_file(path: tf.Tensor) -> tf.Tensor:
  return augment.decode_image(tf.io.read_file(path))


def _split_root(data_dir: str, test: bool) -> tuple[list[str], str, bool]:
  """(class names, folder holding the split's class folders, whether there are split folders)."""
  top = _subdirs(data_dir)
  held_out = [d for d in _HELD_OUT_DIRS if d in top]
  split_folders = "train" in top and bool(_subdirs(os.path.join(data_dir, "train")))
  if not split_folders:
    classes, root = top, data_dir
  else:
    classes = _subdirs(os.path.join(data_dir, "train"))
    if test:
      if not held_out:
        raise _folder_error(data_dir, f"{data_dir}/train exists but there is no val/, "
                            "validation/ or test/ folder for the held-out split")
      root = os.path.join(data_dir, held_out[0])
    else:
      root = os.path.join(data_dir, "train")
    extra = sorted(set(_subdirs(root)) - set(classes))
    if extra:
      raise _folder_error(data_dir, f"{root} has classes that train/ lacks: {extra[:5]}")
  if not classes:
    loose = [f for f in tf.io.gfile.listdir(data_dir) if f.lower().endswith(IMAGE_EXTENSIONS)]
    detail = (f"found {len(loose)} image file(s) directly in it but no class subfolders" if loose
              else "it has no class subfolders")
    raise _folder_error(data_dir, f"{data_dir}: {detail}")
  return classes, root, split_folders


def _labelled_paths(root: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(paths object [N], labels int64 [N]): the images of each class folder, class by class."""
  paths, labels = [], []
  for label, cls in enumerate(classes):
    class_dir = os.path.join(root, cls)
    if tf.io.gfile.isdir(class_dir):
      found = _list_images(class_dir)
      paths += found
      labels += [label] * len(found)
  return np.array(paths, dtype=object), np.array(labels, dtype=np.int64)


def _usable(paths: np.ndarray, validate: str, num_workers: int | None, root: str
            ) -> tuple[np.ndarray, list[str]]:
  """(bool [N]: the files that pass `validate`, the paths of the others), the others logged."""
  if validate == "none":
    return np.ones([len(paths)], bool), []
  workers = num_workers or min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(lambda p: _check_image(p, validate == "decode"), paths))
  skipped = [(p, r) for p, r in zip(paths, reasons) if r is not None]
  if skipped:
    listed = "; ".join(f"{p} ({r})" for p, r in skipped[:MAX_LISTED_SKIPS])
    more = (f"; ... and {len(skipped) - MAX_LISTED_SKIPS} more"
            if len(skipped) > MAX_LISTED_SKIPS else "")
    logging.warning("tfmochi.data: skipped %d of %d image files in %s that cannot be used: %s%s",
                    len(skipped), len(paths), root, listed, more)
  return np.array([r is None for r in reasons], dtype=bool), [p for p, _ in skipped]


def load_folder(data_dir: str | None, test: bool, *, seed: int, holdout_fraction: float,
                validate: str, num_workers: int | None) -> DataSource:
  """The train (test=False) or held-out split of an image folder (see the module docstring)."""
  if not data_dir:
    raise DataError("--dataset=folder needs --data_dir: a folder with one subfolder of images "
                    "per class (data_dir/<class>/*.jpg).")
  if not tf.io.gfile.isdir(data_dir):
    raise DataError(f"--dataset=folder: data_dir {data_dir} does not exist or is not a folder.")
  if validate not in ("decode", "header", "none"):
    raise ValueError(f"validate must be 'decode', 'header' or 'none', got {validate!r}.")
  classes, root, split_folders = _split_root(data_dir, test)
  paths, labels = _labelled_paths(root, classes)
  if not len(paths):
    raise _folder_error(data_dir, f"no image files in the class subfolders of {root}")
  ids = np.arange(len(paths), dtype=np.int64)
  if not split_folders:
    num_test = int(round(len(paths) * holdout_fraction))
    train_idx, test_idx = stratified_holdout(labels, num_test, seed)
    keep = test_idx if test else train_idx
    if len(keep) == 0:
      raise _folder_error(data_dir, f"{len(paths)} images are too few for a held-out "
                          f"{'test' if test else 'train'} split at holdout_fraction="
                          f"{holdout_fraction}")
    paths, labels, ids = paths[keep], labels[keep], ids[keep]
  ok, skipped = _usable(paths, validate, num_workers, root)
  paths, labels, ids = paths[ok], labels[ok], ids[ok]
  if len(paths) == 0:
    raise _folder_error(data_dir, f"none of the {len(skipped)} image files in {root} can be "
                        "decoded")
  path_of = dict(zip(ids.tolist(), paths.tolist()))
  reader = Reader(decode=_decode_file, records=(paths.astype(str), labels, ids),
                  encoded=tf.io.read_file, skips=SkipLog(lambda i: path_of.get(i, f"id {i}")))
  return DataSource(name="folder", split="test" if test else "train", num_examples=len(paths),
                    num_classes=len(classes), has_labels=True, num_skipped=len(skipped),
                    skipped_files=tuple(skipped), _reader=reader)
