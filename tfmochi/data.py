"""Data sets and the distributed, resumable MoCo input pipeline.

`load(name, split, data_dir)` resolves a data set name to a `DataSource`:

  quickstart     offline: scikit-learn's 1,797 handwritten digits (8x8, shipped inside the
                 scikit-learn package), as uint8 RGB; stratified 1,497 / 300 split, fixed by
                 `load(..., seed=)` (default 0).
  imagenet2012   tensorflow-datasets, needs the manual download prepared in `data_dir`.
  imagenet100    imagenet2012 filtered to the 100 CMC classes (tfmochi/data/imagenet100_wnids.txt),
                 relabelled 0..99 in sorted-wnid order (= torchvision ImageFolder on the subset).
  folder         images in `data_dir/<class>/...`, or with split folders
                 `data_dir/train/<class>/...` + `data_dir/{val|validation|test}/<class>/...`.
                 Start-up only lists the files (tf.io.gfile: gs:// works); an image that cannot
                 be decoded is skipped and counted while reading (`SkipLog`, summary.json
                 "skipped_images"); `validate="decode"` (--validate_images) checks every file once
                 at start-up instead.
  tfrecord       ImageNet-layout TFRecords (tf.train.Example with `image/encoded` JPEG bytes and
                 `image/class/label`, as the TensorFlow ImageNet conversion scripts write them and
                 TPU reference models read them). `data_dir` is a folder holding `train-*` and
                 `validation-*` files, or a glob of the train files (`gs://bucket/train-*`), whose
                 held-out split is the same glob with the last "train" of its file-name part
                 replaced by "validation". Labels are `image/class/label - tfrecord_label_offset`
                 (default 1: ImageNet's 1..1000 -> 0..999; a smaller label fails at load or while
                 reading). Each input pipeline reads every P-th file (P = input pipelines = hosts),
                 16 files interleaved in parallel; undecodable records are skipped and counted.
  anything else  a tensorflow-datasets name (cifar10, stl10, ...) read from `data_dir` (gs:// ok).

Nothing is ever downloaded implicitly: a data set that is not prepared stops at once with a
`DataError` that says how to prepare it (this must work on a machine without internet).

Examples are dicts {"image": uint8 [H, W, 3], "label": int64 (-1 if unlabelled), "id": int64}.
`id` identifies the sample: unique within a split and stable across runs and shardings. For a
held-out split that tfmochi makes (quickstart, folder without split folders) it is the index in
the whole collection, so train and test ids never collide; for tfds it is the record index within
the tfds split (imagenet100 keeps the imagenet2012 index). Ids need not be contiguous.

`pretrain_dataset` turns a source into an infinite stream of per-replica batches of two views.
Data-position contract (what makes resume exact):
  * steps_per_epoch = num_examples // global_batch_size (MoCo's drop_last), every epoch has
    exactly that many steps and no batch straddles two epochs;
  * at epoch e every input pipeline permutes its shard with a seed derived from (seed, e,
    pipeline id) and feeds the first steps_per_epoch * (replicas per pipeline) batches of it;
  * the views of sample `id` at epoch e use the augmentation seed derived from (seed, e, id);
  * so batch k is a pure function of (seed, k, topology = global batch, replicas, input
    pipelines); `start_step=k` starts at epoch k // steps_per_epoch and skips the first
    (k % steps_per_epoch) steps' examples of that epoch *before* decoding. In-memory sources (quickstart, folder) skip by slicing the permutation
    (free); tfds and tfrecord sources read, without decoding, the skipped records of the current
    epoch (at ImageNet scale at most one epoch's share of the encoded bytes per host, I/O only).
  * tfrecord: per epoch the pipeline's file order is a seeded permutation, 16 files are
    interleaved one record at a time and records pass a 10,000-record seeded shuffle buffer. The
    batches are a pure function of (seed, step, topology) only with --deterministic (tf.data then
    keeps the interleave order); without it, a resumed epoch skips the right *number* of records
    but not the same ones, so within that one epoch some images repeat and others are missed -
    what TPU reference pipelines accept (they restart the input at a checkpoint without any skip).
  * An undecodable image (folder, tfrecord) is dropped and the batch takes the stream's next
    example: exact resume then assumes the same files decode (it holds whenever none is bad;
    --validate_images lists bad folder files once).
  * Views are uint8 (`augment.two_views_uint8`): JPEG bytes are decoded per view with the crop
    fused into the decode (`augment.decode_random_resized_crop`); the step normalises them on the
    device (`augment.to_model_input`). `eval_dataset` yields normalised float32 as before.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import importlib.resources
import os
import re
import threading
from collections.abc import Callable, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tfmochi import augment

AUTOTUNE = tf.data.AUTOTUNE
BUILTIN_DATASETS = ("quickstart", "imagenet2012", "imagenet100", "folder", "tfrecord")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_HELD_OUT_DIRS = ("val", "validation", "test")
_TEST_SPLITS = ("test", "validation", "val")
_QUICKSTART_TEST_SIZE = 300
# Split sizes of ImageNet-1k (tfds imagenet2012) and of its CMC 100-class subset. The subset's
# size is used only when the underlying imagenet2012 split has exactly the ImageNet-1k size and
# the shipped class list is used; otherwise the filtered split is counted once (slow on real data).
_IMAGENET_SIZES = {"train": 1_281_167, "validation": 50_000}
_IMAGENET100_SIZES = {"train": 126_689, "validation": 5_000}
_MAX_LISTED_SKIPS = 20


class DataError(ValueError):
  """A data set cannot be used as asked; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------
# DataSource


class SkipLog:
  """Counts the images an input pipeline could not decode and dropped (thread-safe).

  Undecodable files are found while training, not at start-up (listing 1.28M files is fast,
  decoding them is hours): each is dropped from the stream, logged as a warning (the first
  `_MAX_LISTED_SKIPS` by name, then every 100th) and counted here. `count` is what this process's
  pipelines dropped since it started (a resumed run starts again from 0).
  """

  def __init__(self, describe: Callable[[int], str]):
    self._describe = describe
    self._lock = threading.Lock()
    self.count = 0
    self.examples: list[str] = []

  def record(self, sample_id) -> bool:
    """Called from the pipeline (tf.py_function) for a dropped sample; returns False."""
    what = self._describe(int(sample_id))
    with self._lock:
      self.count += 1
      n = self.count
      if len(self.examples) < _MAX_LISTED_SKIPS:
        self.examples.append(what)
    if n <= _MAX_LISTED_SKIPS or n % 100 == 0:
      logging.warning("tfmochi.data: skipped an image that cannot be decoded: %s (%d skipped so "
                      "far; run once with --validate_images to list them all)", what, n)
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class _Reader:
  """How a source produces raw examples and decodes them (internal).

  Exactly one of `records` (random access: numpy arrays raw/label/id) or `open_stream`
  ((num_shards, index) -> tf.data.Dataset of raw dicts in a deterministic order) is set.
  `decode` maps a raw image (uint8 array or encoded bytes or a file path) to uint8 [H, W, 3].
  `encoded`, if set, maps a raw image to its encoded file bytes (the pretraining views then
  decode only their crop windows). `open_shuffled` ((num_shards, index, seed) -> raw dicts) is a
  stream whose file order is shuffled by `seed` (TFRecords), used per epoch instead of
  `open_stream`. With `skips` set, images that fail to decode are dropped and counted there.
  """
  decode: Callable[[tf.Tensor], tf.Tensor]
  records: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
  open_stream: Callable[[int, int], tf.data.Dataset] | None = None
  encoded: Callable[[tf.Tensor], tf.Tensor] | None = None
  open_shuffled: Callable[[int, int, tf.Tensor], tf.data.Dataset] | None = None
  skips: SkipLog | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class DataSource:
  """One split of a data set, ready to be read whole or per input pipeline.

  Attributes:
    name: data set name as passed to `load`.
    split: "train" or "test" (or a raw tfds split expression).
    num_examples: number of examples in the split (after skipping bad files).
    num_classes: number of classes, None for unlabelled data sets.
    has_labels: False when every label is -1.
    num_skipped: image files found undecodable at start-up and left out (folders with
      validate="decode", i.e. --validate_images).
    skipped_files: their paths.
    skipped_while_reading: images the input pipelines of this process dropped because they could
      not be decoded (folders and TFRecords; see SkipLog), 0 for the other sources.
  """
  name: str
  split: str
  num_examples: int
  num_classes: int | None
  has_labels: bool
  num_skipped: int = 0
  skipped_files: tuple[str, ...] = ()
  _reader: _Reader | None = dataclasses.field(default=None, repr=False)

  def raw(self, num_shards: int = 1, index: int = 0) -> tf.data.Dataset:
    """Undecoded examples {"raw", "label", "id"} of shard `index` of `num_shards`."""
    _check_shard(num_shards, index)
    if self._reader.records is not None:
      raw, labels, ids = _shard_records(self._reader.records, num_shards, index)
      return tf.data.Dataset.from_tensor_slices({"raw": raw, "label": labels, "id": ids})
    return self._reader.open_stream(num_shards, index)

  def decode(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """{"raw", "label", "id"} -> {"image": uint8 [H, W, 3], "label", "id"}."""
    return {"image": self._reader.decode(example["raw"]), "label": example["label"],
            "id": example["id"]}

  def shard(self, num_shards: int = 1, index: int = 0) -> tf.data.Dataset:
    """Decoded examples of one shard, in a fixed order (each shard is read by one pipeline)."""
    return _map_skipping_bad(self, self.raw(num_shards, index), self.decode,
                             _placeholder(image=(0, 0, tf.uint8)), num_parallel_calls=AUTOTUNE,
                             deterministic=True)

  @property
  def skipped_while_reading(self) -> int:
    return self._reader.skips.count if self._reader.skips is not None else 0

  def for_input_context(self, input_context: tf.distribute.InputContext | None
                        ) -> tf.data.Dataset:
    """The shard read by this host's input pipeline (everything without a context)."""
    if input_context is None:
      return self.dataset
    return self.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)

  @property
  def dataset(self) -> tf.data.Dataset:
    """The whole split, decoded: {"image": uint8 [H, W, 3], "label": int64, "id": int64}."""
    return self.shard(1, 0)


def _check_shard(num_shards: int, index: int) -> None:
  if num_shards < 1 or not 0 <= index < num_shards:
    raise ValueError(f"Bad shard {index} of {num_shards}.")


def _shard_records(records, num_shards: int, index: int):
  # Strided like tf.data.Dataset.shard: shard sizes differ by at most one.
  return tuple(a[index::num_shards] for a in records)


def _map_skipping_bad(source: DataSource, ds: tf.data.Dataset, fn: Callable, placeholder: dict,
                      *, num_parallel_calls: int, deterministic: bool | None
                      ) -> tf.data.Dataset:
  """`ds.map(fn)`, except that an element where `fn` fails (an undecodable image) is dropped
  and counted in the source's SkipLog. Plain `ds.map(fn)` for sources without one.

  Each element is mapped inside a one-element dataset with `ignore_errors`, followed by a
  placeholder marked not-ok, and the first of the two is kept: a validity flag without raising.
  (A nested `Dataset.reduce` per element would do the same but costs ~1 s per element; this
  interleave costs ~0.5 ms, measured on a shared machine, against tens of ms to decode and
  augment a 224 px pair of views.) With block_length 1 each element yields exactly one output,
  so the order is the input order whenever the pipeline is deterministic. `placeholder` has
  fn's output structure and dtypes (shapes compatible with fn's); it never leaves this function.
  """
  skips = source._reader.skips  # pylint: disable=protected-access
  if skips is None:
    return ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=deterministic)

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def attempt(*args):
    sample_id = args[-1]["id"]  # every caller's last argument is the raw example
    tried = tf.data.Dataset.from_tensors(args).map(lambda *a: (True, fn(*a))).ignore_errors()
    fallback = tf.data.Dataset.from_tensors((False, placeholder))
    return tried.concatenate(fallback).take(1).map(lambda ok, out: (ok, out, sample_id))

  @tf.autograph.experimental.do_not_convert
  def keep(ok, out, sample_id):
    del out
    return tf.cond(ok, lambda: tf.constant(True),
                   lambda: tf.reshape(tf.py_function(skips.record, [sample_id], tf.bool), []))

  ds = ds.interleave(attempt, cycle_length=AUTOTUNE, block_length=1,
                     num_parallel_calls=num_parallel_calls, deterministic=deterministic)
  return ds.filter(keep).map(lambda ok, out, sample_id: out)


def _placeholder(**images: tuple[int, int, tf.DType]) -> dict[str, tf.Tensor]:
  """Zero images {name: [h, w, 3]} plus "label" and "id": a stand-in example."""
  out = {k: tf.zeros([h, w, 3], dtype) for k, (h, w, dtype) in images.items()}
  return dict(out, label=tf.constant(-1, tf.int64), id=tf.constant(-1, tf.int64))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps per epoch: full global batches only (MoCo drops the last partial batch)."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
  return num_examples // global_batch_size


# ----------------------------------------------------------------------------------------------
# load


def load(name: str, split: str = "train", data_dir: str | None = None, *, seed: int = 0,
         holdout_fraction: float = 0.1, validate: str = "none", download: bool = False,
         num_workers: int | None = None, tfrecord_label_offset: int = 1) -> DataSource:
  """Resolves a data set name and split to a DataSource. Fails fast with a DataError.

  Args:
    name: "quickstart", "imagenet2012", "imagenet100", "folder", "tfrecord" or a
      tensorflow-datasets name.
    split: "train" or "test" ("validation"/"val" are aliases of "test"; for ImageNet the held-out
      split is tfds' "validation"). tfds sources also accept any tfds split expression.
    data_dir: tfds data directory (may be gs://; None = tfds default); for "folder", the
      image folder; for "tfrecord", a folder of train-*/validation-* files or a glob of the train
      files (see _tfrecord_pattern).
    seed: seed of the held-out split tfmochi makes when a data set has none (quickstart, folder
      without split folders). Use the same value for "train" and "test".
    holdout_fraction: share of a folder held out as "test" when it has no split folders.
    validate: folder images: "none" (default: the files are only listed here, through
      tf.io.gfile, so gs:// works and 1.28M files take minutes, not hours; an image that fails
      to decode is dropped while reading and counted, see SkipLog), "decode" (every file is
      decoded once here and bad files are left out and listed: --validate_images) or "header"
      (only the file signature is read here).
    download: allow tfds to download and prepare a missing data set (needs internet; never for
      ImageNet, whose archives must be downloaded by hand).
    num_workers: threads for validating folder images (default: 4 x CPUs, at most 32).
    tfrecord_label_offset: "tfrecord" only: subtracted from every `image/class/label` (1 for the
      ImageNet layout, whose labels run 1..1000; 0 for files with 0-based labels).

  Returns:
    A DataSource.

  Raises:
    DataError: unknown name, data not prepared, empty or malformed folder, unknown split.
  """
  test = split in _TEST_SPLITS
  if split not in ("train",) + _TEST_SPLITS and name in ("quickstart", "folder"):
    raise DataError(f"Data set {name!r} has the splits 'train' and 'test'; got {split!r}.")
  if name == "quickstart":
    return _quickstart(test, seed)
  if name == "folder":
    return _folder(data_dir, test, seed=seed, holdout_fraction=holdout_fraction,
                   validate=validate, num_workers=num_workers)
  if name == "tfrecord":
    if split not in ("train",) + _TEST_SPLITS:
      raise DataError(f"Data set 'tfrecord' has the splits 'train' and 'test'; got {split!r}.")
    return _tfrecord(data_dir, test, label_offset=tfrecord_label_offset)
  if name == "imagenet100":
    return _tfds_source("imagenet2012", split, data_dir, download=download,
                        wnids=imagenet100_wnids(), display_name="imagenet100")
  return _tfds_source(name, split, data_dir, download=download)


def _unknown_name_error(name: str, known: Sequence[str] = ()) -> DataError:
  close = difflib.get_close_matches(name, list(BUILTIN_DATASETS) + list(known), n=3)
  hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  return DataError(
      f"Unknown data set {name!r}.{hint} Choose one of: {', '.join(BUILTIN_DATASETS)}, or any "
      "tensorflow-datasets name (e.g. cifar10, stl10; "
      "https://www.tensorflow.org/datasets/catalog).")


def from_numpy(images: np.ndarray, labels: np.ndarray | None = None, *, name: str = "numpy",
               split: str = "train", ids: np.ndarray | None = None,
               num_classes: int | None = None) -> DataSource:
  """An in-memory DataSource (tests, small custom data).

  Args:
    images: uint8 [N, H, W, 3] (or [N, H, W, 1], tiled to RGB when read).
    labels: int [N], or None for unlabelled data (labels become -1).
    name: reported name.
    split: reported split.
    ids: int64 [N] unique sample ids (default 0..N-1).
    num_classes: default max(label) + 1.

  Returns:
    A DataSource with random access (exact, free resume).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
    raise DataError(f"images must be uint8 [N, H, W, 3|1], got {images.dtype} {images.shape}.")
  n = len(images)
  has_labels = labels is not None
  labels = (np.full([n], -1, np.int64) if labels is None
            else np.asarray(labels, dtype=np.int64).reshape([n]))
  ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64).reshape([n])
  if len(np.unique(ids)) != n:
    raise DataError("ids must be unique.")
  if has_labels and num_classes is None:
    num_classes = int(labels.max()) + 1 if n else 0

  def decode(raw):
    return augment.to_rgb(raw)

  return DataSource(name=name, split=split, num_examples=n,
                    num_classes=num_classes if has_labels else None, has_labels=has_labels,
                    _reader=_Reader(decode=decode, records=(images, labels, ids)))


# ----------------------------------------------------------------------------------------------
# quickstart: scikit-learn digits


def _stratified_holdout(labels: np.ndarray, num_test: int, seed: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Seeded stratified split of indices 0..N-1 with exactly `num_test` held out.

  Each class holds out its proportional share (largest remainders get the rounding), so the
  split depends only on (labels, num_test, seed).

  Returns:
    (train_indices, test_indices), both sorted int64.
  """
  n = len(labels)
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_test / max(n, 1)
  quota = np.floor(exact).astype(np.int64)
  extra = num_test - int(quota.sum())
  order = np.argsort(-(exact - quota), kind="stable")  # largest remainders first
  quota[order[:extra]] += 1
  rng = np.random.default_rng(seed)
  test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q]
                         for c, q in zip(classes, quota)] + [np.zeros([0], np.int64)])
  test = np.sort(test).astype(np.int64)
  train = np.setdiff1d(np.arange(n, dtype=np.int64), test)
  return train, test


def _quickstart(test: bool, seed: int) -> DataSource:
  try:
    from sklearn import datasets as sk_datasets  # local: only this data set needs it
  except ImportError as e:
    raise DataError("The quickstart data set needs scikit-learn: pip install scikit-learn") from e
  digits = sk_datasets.load_digits()
  # 0..16 gray levels -> 0..255, tiled to RGB.
  gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
  images = np.repeat(gray[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  train, held_out = _stratified_holdout(labels, _QUICKSTART_TEST_SIZE, seed)
  idx = held_out if test else train
  return from_numpy(images[idx], labels[idx], name="quickstart",
                    split="test" if test else "train", ids=idx, num_classes=10)


# ----------------------------------------------------------------------------------------------
# folder


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


def _folder(data_dir: str | None, test: bool, *, seed: int, holdout_fraction: float,
            validate: str, num_workers: int | None) -> DataSource:
  if not data_dir:
    raise DataError("--dataset=folder needs --data_dir: a folder with one subfolder of images "
                    "per class (data_dir/<class>/*.jpg).")
  if not tf.io.gfile.isdir(data_dir):
    raise DataError(f"--dataset=folder: data_dir {data_dir} does not exist or is not a folder.")
  if validate not in ("decode", "header", "none"):
    raise ValueError(f"validate must be 'decode', 'header' or 'none', got {validate!r}.")
  top = _subdirs(data_dir)
  held_out = [d for d in _HELD_OUT_DIRS if d in top]
  split_folders = "train" in top and bool(_subdirs(os.path.join(data_dir, "train")))
  if split_folders:
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
  else:
    classes, root = top, data_dir
  if not classes:
    loose = [f for f in tf.io.gfile.listdir(data_dir) if f.lower().endswith(IMAGE_EXTENSIONS)]
    detail = (f"found {len(loose)} image file(s) directly in it but no class subfolders" if loose
              else "it has no class subfolders")
    raise _folder_error(data_dir, f"{data_dir}: {detail}")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    class_dir = os.path.join(root, cls)
    if tf.io.gfile.isdir(class_dir):
      found = _list_images(class_dir)
      paths += found
      labels += [label] * len(found)
  if not paths:
    raise _folder_error(data_dir, f"no image files in the class subfolders of {root}")
  paths = np.array(paths, dtype=object)
  labels = np.array(labels, dtype=np.int64)
  ids = np.arange(len(paths), dtype=np.int64)
  if not split_folders:
    num_test = int(round(len(paths) * holdout_fraction))
    train_idx, test_idx = _stratified_holdout(labels, num_test, seed)
    keep = test_idx if test else train_idx
    if len(keep) == 0:
      raise _folder_error(data_dir, f"{len(paths)} images are too few for a held-out "
                          f"{'test' if test else 'train'} split at holdout_fraction="
                          f"{holdout_fraction}")
    paths, labels, ids = paths[keep], labels[keep], ids[keep]

  skipped: list[tuple[str, str]] = []
  if validate != "none":
    workers = num_workers or min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      reasons = list(pool.map(lambda p: _check_image(p, validate == "decode"), paths))
    ok = np.array([r is None for r in reasons], dtype=bool)
    skipped = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    paths, labels, ids = paths[ok], labels[ok], ids[ok]
  if skipped:
    listed = "; ".join(f"{p} ({r})" for p, r in skipped[:_MAX_LISTED_SKIPS])
    more = f"; ... and {len(skipped) - _MAX_LISTED_SKIPS} more" if len(
        skipped) > _MAX_LISTED_SKIPS else ""
    logging.warning("tfmochi.data: skipped %d of %d image files in %s that cannot be used: %s%s",
                    len(skipped), len(skipped) + len(paths), root, listed, more)
  if len(paths) == 0:
    raise _folder_error(data_dir, f"none of the {len(skipped)} image files in {root} can be "
                        "decoded")
  path_of = dict(zip(ids.tolist(), paths.tolist()))
  reader = _Reader(decode=_decode_file, records=(paths.astype(str), labels, ids),
                   encoded=tf.io.read_file,
                   skips=SkipLog(lambda i: path_of.get(i, f"id {i}")))
  return DataSource(name="folder", split="test" if test else "train", num_examples=len(paths),
                    num_classes=len(classes), has_labels=True, num_skipped=len(skipped),
                    skipped_files=tuple(p for p, _ in skipped), _reader=reader)


# ----------------------------------------------------------------------------------------------
# TFRecord files in the ImageNet layout

# Feature keys of the TensorFlow ImageNet conversion scripts (build_imagenet_data.py), read by
# the TPU reference models: one tf.train.Example per image.
TFRECORD_IMAGE_KEY = "image/encoded"
TFRECORD_LABEL_KEY = "image/class/label"
# Standard ImageNet-1k shard counts of those scripts, and the split sizes they hold.
_IMAGENET_TFRECORD_SHARDS = {"train": (1024, 1_281_167), "validation": (128, 50_000)}
_TFRECORD_CYCLE = 16  # files read at once per input pipeline
_FILE_ID_SHIFT = 32  # id = file index << 32 | record index within the file
_GLOB_CHARS = re.compile(r"[*?\[]")


def _tfrecord_error(problem: str) -> DataError:
  return DataError(
      f"--dataset=tfrecord: {problem}. Pass --data_dir=<folder> with train-* and validation-* "
      "TFRecord files (gs:// works), or a glob of the train files (gs://bucket/train-*; the "
      "held-out split is the same glob with 'train' replaced by 'validation'). Records are "
      f"tf.train.Examples with {TFRECORD_IMAGE_KEY} (JPEG bytes) and {TFRECORD_LABEL_KEY} "
      "(int64), as the TensorFlow ImageNet conversion scripts write them.")


def _tfrecord_pattern(data_dir: str, test: bool) -> str:
  """The glob of a split's files: <dir>/train-* | <dir>/validation-*, or the given glob (train)
  and the glob with its last 'train' (in the file-name part) replaced by 'validation' (test)."""
  if not _GLOB_CHARS.search(data_dir):
    try:
      is_dir = tf.io.gfile.isdir(data_dir)
    except tf.errors.OpError as e:
      raise _unreadable(data_dir, e) from e
    if is_dir:
      return os.path.join(data_dir, "validation-*" if test else "train-*")
  if not test:
    return data_dir
  head, tail = os.path.split(data_dir)
  if "train" not in tail:
    raise _tfrecord_error(f"cannot name the held-out files of {data_dir}: its file-name part has "
                          "no 'train' to replace by 'validation'")
  i = tail.rindex("train")
  return os.path.join(head, tail[:i] + "validation" + tail[i + len("train"):])


def _unreadable(path: str, e: Exception) -> DataError:
  reason = str(getattr(e, "message", e)).strip().splitlines()[0][:200] if str(e) else ""
  return DataError(
      f"Cannot read {path} ({type(e).__name__}: {reason}). Check that the path and bucket exist "
      "and that this machine's credentials may read them (for gs://: the VM's service account "
      "needs roles/storage.objectViewer on the bucket; `gcloud storage ls <path>` must work).")


def _records(path: str):
  """Serialized records of one file, read without TensorFlow ops.

  Sources are loaded before the distribution strategy exists, and `--cpu_replicas` can only split
  the CPU before the first op runs, so start-up reads files through the record reader that
  tf.io.gfile uses (tf_record_iterator), not through tf.data.
  """
  try:
    yield from tf.compat.v1.io.tf_record_iterator(path)
  except tf.errors.DataLossError as e:
    raise _tfrecord_error(f"{path} is not a TFRecord file (or is corrupt): "
                          f"{str(e.message).splitlines()[0][:150]}") from e
  except tf.errors.OpError as e:
    raise _unreadable(path, e) from e


def _first_records(files: list[str], n: int) -> list[bytes]:
  """Up to n serialized records from the first non-empty files (fails as a DataError)."""
  out: list[bytes] = []
  for path in files[:8]:
    for record in _records(path):
      out.append(record)
      if len(out) >= n:
        return out
  return out


def _parse_example(record: bytes, path: str) -> dict:
  try:
    example = tf.train.Example.FromString(record)
  except Exception as e:  # pylint: disable=broad-except  (protobuf DecodeError)
    raise _tfrecord_error(f"the records of {path} are not tf.train.Example protos ({e})") from e
  return example.features.feature


def _label(features, default: int) -> int:
  values = features[TFRECORD_LABEL_KEY].int64_list.value if TFRECORD_LABEL_KEY in features else ()
  return int(values[0]) if values else default


def _tfrecord_count(files: list[str], label_offset: int) -> tuple[int, int, int]:
  """(records, smallest label, largest label) of the files: one pass, files read in parallel."""
  logging.warning("tfmochi.data: counting the records of %d TFRecord files (one pass; ImageNet's "
                  "standard 1024/128 shards are known and not counted).", len(files))

  def count(path):
    n, lo, hi = 0, None, None
    for record in _records(path):
      y = _label(_parse_example(record, path), label_offset - 1)
      n, lo, hi = n + 1, y if lo is None else min(lo, y), y if hi is None else max(hi, y)
    return n, lo, hi

  with concurrent.futures.ThreadPoolExecutor(min(32, 4 * (os.cpu_count() or 1))) as pool:
    counts = [c for c in pool.map(count, files) if c[0]]
  return (sum(c[0] for c in counts), min(c[1] for c in counts), max(c[2] for c in counts))


def _standard_imagenet(files: list[str], test: bool) -> int | None:
  """The split size if `files` are exactly the standard ImageNet-1k shards, else None."""
  split = "validation" if test else "train"
  shards, size = _IMAGENET_TFRECORD_SHARDS[split]
  names = {os.path.basename(f) for f in files}
  expected = {f"{split}-{i:05d}-of-{shards:05d}" for i in range(shards)}
  return size if names == expected else None


def _tfrecord(data_dir: str | None, test: bool, *, label_offset: int) -> DataSource:
  """TFRecords in the ImageNet layout (see `_tfrecord_pattern` for where the splits are).

  Labels are `image/class/label - label_offset` (ImageNet: 1..1000 -> 0..999). ids are
  (file index in the sorted listing) << 32 | (record index in the file): unique and stable.
  Split size: known for the standard 1024 train / 128 validation ImageNet shards, counted with
  one pass otherwise (which also checks every label against the offset). Each input pipeline
  reads every P-th file (P pipelines), or, with fewer files than pipelines, every file and keeps
  every P-th record.
  """
  if not data_dir:
    raise _tfrecord_error("--data_dir is required")
  pattern = _tfrecord_pattern(data_dir, test)
  try:
    files = sorted(tf.io.gfile.glob(pattern))
  except tf.errors.OpError as e:
    raise _unreadable(pattern, e) from e
  if not files:
    raise _tfrecord_error(f"no files match {pattern}")
  records = _first_records(files, 256)
  if not records:
    raise _tfrecord_error(f"the files matching {pattern} hold no records")
  features = _parse_example(records[0], files[0])
  missing = [k for k in (TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY) if k not in features]
  if missing:
    raise _tfrecord_error(f"the records of {files[0]} have no {' or '.join(missing)} feature "
                          f"(they have: {', '.join(sorted(features)) or 'none'})")
  first_labels = [_label(_parse_example(r, files[0]), label_offset - 1) for r in records]
  num_examples = _standard_imagenet(files, test)
  num_classes = 1000 if num_examples is not None and label_offset == 1 else None
  lo = min(first_labels, default=label_offset)
  if num_examples is None:
    num_examples, lo, hi = _tfrecord_count(files, label_offset)
    num_classes = hi - label_offset + 1
  if lo < label_offset:
    raise _tfrecord_error(
        f"{pattern} has the label {lo} (or records without one), below "
        f"--tfrecord_label_offset={label_offset} (the "
        "ImageNet layout's labels run 1..1000 and 0 is unused, hence the default 1); for files "
        "with 0-based labels pass --tfrecord_label_offset=0")
  spec = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
          TFRECORD_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=label_offset - 1)}

  def read_file(path, file_index):
    @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
    def parse(position, record):
      ex = tf.io.parse_single_example(record, spec)
      label = ex[TFRECORD_LABEL_KEY] - label_offset
      check = tf.debugging.assert_non_negative(
          label, message=f"--dataset=tfrecord: a record has a label below "
                         f"--tfrecord_label_offset={label_offset} (or none)")
      with tf.control_dependencies([check]):
        label = tf.identity(label)
      return {"raw": ex[TFRECORD_IMAGE_KEY], "label": label,
              "id": tf.bitwise.left_shift(file_index, _FILE_ID_SHIFT) + position}

    return tf.data.TFRecordDataset(path, buffer_size=8 << 20).enumerate().map(parse)

  def open_files(num_shards: int, index: int, seed: tf.Tensor | None) -> tf.data.Dataset:
    indices = tf.range(len(files), dtype=tf.int64)
    by_file = len(files) >= num_shards
    if by_file:
      indices = indices[index::num_shards]
    if seed is not None:  # a new file order every epoch
      indices = tf.random.experimental.stateless_shuffle(
          indices, tf.stack([seed, tf.constant(0, tf.int64)]))
    ds = tf.data.Dataset.from_tensor_slices((tf.gather(tf.constant(files), indices), indices))
    # deterministic=None: ordered exactly when the pipeline's options ask for it.
    ds = ds.interleave(read_file, cycle_length=min(_TFRECORD_CYCLE, len(files)), block_length=1,
                       num_parallel_calls=AUTOTUNE, deterministic=None)
    return ds if by_file else ds.shard(num_shards, index)

  def describe(sample_id: int) -> str:
    f, r = sample_id >> _FILE_ID_SHIFT, sample_id & ((1 << _FILE_ID_SHIFT) - 1)
    return f"record {r} of {files[f]}" if 0 <= f < len(files) else f"id {sample_id}"

  return DataSource(
      name="tfrecord", split="test" if test else "train", num_examples=num_examples,
      num_classes=num_classes, has_labels=True,
      _reader=_Reader(decode=augment.decode_image, encoded=_identity,
                      open_stream=lambda n, i: open_files(n, i, None),
                      open_shuffled=open_files, skips=SkipLog(describe)))


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets


def imagenet100_wnids() -> list[str]:
  """The 100 ImageNet class wnids of ImageNet-100 (CMC subset), in the shipped file's order."""
  text = importlib.resources.files("tfmochi").joinpath("data/imagenet100_wnids.txt").read_text()
  wnids = [w.strip() for w in text.split() if w.strip()]
  if len(wnids) != 100 or len(set(wnids)) != 100:
    raise DataError(f"tfmochi/data/imagenet100_wnids.txt must list 100 distinct wnids, "
                    f"found {len(set(wnids))}.")
  return wnids


def _imagenet_instructions(builder, display_name: str) -> DataError:
  root = str(builder.data_dir_root)
  manual = os.path.join(root, "downloads", "manual")
  tars = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
  present = [t for t in tars if tf.io.gfile.exists(os.path.join(manual, t))]
  if len(present) == len(tars):
    state = (f"The archives are in {manual}, but the data set has not been built yet (this "
             "takes hours and ~300 GB of disk, so tfmochi does not start it for you).")
  else:
    missing = [t for t in tars if t not in present]
    state = f"Missing in {manual}: {', '.join(missing)}."
  subset = (" imagenet100 is read from the prepared imagenet2012 (filtered to 100 classes)."
            if display_name != "imagenet2012" else "")
  return DataError(
      f"{display_name}: ImageNet (tfds imagenet2012) is not prepared in {root}.{subset} "
      f"{state} ImageNet cannot be downloaded automatically. To prepare it: "
      "(1) download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
      "https://image-net.org/download-images (registration required); "
      f"(2) put both in {manual}; "
      f"(3) run: tfds build imagenet2012 --data_dir={root} --manual_dir={manual}; "
      f"(4) pass --data_dir={root} (a gs:// copy of the prepared folder works too).")


def _not_prepared(builder, name: str, display_name: str) -> DataError:
  if name == "imagenet2012":
    return _imagenet_instructions(builder, display_name)
  root = str(builder.data_dir_root)
  return DataError(
      f"Data set {name!r} is not prepared in {root}. tfmochi does not download data "
      "during training (this machine may have no internet). On a machine with internet run: "
      f"tfds build {name} --data_dir={root}  and then pass --data_dir={root} here (copy the "
      "folder over, or use a gs:// bucket).")


def _resolve_tfds_split(builder, name: str, split: str) -> str:
  known = set(builder.info.splits.keys())  # empty when unprepared (and under tfds mock_data)
  if split not in _TEST_SPLITS:
    return split
  if name.startswith("imagenet2012"):
    return "validation"  # imagenet2012's "test" split has no labels
  for candidate in ("test", "validation"):
    if candidate in known:
      return candidate
  if known:
    raise DataError(f"Data set {name!r} has no held-out split (it has: {sorted(known)}). Use a "
                    "tfds split expression, e.g. split='train[90%:]'.")
  return "test"


def _file_offsets(builder, split: str) -> np.ndarray:
  """Index of the first record of every file of the (base) split, for global record ids."""
  base = re.split(r"[\[(+]", split)[0]
  try:
    lengths = list(builder.info.splits[base].shard_lengths)
  except (KeyError, ValueError, TypeError):
    lengths = []
  if not lengths:
    return np.zeros([1], np.int64)
  return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def _record_index(tfds_id: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
  """'name-split.tfrecord-00003-of-00016__57' -> offsets[3] + 57 (int64 index in the split)."""
  file_idx = tf.strings.to_number(
      tf.strings.regex_replace(tfds_id, r"^.*-(\d+)-of-\d+__\d+$", r"\1"), tf.int64)
  record = tf.strings.to_number(tf.strings.regex_replace(tfds_id, r"^.*__(\d+)$", r"\1"),
                                tf.int64)
  file_idx = tf.minimum(file_idx, tf.cast(tf.size(offsets) - 1, tf.int64))
  return tf.gather(offsets, file_idx) + record


def _tfds_source(name: str, split: str, data_dir: str | None, *, download: bool,
                 wnids: list[str] | None = None, display_name: str | None = None) -> DataSource:
  import tensorflow_datasets as tfds  # local: importing tfds is slow and not needed otherwise

  display_name = display_name or name
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    try:
      known = tfds.core.registered.list_imported_builders()
    except Exception:  # pylint: disable=broad-except  (suggestions only)
      known = []
    raise _unknown_name_error(name, known) from None
  features = builder.info.features
  if "image" not in features or not isinstance(features["image"], tfds.features.Image):
    raise DataError(f"Data set {name!r} has no 'image' feature (features: {list(features)}); "
                    "tfmochi needs an image classification data set.")
  if download and not builder.is_prepared():
    if name == "imagenet2012" and not tf.io.gfile.exists(
        os.path.join(str(builder.data_dir_root), "downloads", "manual")):
      raise _imagenet_instructions(builder, display_name)
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except  (network, disk, checksum, ...)
      raise DataError(f"Downloading {name!r} into {builder.data_dir_root} failed: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
  tfds_split = _resolve_tfds_split(builder, name, split)
  read_config = tfds.ReadConfig(add_tfds_id=True)
  # The encoded bytes travel through shuffle/skip; decoding happens after (cheap resume).
  decoders = {"image": tfds.decode.SkipDecoding()}

  def as_dataset(sub_split):
    return builder.as_dataset(split=sub_split, shuffle_files=False, decoders=decoders,
                              read_config=read_config)

  # Fail fast (no network, no long work): opening an unprepared data set raises at once. Under
  # tfds.testing.mock_data `is_prepared()` is False but `as_dataset` works, hence both checks.
  try:
    probe = as_dataset(tfds_split)
  except Exception as e:  # pylint: disable=broad-except
    if builder.is_prepared():
      raise DataError(f"Cannot read split {tfds_split!r} of {name!r} (splits: "
                      f"{sorted(builder.info.splits.keys())}): {e}") from e
    raise _not_prepared(builder, name, display_name) from e

  label_feature = features["label"] if "label" in features else None
  # stl10-style "unlabelled" splits carry the label -1 for every example.
  has_labels = (isinstance(label_feature, tfds.features.ClassLabel)
                and not tfds_split.startswith("unlabel"))
  num_classes = label_feature.num_classes if has_labels else None
  table = None
  if wnids is not None:
    sorted_wnids = sorted(wnids)
    try:
      originals = [label_feature.str2int(w) for w in sorted_wnids]
    except (KeyError, ValueError) as e:
      raise DataError(f"{display_name}: a wnid of tfmochi/data/imagenet100_wnids.txt is not an "
                      f"{name} class: {e}") from e
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(originals, tf.int64),
                                            tf.range(len(originals), dtype=tf.int64)),
        default_value=-1)
    num_classes = len(wnids)
  offsets = tf.constant(_file_offsets(builder, tfds_split))

  def to_raw(ex):
    label = tf.cast(ex["label"], tf.int64) if has_labels else tf.constant(-1, tf.int64)
    if table is not None:
      label = table.lookup(label)
    return {"raw": ex["image"], "label": label, "id": _record_index(ex["tfds_id"], offsets)}

  def open_stream(num_shards: int, index: int) -> tf.data.Dataset:
    if num_shards == 1:
      ds = probe
    else:
      # Even sub-splits (not ReadConfig(input_context), which needs >= num_shards files):
      # balanced shards even for single-file data sets; ids stay global via tfds_id.
      ds = as_dataset(tfds.even_splits(tfds_split, n=num_shards)[index])
    ds = ds.map(to_raw, num_parallel_calls=AUTOTUNE)
    if table is not None:
      ds = ds.filter(lambda ex: ex["label"] >= 0)
    return ds

  image_feature = features["image"]

  def decode(raw):
    image = augment.to_rgb(image_feature.decode_example(raw))
    if image.dtype != tf.uint8:
      image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    image.set_shape([None, None, 3])
    return image

  num_examples = _tfds_num_examples(builder, tfds_split, probe, wnids, open_stream)
  if num_examples == 0:
    raise DataError(f"Split {tfds_split!r} of {display_name!r} is empty.")
  return DataSource(name=display_name, split=split, num_examples=num_examples,
                    num_classes=num_classes, has_labels=has_labels,
                    _reader=_Reader(decode=decode, open_stream=open_stream,
                                    encoded=_identity if _is_uint8(image_feature) else None))


def _identity(x):
  return x


def _is_uint8(image_feature) -> bool:
  """A tfds Image feature stored as encoded uint8 files (PNG/JPEG), decodable by decode_image."""
  return getattr(image_feature, "np_dtype", None) == np.uint8


def _tfds_num_examples(builder, tfds_split: str, probe: tf.data.Dataset,
                       wnids: list[str] | None, open_stream) -> int:
  try:
    known = int(builder.info.splits[tfds_split].num_examples)
  except (KeyError, ValueError, TypeError):
    known = 0  # unprepared metadata (e.g. tfds.testing.mock_data)
  if wnids is None:
    if known:
      return known
    cardinality = int(probe.cardinality())
    if cardinality >= 0:
      return cardinality
  elif (known and known == _IMAGENET_SIZES.get(tfds_split)
        and sorted(wnids) == sorted(imagenet100_wnids())):
    return _IMAGENET100_SIZES[tfds_split]
  logging.warning("tfmochi.data: counting the examples of %s[%s] (one pass over the labels).",
                  builder.name, tfds_split)
  return int(open_stream(1, 0).reduce(np.int64(0), lambda n, _: n + 1))


# ----------------------------------------------------------------------------------------------
# pipelines


def _fold(key: tf.Tensor, *data) -> tf.Tensor:
  """Stateless seed derived from `key` and integers `data` (order matters)."""
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


# Distinct sub-streams of the run seed (arbitrary constants).
_SHUFFLE_STREAM = 0x5f
_AUGMENT_STREAM = 0xa9


def _input_topology(global_batch_size: int, input_context: tf.distribute.InputContext | None
                    ) -> tuple[int, int, int, int]:
  """(num_pipelines, pipeline_id, per-replica batch, replicas fed per pipeline per step)."""
  if input_context is None:
    return 1, 0, global_batch_size, 1
  replicas = input_context.num_replicas_in_sync
  pipelines = input_context.num_input_pipelines
  if replicas % pipelines:
    raise ValueError(f"{replicas} replicas cannot be split evenly over {pipelines} pipelines.")
  batch = input_context.get_per_replica_batch_size(global_batch_size)  # raises if not divisible
  return pipelines, input_context.input_pipeline_id, batch, replicas // pipelines


def _epoch_stream(source: DataSource, num_shards: int, index: int, per_epoch: int,
                  start_epoch: int, first_skip: int, key: tf.Tensor,
                  shuffle_buffer: int | None) -> tf.data.Dataset:
  """Infinite (epoch, raw example) stream: per epoch a seeded shuffle, first `per_epoch` taken.

  The first epoch (start_epoch) starts `first_skip` examples in. Nothing is decoded here.
  """
  reader = source._reader  # pylint: disable=protected-access

  def skip_of(epoch):  # examples already consumed before the resume point
    return tf.where(epoch == start_epoch, tf.constant(first_skip, tf.int64),
                    tf.constant(0, tf.int64))

  if reader.records is not None:
    raw, labels, ids = _shard_records(reader.records, num_shards, index)
    n = len(ids)
    if n == 0:
      raise DataError(f"Input pipeline {index} of {num_shards} gets no examples of "
                      f"{source.name} ({source.num_examples} examples).")
    raw_t, labels_t, ids_t = tf.constant(raw), tf.constant(labels), tf.constant(ids)

    def epoch_indices(epoch):
      perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                      _fold(key, epoch))
      # A shard shorter than an epoch's share (uneven sharding) wraps around.
      positions = tf.range(skip_of(epoch), per_epoch, dtype=tf.int64) % n
      picked = tf.gather(perm, positions)
      return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(picked), epoch), picked))

    @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
    def fetch(epoch, i):
      return epoch, {"raw": tf.gather(raw_t, i), "label": tf.gather(labels_t, i),
                     "id": tf.gather(ids_t, i)}

    ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch_indices)
    return ds.map(fetch, num_parallel_calls=AUTOTUNE)

  base = source.raw(num_shards, index)
  buffer = shuffle_buffer or 10_000

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def epoch_examples(epoch):
    shuffle_seed = tf.random.stateless_uniform([], _fold(key, epoch), minval=None, maxval=None,
                                               dtype=tf.int64)
    # TFRecords: the file order too is drawn per epoch, then records are shuffled in a buffer.
    ds = (reader.open_shuffled(num_shards, index, shuffle_seed)
          if reader.open_shuffled is not None else base)
    ds = ds.shuffle(buffer, seed=shuffle_seed).repeat().take(per_epoch).skip(skip_of(epoch))
    return ds.map(lambda ex: (epoch, ex))

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_optimization.map_parallelization = True
  return options


def pretrain_dataset(source: DataSource, *, global_batch_size: int, image_size: int, seed: int,
                     recipe: str = "mocov2", crop_scale: tuple[float, float] = (0.2, 1.0),
                     hflip: bool = True,
                     input_context: tf.distribute.InputContext | None = None,
                     start_step: int = 0, shuffle_buffer: int | None = None,
                     deterministic: bool = True, fused_decode: bool = True,
                     num_parallel_calls: int = AUTOTUNE) -> tf.data.Dataset:
  """Infinite stream of per-replica MoCo batches, fully determined by (seed, step).

  See the module docstring for the data-position contract. Works as the input_fn of
  `strategy.distribute_datasets_from_function(lambda ctx: pretrain_dataset(..., input_context=
  ctx))`: every input pipeline reads its own shard of the source.

  Args:
    source: from `load`.
    global_batch_size: B, summed over replicas.
    image_size: view side S.
    seed: run seed (data order and augmentations).
    recipe: "mocov2", "mocov1" or "small" (augment.AUGMENTATIONS).
    crop_scale: area range of the random resized crop.
    hflip: random horizontal flips in the views (off for digits and text).
    input_context: from distribute_datasets_from_function, or None for a single pipeline.
    start_step: first global step to produce (resume).
    shuffle_buffer: tfds sources only (in-memory sources use a full permutation): shuffle
      buffer of encoded examples; default 10,000.
    deterministic: keep the element order under parallel maps (needed for exact resume).
    fused_decode: sources of encoded images (folder, tfrecord, tfds): each view decodes only its
      crop window of a JPEG; False decodes the whole image once for both views (the same
      windows; for benchmarks).
    num_parallel_calls: of the decode + augment map.

  Returns:
    tf.data.Dataset of {"view1": uint8 [b, S, S, 3], "view2": same, "label": int64 [b],
    "id": int64 [b]} with b = the per-replica batch (B without a context). The views are the
    augmented images before normalisation, rounded to uint8 (`augment.two_views_uint8`): a
    quarter of float32's bytes to the device; the step normalises them there
    (`augment.to_model_input`, called at the top of `MoCo.train_step`).
  """
  if recipe not in augment.AUGMENTATIONS:
    raise ValueError(f"Unknown augmentation recipe {recipe!r}; choose one of "
                     f"{sorted(augment.AUGMENTATIONS)}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  num_shards, index, batch, replicas_per_pipeline = _input_topology(global_batch_size,
                                                                    input_context)
  spe = steps_per_epoch(source.num_examples, global_batch_size)
  if spe < 1:
    raise DataError(f"The global batch ({global_batch_size}) is larger than the "
                    f"{source.num_examples} examples of {source.name}/{source.split}.")
  batches_per_epoch = spe * replicas_per_pipeline  # this pipeline's batches in one epoch
  start_epoch, steps_in = divmod(start_step, spe)
  run_key = tf.constant([seed, 0], tf.int64)
  shuffle_key = _fold(run_key, _SHUFFLE_STREAM, index)
  augment_key = _fold(run_key, _AUGMENT_STREAM)
  ds = _epoch_stream(source, num_shards, index, per_epoch=batches_per_epoch * batch,
                     start_epoch=start_epoch, first_skip=steps_in * replicas_per_pipeline * batch,
                     key=shuffle_key, shuffle_buffer=shuffle_buffer)

  encoded = source._reader.encoded if fused_decode else None  # pylint: disable=protected-access

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def make_views(epoch, ex):
    # Encoded files: each view decodes only its crop window (decode_and_crop_jpeg).
    image = encoded(ex["raw"]) if encoded is not None else source.decode(ex)["image"]
    view1, view2 = augment.two_views_uint8(image, image_size, _fold(augment_key, epoch, ex["id"]),
                                           recipe, crop_scale, hflip,
                                           encoded=encoded is not None)
    return {"view1": view1, "view2": view2, "label": ex["label"], "id": ex["id"]}

  view = (image_size, image_size, tf.uint8)
  ds = _map_skipping_bad(source, ds, make_views, _placeholder(view1=view, view2=view),
                         num_parallel_calls=num_parallel_calls, deterministic=deterministic)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.prefetch(AUTOTUNE)
  return ds.with_options(_options(deterministic))


def eval_dataset(source: DataSource, *, batch_size: int, image_size: int,
                 train_augment: bool = False, seed: int = 0, shuffle: bool = False,
                 crop_min_scale: float = 0.08, hflip: bool = True,
                 input_context: tf.distribute.InputContext | None = None,
                 num_parallel_calls: int = AUTOTUNE) -> tf.data.Dataset:
  """One pass over a split for kNN / linear evaluation (MoCo lincls transforms).

  Args:
    source: from `load`.
    batch_size: examples per batch; the last batch may be smaller.
    image_size: side S.
    train_augment: linear_train_view (RandomResizedCrop 0.08-1 + flip) instead of center_view;
      its draws depend on (seed, id): pass a different seed per epoch for fresh crops.
    seed: augmentation and shuffle seed.
    shuffle: shuffle the examples (seeded; full permutation for in-memory sources).
    crop_min_scale, hflip: of the train_augment view (MoCo: 0.08, flips).
    input_context: read only this pipeline's shard.
    num_parallel_calls: of the decode + transform map.

  Returns:
    tf.data.Dataset of {"image": float32 [n, S, S, 3], "label": int64 [n], "id": int64 [n]}.
  """
  if input_context is None:
    ds = source.raw()
  else:
    ds = source.raw(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if shuffle:
    reader = source._reader  # pylint: disable=protected-access
    buffer = len(reader.records[2]) if reader.records is not None else 10_000
    ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=False)
  key = tf.constant([seed, 1], tf.int64)

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def transform(ex):
    example = source.decode(ex)
    if train_augment:
      image = augment.linear_train_view(example["image"], image_size,
                                        _fold(key, example["id"]),
                                        crop_min_scale=crop_min_scale, hflip=hflip)
    else:
      image = augment.center_view(example["image"], image_size)
    return {"image": image, "label": example["label"], "id": example["id"]}

  ds = _map_skipping_bad(source, ds, transform,
                         _placeholder(image=(image_size, image_size, tf.float32)),
                         num_parallel_calls=num_parallel_calls, deterministic=True)
  return ds.batch(batch_size).prefetch(AUTOTUNE)

