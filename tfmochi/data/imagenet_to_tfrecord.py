"""ImageNet-1K (ILSVRC2012) as TFRecord shards, in the layout `--dataset=tfrecord` reads.

  python -m tfmochi.data.imagenet_to_tfrecord --train_dir=/data/imagenet/train \\
    --validation_dir=/data/imagenet/val --devkit_dir=/data/imagenet/ILSVRC2012_devkit_t12 \\
    --output_dir=gs://BUCKET/imagenet/tfrecord

Input, the extracted archives (docs/TPU.md, section 5):
  train_dir/<wnid>/*.JPEG      one folder per class, named by its WordNet id (n01440764, ...)
  validation_dir/*.JPEG        labelled by the devkit (`--devkit_dir`: its
                               data/ILSVRC2012_validation_ground_truth.txt and data/meta.mat), or
                               by `--validation_labels` (one wnid per line in file-name order, or
                               `<file name> <wnid>` lines)
  validation_dir/<wnid>/*.JPEG or validation images in class folders (labelled by the folder)

Output (through tf.io.gfile: a local folder, gs://, ram://): `train-00000-of-01024` ... and
`validation-00000-of-00128` ..., one tf.train.Example per image:
  image/encoded        the file's JPEG bytes as they are; CMYK JPEGs and non-JPEG files (ImageNet
                       has a PNG named .JPEG) are re-encoded as RGB JPEG
  image/format         b"JPEG"
  image/class/label    int64 1..C: 1 + the wnid's index among the sorted train wnids (0 unused)
  image/class/synset   the wnid
  image/filename       the file's name
  image/height, image/width   int64 pixels
Training examples are shuffled with `--seed` before sharding, so that every shard holds images of
every class (a reader that interleaves a few shards still builds mixed batches); validation
examples stay in file-name order. Shard i of S holds examples [i*n//S, (i+1)*n//S).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import random
import re
import sys
import time

import tensorflow as tf

from tfmochi.data.tfrecord import TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY

PROGRAM = "tfmochi.data.imagenet_to_tfrecord"
TRAIN_SHARDS, VALIDATION_SHARDS = 1024, 128  # the standard ImageNet TFRecord layout
_WNID = re.compile(r"n\d{8}$")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_JPEG_QUALITY = 95  # re-encoded files only
# JPEG start-of-frame markers (SOF0..SOF15 without DHT C4, JPG C8, DAC CC): they hold the size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ConversionError(ValueError):
  """Bad input (a missing folder, an empty class, an unknown wnid): the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Image:
  """One input image: where it is and its class."""
  path: str
  wnid: str

  @property
  def name(self) -> str:
    return os.path.basename(self.path)


def _listdir(folder: str, what: str) -> list[str]:
  """Entry names of a folder (gs:// folder names lose their trailing '/')."""
  if not tf.io.gfile.isdir(folder):
    raise ConversionError(f"{what} {folder} is not a folder (or cannot be read).")
  return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(folder))


def _images_in(folder: str, what: str = "the folder") -> list[str]:
  return [os.path.join(folder, n) for n in _listdir(folder, what)
          if n.lower().endswith(_IMAGE_SUFFIXES)]


def _class_folders(folder: str, what: str) -> list[str]:
  return [n for n in _listdir(folder, what)
          if _WNID.match(n) and tf.io.gfile.isdir(os.path.join(folder, n))]


def list_train(train_dir: str) -> tuple[list[str], list[Image]]:
  """(sorted wnids, images sorted by wnid and name) of `train_dir/<wnid>/*.JPEG`.

  Raises:
    ConversionError: no such folder, no class folders, or a class folder without images.
  """
  wnids = _class_folders(train_dir, "--train_dir")
  if not wnids:
    entries = _listdir(train_dir, "--train_dir")[:5]
    raise ConversionError(
        f"--train_dir {train_dir} holds no class folders named by WordNet ids (n01440764, ...); "
        f"it holds {', '.join(entries) or 'nothing'}. Pass the folder whose subfolders are the "
        "1,000 classes (extract each n*.tar of ILSVRC2012_img_train.tar into its own folder).")
  images = []
  for wnid in wnids:
    files = _images_in(os.path.join(train_dir, wnid))
    if not files:
      raise ConversionError(f"the class folder {os.path.join(train_dir, wnid)} holds no images "
                            f"({', '.join(_IMAGE_SUFFIXES)}); was its n*.tar extracted?")
    images += [Image(f, wnid) for f in files]
  return wnids, images


def _read_text(path: str, what: str) -> str:
  if not tf.io.gfile.exists(path):
    raise ConversionError(f"{what} {path} does not exist.")
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def _labels_from_file(path: str, names: list[str]) -> list[str]:
  """The wnid of each validation file (sorted `names`) from a labels file.

  Lines are either one wnid each, in the order of the sorted file names (the format of the
  `synset_labels.txt` of TensorFlow's ImageNet scripts), or `<file name> <wnid>` (space or comma).
  """
  lines = [line.replace(",", " ").split() for line in _read_text(
      path, "--validation_labels").splitlines() if line.strip()]
  if all(len(fields) == 1 for fields in lines):
    if len(lines) != len(names):
      raise ConversionError(f"--validation_labels {path} has {len(lines)} labels for "
                            f"{len(names)} validation images: one wnid per image, in file-name "
                            "order.")
    return [fields[0] for fields in lines]
  by_name = {fields[0]: fields[-1] for fields in lines}
  missing = [n for n in names if n not in by_name]
  if missing:
    raise ConversionError(f"--validation_labels {path} has no label for {len(missing)} "
                          f"validation images, e.g. {missing[0]}.")
  return [by_name[n] for n in names]


def _labels_from_devkit(devkit_dir: str, names: list[str]) -> list[str]:
  """The wnid of each validation file (sorted `names`) from the ILSVRC2012 devkit.

  data/ILSVRC2012_validation_ground_truth.txt holds the devkit's class id (1..1000, its own
  order, not the sorted wnids) of each image in file-name order; data/meta.mat maps the ids to
  wnids (`synsets`: ILSVRC2012_ID, WNID).
  """
  import scipy.io  # pylint: disable=g-import-not-at-top  (scikit-learn's dependency)

  data = os.path.join(devkit_dir, "data")
  if not tf.io.gfile.isdir(data):
    data = devkit_dir
  meta_path = os.path.join(data, "meta.mat")
  if not tf.io.gfile.exists(meta_path):
    raise ConversionError(f"--devkit_dir {devkit_dir} has no data/meta.mat: pass the extracted "
                          "ILSVRC2012_devkit_t12 folder.")
  with tf.io.gfile.GFile(meta_path, "rb") as f:
    synsets = scipy.io.loadmat(io.BytesIO(f.read()), squeeze_me=True)["synsets"]
  wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
  ids = [int(v) for v in _read_text(os.path.join(data, "ILSVRC2012_validation_ground_truth.txt"),
                                    "the devkit's ground truth").split()]
  if len(ids) != len(names):
    raise ConversionError(f"the devkit's ground truth has {len(ids)} labels for {len(names)} "
                          "validation images (ILSVRC2012_img_val.tar holds 50,000).")
  unknown = sorted(set(ids) - set(wnid_of))
  if unknown:
    raise ConversionError(f"the devkit's ground truth names class ids {unknown[:5]} that its "
                          f"meta.mat does not have.")
  return [wnid_of[i] for i in ids]


def list_validation(validation_dir: str, wnids: list[str], labels: str | None = None,
                    devkit_dir: str | None = None) -> list[Image]:
  """The validation images, sorted by file name, with their wnids.

  Labelled by the class folders of `validation_dir` if it has any, else by `labels` (a file) or
  `devkit_dir`.

  Raises:
    ConversionError: no such folder, no images, no labels, or a wnid that is not a train class.
  """
  folders = _class_folders(validation_dir, "--validation_dir")
  if folders:
    images = [Image(f, w) for w in folders for f in _images_in(os.path.join(validation_dir, w))]
    source = f"the class folders of --validation_dir {validation_dir}"
  else:
    files = _images_in(validation_dir)
    if not files:
      raise ConversionError(f"--validation_dir {validation_dir} holds no images and no class "
                            "folders.")
    names = [os.path.basename(f) for f in files]
    if labels:
      found, source = _labels_from_file(labels, names), f"--validation_labels {labels}"
    elif devkit_dir:
      found, source = _labels_from_devkit(devkit_dir, names), f"--devkit_dir {devkit_dir}"
    else:
      raise ConversionError(
          f"--validation_dir {validation_dir} holds images without class folders: pass "
          "--devkit_dir=<extracted ILSVRC2012_devkit_t12> or --validation_labels=<file>.")
    images = [Image(f, w) for f, w in zip(files, found)]
  known = set(wnids)
  unknown = sorted({image.wnid for image in images} - known)
  if unknown:
    raise ConversionError(f"{source} names wnids that are not class folders of --train_dir: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}.")
  return sorted(images, key=lambda image: image.name)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
  """(height, width, colour components) from a JPEG's start-of-frame marker; None if not a JPEG.

  Reads marker segments from the start of the file up to the first SOF (no decoding).
  """
  if data[:2] != b"\xff\xd8":
    return None
  i = 2
  while i + 4 <= len(data):
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    length = int.from_bytes(data[i + 2:i + 4], "big")
    if marker in _SOF_MARKERS and i + 10 <= len(data):
      height = int.from_bytes(data[i + 5:i + 7], "big")
      width = int.from_bytes(data[i + 7:i + 9], "big")
      return height, width, data[i + 9]
    i += 2 + length
  return None


def rgb_jpeg(data: bytes, path: str) -> tuple[bytes, int, int, bool]:
  """(JPEG bytes, height, width, re-encoded) of an image file's bytes.

  A grayscale or YCbCr JPEG is kept as it is; a CMYK JPEG (4 components) or another format is
  decoded and re-encoded as an RGB JPEG, which every JPEG reader handles.

  Raises:
    ConversionError: the file cannot be decoded.
  """
  header = jpeg_header(data)
  if header is not None and header[2] in (1, 3) and min(header[:2]) > 0:
    return data, header[0], header[1], False
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    raise ConversionError(f"{path} is not an image TensorFlow can decode "
                          f"({str(e.message).splitlines()[0][:120]}).") from e
  encoded = tf.io.encode_jpeg(image, format="rgb", quality=_JPEG_QUALITY).numpy()
  return encoded, int(image.shape[0]), int(image.shape[1]), True


def _feature(value) -> tf.train.Feature:
  if isinstance(value, int):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def example(image: Image, label: int) -> tuple[bytes, bool]:
  """(serialized tf.train.Example of the image, re-encoded) with the features of the layout."""
  with tf.io.gfile.GFile(image.path, "rb") as f:
    data = f.read()
  encoded, height, width, reencoded = rgb_jpeg(data, image.path)
  features = {TFRECORD_IMAGE_KEY: encoded, "image/format": b"JPEG", TFRECORD_LABEL_KEY: label,
              "image/class/synset": image.wnid.encode(), "image/filename": image.name.encode(),
              "image/height": height, "image/width": width}
  proto = tf.train.Example(features=tf.train.Features(
      feature={k: _feature(v) for k, v in features.items()}))
  return proto.SerializeToString(), reencoded


def shard_names(split: str, count: int, shards: int) -> list[str]:
  """File names of a split's shards: min(shards, count) of them (no empty shard)."""
  n = max(1, min(shards, count))
  return [f"{split}-{i:05d}-of-{n:05d}" for i in range(n)]


def _write_shard(path: str, images: list[Image], labels: dict[str, int]) -> list[str]:
  """Writes one shard; returns the names of the files it re-encoded."""
  reencoded = []
  with tf.io.TFRecordWriter(path) as writer:
    for image in images:
      record, changed = example(image, labels[image.wnid])
      writer.write(record)
      if changed:
        reencoded.append(image.name)
  return reencoded


def write_split(split: str, images: list[Image], labels: dict[str, int], output_dir: str,
                shards: int, workers: int) -> list[str]:
  """Writes a split's shards in parallel, printing progress; returns the re-encoded files."""
  names = shard_names(split, len(images), shards)
  n, start = len(images), time.time()
  reencoded = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(_write_shard, os.path.join(output_dir, name),
                           images[i * n // len(names):(i + 1) * n // len(names)], labels)
               for i, name in enumerate(names)]
    try:
      for i, future in enumerate(futures):
        reencoded += future.result()
        done = (i + 1) * n // len(names)
        if (i + 1) % max(1, len(names) // 16) == 0 or i + 1 == len(names):
          print(f"{split}: {i + 1}/{len(names)} shards, {done:,} images, "
                f"{done / max(time.time() - start, 1e-9):,.0f} images/s", flush=True)
    except BaseException:
      for future in futures:  # a bad file stops the conversion without writing the rest
        future.cancel()
      raise
  return reencoded


def _check_output_dir(output_dir: str, planned: set[str]) -> None:
  """Refuses an output folder holding shards of another conversion (a reader would mix them)."""
  tf.io.gfile.makedirs(output_dir)
  stale = [name.rstrip("/") for name in tf.io.gfile.listdir(output_dir)
           if re.match(r"(train|validation)-\d{5}-of-\d{5}$", name.rstrip("/"))
           and name.rstrip("/") not in planned]
  if stale:
    raise ConversionError(
        f"--output_dir {output_dir} already holds {len(stale)} shards of another conversion "
        f"(e.g. {sorted(stale)[0]}); tfmochi would read them with the new ones. Delete them or "
        "choose another --output_dir.")


def convert(output_dir: str, train_dir: str | None = None, validation_dir: str | None = None, *,
            validation_labels: str | None = None, devkit_dir: str | None = None,
            train_shards: int = TRAIN_SHARDS, validation_shards: int = VALIDATION_SHARDS,
            seed: int = 0, workers: int = 8) -> dict:
  """Converts the given splits; returns {"classes", "train", "validation", "reencoded"}.

  The classes (labels 1..C in sorted-wnid order) are the class folders of `train_dir`, so it is
  needed for the validation split too (only listed, not converted, when `train_dir` is given
  with `train_shards=0`).

  Raises:
    ConversionError: bad input; nothing is written before all input is listed and labelled.
  """
  if not train_dir:
    raise ConversionError("--train_dir is required: its class folders define the labels.")
  wnids, train = list_train(train_dir)
  labels = {wnid: i + 1 for i, wnid in enumerate(wnids)}
  validation = list_validation(validation_dir, wnids, validation_labels,
                               devkit_dir) if validation_dir else []
  random.Random(seed).shuffle(train)
  splits = [(s, images, n) for s, images, n in (("train", train, train_shards),
                                                ("validation", validation, validation_shards))
            if images and n > 0]
  _check_output_dir(output_dir, {name for s, images, n in splits
                                 for name in shard_names(s, len(images), n)})
  reencoded = []
  for split, images, shards in splits:
    reencoded += write_split(split, images, labels, output_dir, shards, workers)
  counts = {s: len(images) for s, images, _ in splits}
  return {"classes": wnids, "train": counts.get("train", 0),
          "validation": counts.get("validation", 0), "reencoded": sorted(reencoded)}


# -------------------------------------------------------------------------------------------------
# Command line


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("train_dir", None, "The extracted train archive: <wnid>/*.JPEG folders.")
  flags.DEFINE_string("validation_dir", None, "The extracted validation images (*.JPEG, or "
                      "<wnid>/*.JPEG class folders). Empty: convert the train split only.")
  flags.DEFINE_string("devkit_dir", None, "The extracted ILSVRC2012_devkit_t12 folder: labels "
                      "of a flat --validation_dir.")
  flags.DEFINE_string("validation_labels", None, "Instead of --devkit_dir: a file with one wnid "
                      "per validation image in file-name order, or '<file name> <wnid>' lines.")
  flags.DEFINE_string("output_dir", None, "Where the shards go (a folder, gs://bucket/path).")
  flags.DEFINE_integer("train_shards", TRAIN_SHARDS, "Train shards (0: skip the train split).")
  flags.DEFINE_integer("validation_shards", VALIDATION_SHARDS, "Validation shards.")
  flags.DEFINE_integer("seed", 0, "Seed of the training order.")
  flags.DEFINE_integer("workers", min(32, 2 * (os.cpu_count() or 1)), "Shards written at once.")


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tfmochi import cli  # pylint: disable=g-import-not-at-top

  status = cli.check_invocation(PROGRAM, argv, required={
      "train_dir": "the extracted train images", "output_dir": "where the shards go"})
  if status is not None:
    return status
  f = flags.FLAGS
  try:
    result = convert(f.output_dir, f.train_dir, f.validation_dir,
                     validation_labels=f.validation_labels, devkit_dir=f.devkit_dir,
                     train_shards=f.train_shards, validation_shards=f.validation_shards,
                     seed=f.seed, workers=max(1, f.workers))
  except ConversionError as e:
    return cli.error(PROGRAM, str(e))
  classes = result["classes"]
  print(f"Wrote {result['train']:,} train and {result['validation']:,} validation images of "
        f"{len(classes)} classes to {f.output_dir} (image/class/label 1 = {classes[0]} ... "
        f"{len(classes)} = {classes[-1]}); re-encoded as RGB JPEG: "
        f"{', '.join(result['reencoded']) or 'none'}.")
  if len(classes) != 1000:
    print(f"Note: {len(classes)} classes, not ImageNet-1K's 1,000.", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from tfmochi import cli as _cli  # pylint: disable=g-import-not-at-top

  _cli.run(PROGRAM, define_flags, main)
