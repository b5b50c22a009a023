"""TFRecord files in the ImageNet layout, as TPU reference models read them.

Records are tf.train.Examples with `image/encoded` (JPEG bytes) and `image/class/label`, as the
TensorFlow ImageNet conversion scripts write them. `data_dir` is a folder holding `train-*` and
`validation-*` files, or a glob of the train files (`gs://bucket/train-*`), whose held-out split
is the same glob with the last "train" of its file-name part replaced by "validation". Labels
are `image/class/label - label_offset` (ImageNet: 1..1000 -> 0..999). Each input pipeline reads
every P-th file (P = input pipelines = hosts), 16 files interleaved; undecodable records are
skipped and counted (`SkipLog`).
"""

from __future__ import annotations

import concurrent.futures
import os
import re

from absl import logging
import tensorflow as tf

from tfmochi import augment
from tfmochi.data.source import AUTOTUNE, DataError, DataSource, Reader, SkipLog, already_encoded

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


def _split_size(files: list[str], first: list[bytes], pattern: str, test: bool,
                label_offset: int) -> tuple[int, int | None]:
  """(examples, classes) of the split: known for the standard ImageNet shards, else counted.

  Fails when a label (of the counted records, or else of the `first` records) is below
  `label_offset`.
  """
  first_labels = [_label(_parse_example(r, files[0]), label_offset - 1) for r in first]
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
  return num_examples, num_classes


def _reader(files: list[str], label_offset: int) -> Reader:
  """Streams of {"raw": JPEG bytes, "label", "id"}; ids are file index << 32 | record index."""
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

  return Reader(decode=augment.decode_image, encoded=already_encoded,
                open_stream=lambda n, i: open_files(n, i, None), open_shuffled=open_files,
                skips=SkipLog(describe))


def load_tfrecord(data_dir: str | None, test: bool, *, label_offset: int) -> DataSource:
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
  num_examples, num_classes = _split_size(files, records, pattern, test, label_offset)
  return DataSource(name="tfrecord", split="test" if test else "train",
                    num_examples=num_examples, num_classes=num_classes, has_labels=True,
                    _reader=_reader(files, label_offset))
