"""The momentum (key) encoder: exact initial copy, EMA of the query encoder, momentum schedules.

θk ← m·θk + (1−m)·θq over the *trainable* weights (MoCo updates parameters, not buffers): the key
encoder's BatchNorm moving statistics are its own, accumulated from the key batches it sees.
The key encoder starts from the query encoder's exact weights, never from a fresh init (the
`keras.models.clone_model` trap: it re-initialises).

Under tf.distribute the update runs in replica context on NONE-aggregated variables: each replica
computes the same new value from identical query weights, so the copies stay equal without a
cross-replica merge.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfmochi import models


def check_momentum(m: float, name: str = "moco_momentum") -> float:
  """Returns m if it lies in [0, 1), else raises ValueError calling it `name`."""
  if not (isinstance(m, (int, float)) and 0.0 <= m < 1.0):
    raise ValueError(f"{name} (m) must be in [0, 1), got {m!r}.")
  return float(m)


def weight_pairs(query: keras.Model, key: keras.Model) -> list[tuple[tf.Variable, tf.Variable]]:
  """(key variable, query variable) for every trainable weight of the query model.

  The two models must be the same architecture (same weight order and shapes); the key model's
  own `trainable` flag does not matter (it is usually frozen).

  Raises:
    ValueError: the models do not match.
  """
  models.check_same_weights(query, key)
  trainable = {id(v) for v in query.trainable_weights}
  pairs = []
  for q_var, k_var in zip(query.weights, key.weights):
    if id(q_var) in trainable:
      pairs.append((k_var, q_var))
  return pairs


def momentum_update(pairs: list[tuple[tf.Variable, tf.Variable]], m: float | tf.Tensor) -> tf.Operation:
  """θk ← m·θk + (1−m)·θq for every (key, query) pair.

  Args:
    pairs: from `weight_pairs`.
    m: momentum in [0, 1) (scalar float or tensor; tensors allow schedules without retracing).

  Returns:
    The grouped assign op.
  """
  m = tf.cast(m, tf.float32)
  updates = []
  for k_var, q_var in pairs:
    k_val = tf.convert_to_tensor(k_var)
    mm = tf.cast(m, k_val.dtype)
    updates.append(k_var.assign(mm * k_val + (1.0 - mm) * tf.cast(q_var, k_val.dtype)))
  return tf.group(*updates)


def cosine_momentum(step: tf.Tensor | int, total_steps: int, base_momentum: float) -> tf.Tensor:
  """Momentum increased from m0 to 1 with a half cosine (BYOL's schedule).

  m(t) = 1 − (1 − m0)·(cos(π·t/T) + 1)/2, so m(0) = m0 and m(T) = 1.

  Args:
    step: the current step t.
    total_steps: T > 0.
    base_momentum: m0.

  Returns:
    scalar float32 momentum.
  """
  t = tf.minimum(tf.cast(step, tf.float32) / float(max(total_steps, 1)), 1.0)
  return 1.0 - (1.0 - base_momentum) * (tf.cos(math.pi * t) + 1.0) / 2.0
