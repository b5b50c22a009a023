"""`load`: a data set name and split -> a DataSource (fails fast with a DataError)."""

from __future__ import annotations

from tfmochi.data.folder import load_folder
from tfmochi.data.mnist5k import load_mnist5k
from tfmochi.data.quickstart import load_quickstart
from tfmochi.data.source import TEST_SPLITS, DataError, DataSource
from tfmochi.data.tfds_source import imagenet100_wnids, load_tfds
from tfmochi.data.tfrecord import load_tfrecord


def load(name: str, split: str = "train", data_dir: str | None = None, *, seed: int = 0,
         holdout_fraction: float = 0.1, validate: str = "none", download: bool = False,
         num_workers: int | None = None, tfrecord_label_offset: int = 1) -> DataSource:
  """Resolves a data set name and split to a DataSource. Fails fast with a DataError.

  Args:
    name: "quickstart", "mnist5k", "imagenet2012", "imagenet100", "folder", "tfrecord" or a
      tensorflow-datasets name.
    split: "train" or "test" ("validation"/"val" are aliases of "test"; for ImageNet the held-out
      split is tfds' "validation"). tfds sources also accept any tfds split expression.
    data_dir: tfds data directory (may be gs://; None = tfds default); for "folder", the
      image folder; for "tfrecord", a folder of train-*/validation-* files or a glob of the train
      files (see tfmochi.data.tfrecord).
    seed: seed of the held-out split tfmochi makes when a data set has none (quickstart, mnist5k, folder
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
  test = split in TEST_SPLITS
  if split not in ("train",) + TEST_SPLITS and name in ("quickstart", "mnist5k", "folder"):
    raise DataError(f"Data set {name!r} has the splits 'train' and 'test'; got {split!r}.")
  if name == "quickstart":
    return load_quickstart(test, seed)
  if name == "mnist5k":
    return load_mnist5k(test, seed)
  if name == "folder":
    return load_folder(data_dir, test, seed=seed, holdout_fraction=holdout_fraction,
                       validate=validate, num_workers=num_workers)
  if name == "tfrecord":
    if split not in ("train",) + TEST_SPLITS:
      raise DataError(f"Data set 'tfrecord' has the splits 'train' and 'test'; got {split!r}.")
    return load_tfrecord(data_dir, test, label_offset=tfrecord_label_offset)
  if name == "imagenet100":
    return load_tfds("imagenet2012", split, data_dir, download=download,
                     wnids=imagenet100_wnids(), display_name="imagenet100")
  return load_tfds(name, split, data_dir, download=download)
