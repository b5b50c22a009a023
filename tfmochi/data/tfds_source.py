"""tensorflow-datasets sources: any tfds image classification data set, and ImageNet-100.

Data sets are read from `data_dir` (gs:// works) and never downloaded implicitly: one that is
not prepared stops at once with a DataError saying how to prepare it (training machines may
have no internet). Ids are the record index within the tfds split (stable across shardings).
imagenet100 is imagenet2012 filtered to the 100 CMC classes (imagenet100_wnids.txt), relabelled
0..99 in sorted-wnid order (= torchvision ImageFolder on the subset); its ids stay imagenet2012's.
"""

from __future__ import annotations

import importlib.resources
import os
import re

from absl import logging
import numpy as np
import tensorflow as tf

from tfmochi import augment
from tfmochi.data.source import (AUTOTUNE, TEST_SPLITS, DataError, DataSource, Reader,
                                 already_encoded, unknown_name_error)

# Split sizes of ImageNet-1k (tfds imagenet2012) and of its CMC 100-class subset. The subset's
# size is used only when the underlying imagenet2012 split has exactly the ImageNet-1k size and
# the shipped class list is used; otherwise the filtered split is counted once (slow on real data).
_IMAGENET_SIZES = {"train": 1_281_167, "validation": 50_000}
_IMAGENET100_SIZES = {"train": 126_689, "validation": 5_000}


def imagenet100_wnids() -> list[str]:
  """The 100 ImageNet class wnids of ImageNet-100 (CMC subset), in the shipped file's order."""
  text = importlib.resources.files("tfmochi.data").joinpath("imagenet100_wnids.txt").read_text()
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
  if split not in TEST_SPLITS:
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


def _builder(tfds, name: str, data_dir: str | None, *, download: bool, display_name: str):
  """The tfds builder of `name` with an image feature, prepared first if `download` allows."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    try:
      known = tfds.core.registered.list_imported_builders()
    except Exception:  # pylint: disable=broad-except  (suggestions only)
      known = []
    raise unknown_name_error(name, known) from None
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
  return builder


def _labels(tfds, builder, tfds_split: str, wnids: list[str] | None, display_name: str
            ) -> tuple[bool, int | None, tf.lookup.StaticHashTable | None]:
  """(has labels, classes, table): with `wnids`, the table maps an original label to the index
  of its wnid in sorted(wnids) and the other classes to -1."""
  features = builder.info.features
  label_feature = features["label"] if "label" in features else None
  # stl10-style "unlabelled" splits carry the label -1 for every example.
  has_labels = (isinstance(label_feature, tfds.features.ClassLabel)
                and not tfds_split.startswith("unlabel"))
  if wnids is None:
    return has_labels, label_feature.num_classes if has_labels else None, None
  try:
    originals = [label_feature.str2int(w) for w in sorted(wnids)]
  except (KeyError, ValueError) as e:
    raise DataError(f"{display_name}: a wnid of tfmochi/data/imagenet100_wnids.txt is not an "
                    f"{builder.name} class: {e}") from e
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(originals, tf.int64),
                                          tf.range(len(originals), dtype=tf.int64)),
      default_value=-1)
  return has_labels, len(wnids), table


def _decoder(image_feature):
  """Raw (undecoded) tfds image -> uint8 [H, W, 3]."""

  def decode(raw):
    image = augment.to_rgb(image_feature.decode_example(raw))
    if image.dtype != tf.uint8:
      image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    image.set_shape([None, None, 3])
    return image

  return decode


def _is_uint8(image_feature) -> bool:
  """A tfds Image feature stored as encoded uint8 files (PNG/JPEG), decodable by decode_image."""
  return getattr(image_feature, "np_dtype", None) == np.uint8


def load_tfds(name: str, split: str, data_dir: str | None, *, download: bool,
              wnids: list[str] | None = None, display_name: str | None = None) -> DataSource:
  """A split of tfds data set `name`; with `wnids`, only those classes, relabelled 0..len-1."""
  import tensorflow_datasets as tfds  # local: importing tfds is slow and not needed otherwise

  display_name = display_name or name
  builder = _builder(tfds, name, data_dir, download=download, display_name=display_name)
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

  has_labels, num_classes, table = _labels(tfds, builder, tfds_split, wnids, display_name)
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

  num_examples = _tfds_num_examples(builder, tfds_split, probe, wnids, open_stream)
  if num_examples == 0:
    raise DataError(f"Split {tfds_split!r} of {display_name!r} is empty.")
  image_feature = builder.info.features["image"]
  return DataSource(name=display_name, split=split, num_examples=num_examples,
                    num_classes=num_classes, has_labels=has_labels,
                    _reader=Reader(decode=_decoder(image_feature), open_stream=open_stream,
                                   encoded=already_encoded if _is_uint8(image_feature) else None))


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
