"""DataSource: one split of a data set, read whole or per input pipeline (and what it shares).

A source module (quickstart, folder, tfrecord, tfds_source) describes how its split is read with
a `Reader` and wraps it in a `DataSource`; everything else reads the split through DataSource's
methods. Images that cannot be decoded are dropped and counted while reading (`SkipLog`,
`map_skipping_bad`).
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
from collections.abc import Callable, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tfmochi import augment

AUTOTUNE = tf.data.AUTOTUNE
BUILTIN_DATASETS = ("quickstart", "mnist5k", "imagenet2012", "imagenet100", "folder", "tfrecord")
TEST_SPLITS = ("test", "validation", "val")  # names of the held-out split
MAX_LISTED_SKIPS = 20  # bad images named one by one in the log; later ones are only counted

Records = tuple[np.ndarray, np.ndarray, np.ndarray]  # raw [N], label int64 [N], id int64 [N]
OpenStream = Callable[[int, int], tf.data.Dataset]  # (num_shards, index) -> raw examples


class DataError(ValueError):
  """A data set cannot be used as asked; the message says what is wrong and how to fix it."""


def unknown_name_error(name: str, known: Sequence[str] = ()) -> DataError:
  close = difflib.get_close_matches(name, list(BUILTIN_DATASETS) + list(known), n=3)
  hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  return DataError(
      f"Unknown data set {name!r}.{hint} Choose one of: {', '.join(BUILTIN_DATASETS)}, or any "
      "tensorflow-datasets name (e.g. cifar10, stl10; "
      "https://www.tensorflow.org/datasets/catalog).")


class SkipLog:
  """Counts the images an input pipeline could not decode and dropped (thread-safe).

  Undecodable files are found while training, not at start-up (listing 1.28M files is fast,
  decoding them is hours): each is dropped from the stream, logged as a warning (the first
  `MAX_LISTED_SKIPS` by name, then every 100th) and counted here. `count` is what this process's
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
      if len(self.examples) < MAX_LISTED_SKIPS:
        self.examples.append(what)
    if n <= MAX_LISTED_SKIPS or n % 100 == 0:
      logging.warning("tfmochi.data: skipped an image that cannot be decoded: %s (%d skipped so "
                      "far; run once with --validate_images to list them all)", what, n)
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class Reader:
  """How a source produces raw examples and decodes them (built by the source modules).

  Exactly one of `records` (random access: numpy arrays raw/label/id) or `open_stream`
  ((num_shards, index) -> tf.data.Dataset of raw dicts in a deterministic order) is set.
  `decode` maps a raw image (uint8 array or encoded bytes or a file path) to uint8 [H, W, 3].
  `encoded`, if set, maps a raw image to its encoded file bytes (the pretraining views then
  decode only their crop windows). `open_shuffled` ((num_shards, index, seed) -> raw dicts) is a
  stream whose file order is shuffled by `seed` (TFRecords), used per epoch instead of
  `open_stream`. With `skips` set, images that fail to decode are dropped and counted there.
  """
  decode: Callable[[tf.Tensor], tf.Tensor]
  records: Records | None = None
  open_stream: OpenStream | None = None
  encoded: Callable[[tf.Tensor], tf.Tensor] | None = None
  open_shuffled: Callable[[int, int, tf.Tensor], tf.data.Dataset] | None = None
  skips: SkipLog | None = None


def already_encoded(raw: tf.Tensor) -> tf.Tensor:
  """`Reader.encoded` of sources whose raw images are the encoded file bytes themselves."""
  return raw


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
  _reader: Reader | None = dataclasses.field(default=None, repr=False)

  def raw(self, num_shards: int = 1, index: int = 0) -> tf.data.Dataset:
    """Undecoded examples {"raw", "label", "id"} of shard `index` of `num_shards`."""
    _check_shard(num_shards, index)
    if self._reader.records is not None:
      raw, labels, ids = shard_records(self._reader.records, num_shards, index)
      return tf.data.Dataset.from_tensor_slices({"raw": raw, "label": labels, "id": ids})
    return self._reader.open_stream(num_shards, index)

  def raw_per_epoch(self, num_shards: int, index: int
                    ) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """seed (int64 scalar tensor) -> the raw examples of shard `index` for one epoch.

    Many-file sources (TFRecords) read their files in an order drawn from the seed; the others
    ignore it and return `raw(num_shards, index)`, opened once here.
    """
    if self._reader.open_shuffled is not None:
      return lambda seed: self._reader.open_shuffled(num_shards, index, seed)
    base = self.raw(num_shards, index)
    return lambda seed: base

  def records(self) -> Records | None:
    """The split in memory: (raw [N], label int64 [N], id int64 [N]) numpy arrays.

    For sources with random access (quickstart, folder, `from_numpy`; raw holds the images or
    the file paths); None for streamed sources (tfds, tfrecord), read only through `raw()`.
    """
    return self._reader.records

  def subset(self, indices: np.ndarray) -> DataSource:
    """The examples at `indices` (int [M], positions in `records()`) of an in-memory source."""
    records = self.records()
    if records is None:
      raise ValueError(f"{self.name}/{self.split} is streamed; only in-memory sources (see "
                       "DataSource.records) have a subset by position.")
    return dataclasses.replace(
        self, num_examples=int(len(indices)),
        _reader=dataclasses.replace(self._reader, records=tuple(a[indices] for a in records)))

  def with_stream(self, open_stream: OpenStream, num_examples: int | None = None) -> DataSource:
    """This source read from another stream of its raw examples (e.g. a filtered `raw()`).

    Args:
      open_stream: (num_shards, index) -> tf.data.Dataset of {"raw", "label", "id"} as `raw()`
        yields them (decoded by this source's `decode`), in a deterministic order.
      num_examples: of the new stream (default: unchanged).
    """
    reader = dataclasses.replace(self._reader, records=None, open_stream=open_stream,
                                 open_shuffled=None)
    return dataclasses.replace(
        self, _reader=reader,
        num_examples=self.num_examples if num_examples is None else int(num_examples))

  @property
  def encoded(self) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """Maps a raw image to its encoded file bytes; None when raw images are not encoded files."""
    return self._reader.encoded

  def decode(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """{"raw", "label", "id"} -> {"image": uint8 [H, W, 3], "label", "id"}."""
    return {"image": self._reader.decode(example["raw"]), "label": example["label"],
            "id": example["id"]}

  def shard(self, num_shards: int = 1, index: int = 0) -> tf.data.Dataset:
    """Decoded examples of one shard, in a fixed order (each shard is read by one pipeline)."""
    return map_skipping_bad(self, self.raw(num_shards, index), self.decode,
                            placeholder(image=(0, 0, tf.uint8)), num_parallel_calls=AUTOTUNE,
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


def shard_records(records: Records, num_shards: int, index: int) -> Records:
  """Shard `index` of `num_shards` of in-memory records."""
  # Strided like tf.data.Dataset.shard: shard sizes differ by at most one.
  return tuple(a[index::num_shards] for a in records)


def map_skipping_bad(source: DataSource, ds: tf.data.Dataset, fn: Callable, placeholder: dict,
                     *, num_parallel_calls: int, deterministic: bool | None
                     ) -> tf.data.Dataset:
  """`ds.map(fn)`, except that an element where `fn` fails (an undecodable image) is dropped
  and counted in the source's SkipLog. Plain `ds.map(fn)` for sources without one.

  Each element is mapped inside a one-element dataset with `ignore_errors`, followed by a
  placeholder marked not-ok, and the first of the two is kept: a validity flag without raising.
  (A nested `Dataset.reduce` per element would do the same at a far higher cost per element than
  this interleave, which is small next to decoding and augmenting a pair of views.)
  With block_length 1 each element yields exactly one output, so the order is the input order
  whenever the pipeline is deterministic. `placeholder` has fn's output structure and dtypes
  (shapes compatible with fn's); it never leaves this function.
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


def placeholder(**images: tuple[int, int, tf.DType]) -> dict[str, tf.Tensor]:
  """Zero images {name: [h, w, 3]} plus "label" and "id": a stand-in example."""
  out = {k: tf.zeros([h, w, 3], dtype) for k, (h, w, dtype) in images.items()}
  return dict(out, label=tf.constant(-1, tf.int64), id=tf.constant(-1, tf.int64))


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
                    _reader=Reader(decode=decode, records=(images, labels, ids)))
