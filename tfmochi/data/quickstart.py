"""The offline quickstart data set: scikit-learn's 1,797 handwritten digits (8x8).

The digits ship inside the scikit-learn package (no download), as 0..16 gray levels; they are
read as uint8 RGB and split 1,497 / 300, stratified by class and fixed by the seed.
"""

from __future__ import annotations

import numpy as np

from tfmochi.data.source import DataError, DataSource, from_numpy
from tfmochi.data.subsets import stratified_holdout

_TEST_SIZE = 300


def load_quickstart(test: bool, seed: int) -> DataSource:
  """The train (test=False) or held-out split; ids are indices into the 1,797 digits."""
  try:
    from sklearn import datasets as sk_datasets  # local: only this data set needs it
  except ImportError as e:
    raise DataError("The quickstart data set needs scikit-learn: pip install scikit-learn") from e
  digits = sk_datasets.load_digits()
  # 0..16 gray levels -> 0..255, tiled to RGB.
  gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
  images = np.repeat(gray[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  train, held_out = stratified_holdout(labels, _TEST_SIZE, seed)
  idx = held_out if test else train
  return from_numpy(images[idx], labels[idx], name="quickstart",
                    split="test" if test else "train", ids=idx, num_classes=10)
