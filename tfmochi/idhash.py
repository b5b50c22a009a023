"""Seeded, stateless per-image draws from an image's id: the same on every host, at every epoch and
after a resume, with no state to checkpoint and no loop over the data.

`id_hash` hashes the string "seed:stream:id" (or "seed:id" without a stream); different streams
give independent draws of the same images. The class-balanced kNN subset ranks images by
`id_hash(ids, seed, "knn")`; the labelled fraction of `--labeled_fraction` keeps the images whose
`id_uniform(ids, seed)` is below it.
"""

from __future__ import annotations

import tensorflow as tf

_UNIFORM_BUCKETS = 1 << 30


def id_hash(ids, seed: int, stream: str = "", buckets: int = 1 << 62) -> tf.Tensor:
  """A pseudo-random int64 in [0, buckets) per id: a function of (seed, stream, id) only.

  Args:
    ids: [...] int sample ids (tensor or array).
    seed: the run seed.
    stream: names an independent draw ("" for the plain "seed:id" key).
    buckets: the range of the result.

  Returns:
    [...] int64.
  """
  separator = f":{stream}:" if stream else ":"
  keys = tf.strings.join([tf.strings.as_string(tf.cast(seed, tf.int64)), separator,
                          tf.strings.as_string(tf.cast(ids, tf.int64))])
  return tf.strings.to_hash_bucket_fast(keys, buckets)


def id_uniform(ids, seed: int, stream: str = "") -> tf.Tensor:
  """A pseudo-random float64 in [0, 1) per id (`id_hash` scaled): [...] like `ids`."""
  return tf.cast(id_hash(ids, seed, stream, _UNIFORM_BUCKETS), tf.float64) / _UNIFORM_BUCKETS
