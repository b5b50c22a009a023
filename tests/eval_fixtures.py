"""Data, backbones and run directories shared by the evaluate and analyze tests.

Tiny in-memory data sets whose answer is known by construction (solid colours are linearly
separable; noise images with random labels make an accuracy depend on exactly which images are
used), backbones with a "pooled" output, and run directories as the trainer leaves them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf

from tfmochi import config as config_lib
from tfmochi import data as data_lib
from tfmochi import models

SIZE = 16


def save_checkpoint(model_dir: str, encoder, step: int) -> None:
  ckpt = tf.train.Checkpoint(step=tf.Variable(step, dtype=tf.int64), query_encoder=encoder)
  tf.train.CheckpointManager(ckpt, os.path.join(model_dir, "checkpoints"), max_to_keep=3).save(
      checkpoint_number=step)


def make_run(model_dir: str, checkpoint: bool = True, **config) -> str:
  """A run directory as the trainer leaves it (config.json + a query-encoder checkpoint).

  A quickstart run of a ResNet-18 at 16 px; `config` overrides TrainConfig fields.
  """
  os.makedirs(model_dir, exist_ok=True)
  if checkpoint:
    save_checkpoint(model_dir, models.build_encoder("resnet18", small_stem=True,
                                                    name="query_encoder"), 1)
  # head_bn=False: the checkpoint above holds build_encoder's default (MoCo v2) head.
  run_config = config_lib.TrainConfig(**{
      "dataset": "quickstart", "arch": "resnet18", "small_stem": True, "head_bn": False,
      "image_size": SIZE, "model_dir": model_dir, "bn_mode": "none", "queue_size": 256,
      "batch_size": 32, **config})
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    f.write(json.dumps(dataclasses.asdict(run_config)))
  return model_dir


def colour_images(num_per_class: int, num_classes: int, seed: int, size: int = 12):
  """Solid-colour images (one colour per class) with mild noise: linearly separable."""
  rng = np.random.default_rng(seed)
  palette = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]])
  labels = np.repeat(np.arange(num_classes), num_per_class)
  noise = rng.integers(-20, 21, size=[len(labels), size, size, 3])
  images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
  order = rng.permutation(len(labels))
  return images[order], labels[order]


def sources(num_per_class: int = 12, num_classes: int = 3, labelled: bool = True):
  x, y = colour_images(num_per_class, num_classes, seed=1)
  xt, yt = colour_images(max(2, num_per_class // 3), num_classes, seed=2)
  train = data_lib.from_numpy(x, y if labelled else None, name="colours", split="train")
  test = data_lib.from_numpy(xt, yt if labelled else None, name="colours", split="test",
                             ids=np.arange(len(xt)) + 10_000)
  return train, test


def noise_images(num_per_class, seed: int = 0, size: int = 8):
  """Uniform noise images, `num_per_class[c]` of class c, in a shuffled order."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(num_per_class)), num_per_class))
  return rng.integers(0, 256, [len(labels), size, size, 3], dtype=np.uint8), labels


def tiny_bn_backbone(seed: int = 0) -> keras.Model:
  """Conv -> BN -> ReLU -> average pool: a seeded, well-conditioned backbone with BN statistics.

  (A random-init ResNet's pooled features share a large common component, so whether a few
  dozen SGD steps separate them depends on the draw; this one separates the colours reliably.)
  """
  images = keras.Input(shape=(None, None, 3))
  x = keras.layers.Conv2D(16, 3, use_bias=False,
                          kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(images)
  bn = keras.layers.BatchNormalization()
  x = keras.layers.ReLU()(bn(x))
  model = keras.Model(images, {"pooled": keras.layers.GlobalAveragePooling2D()(x)})
  # Non-trivial moving statistics, so that inference mode differs from training mode.
  bn.moving_mean.assign(np.full([16], 0.1, np.float32))
  bn.moving_variance.assign(np.full([16], 2.0, np.float32))
  return model


def mean_colour_backbone() -> keras.Model:
  """A 'backbone' whose pooled feature is the mean colour: separable for _colour_images."""
  images = keras.Input(shape=(None, None, 3))
  pooled = keras.layers.GlobalAveragePooling2D()(images)
  return keras.Model(images, {"pooled": pooled})


def unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(num_queries: int = 4, per_block: int = 100, dim: int = 64, seed: int = 0):
  """Queries e_0..e_{M-1}; queue block i is similar only to query i, with decreasing cosine.

  In block i, the entries of rank 0, 4, 8, 12, 16 (hardest first) have the query's class i; the
  other entries have class M (no query has it). With K = 400: the hardest 0.1% (1 entry) is 100%
  same class, the hardest 1% (4) and 5% (20) are exactly 25%, and overall 5 / 400.
  """
  rng = np.random.default_rng(seed)
  q = np.eye(num_queries, dim, dtype=np.float32)
  queue, labels = [], []
  for i in range(num_queries):
    noise = rng.normal(size=[per_block, dim])
    noise[:, :num_queries] = 0.0  # orthogonal to every query
    noise = unit(noise)
    cos = 0.9 - 0.004 * np.arange(per_block)  # rank r has cosine 0.9 - 0.004 r
    queue.append(cos[:, None] * q[i][None, :] + np.sqrt(1 - cos[:, None] ** 2) * noise)
    block_labels = np.full([per_block], num_queries)
    block_labels[[0, 4, 8, 12, 16]] = i
    labels.append(block_labels)
  perm = rng.permutation(num_queries * per_block)  # the queue order must not matter
  queue = np.concatenate(queue).astype(np.float32)[perm]
  return q, queue, np.arange(num_queries), np.concatenate(labels)[perm]
