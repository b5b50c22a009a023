"""The input pipelines: MoCo pretraining batches (two views) and evaluation passes.

`pretrain_dataset` turns a source into an infinite stream of per-replica batches of two views,
fully determined by (seed, step, topology); see the package docstring (tfmochi.data) for the
data-position contract that makes resume exact. `eval_dataset` is one pass over a split with
MoCo's linear-evaluation transforms.
"""

from __future__ import annotations

import tensorflow as tf

from tfmochi import augment
from tfmochi.data.source import (AUTOTUNE, DataError, DataSource, map_skipping_bad, placeholder,
                                 shard_records)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps per epoch: full global batches only (MoCo drops the last partial batch)."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
  return num_examples // global_batch_size


def _fold(key: tf.Tensor, *data) -> tf.Tensor:
  """Stateless seed derived from `key` and integers `data` (order matters)."""
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


# Distinct sub-streams of the run seed (arbitrary constants).
_SHUFFLE_STREAM = 0x5f
_AUGMENT_STREAM = 0xa9


def _input_topology(global_batch_size: int, input_context: tf.distribute.InputContext | None
                    ) -> tuple[int, int, int, int]:
  """(num_pipelines, pipeline_id, per-replica batch, replicas fed per pipeline per step)."""
  if input_context is None:
    return 1, 0, global_batch_size, 1
  replicas = input_context.num_replicas_in_sync
  pipelines = input_context.num_input_pipelines
  if replicas % pipelines:
    raise ValueError(f"{replicas} replicas cannot be split evenly over {pipelines} pipelines.")
  batch = input_context.get_per_replica_batch_size(global_batch_size)  # raises if not divisible
  return pipelines, input_context.input_pipeline_id, batch, replicas // pipelines


def _epoch_stream(source: DataSource, num_shards: int, index: int, per_epoch: int,
                  start_epoch: int, first_skip: int, key: tf.Tensor,
                  shuffle_buffer: int | None) -> tf.data.Dataset:
  """Infinite (epoch, raw example) stream: per epoch a seeded shuffle, first `per_epoch` taken.

  The first epoch (start_epoch) starts `first_skip` examples in. Nothing is decoded here.
  """
  def skip_of(epoch):  # examples already consumed before the resume point
    return tf.where(epoch == start_epoch, tf.constant(first_skip, tf.int64),
                    tf.constant(0, tf.int64))

  records = source.records()
  if records is not None:
    raw, labels, ids = shard_records(records, num_shards, index)
    n = len(ids)
    if n == 0:
      raise DataError(f"Input pipeline {index} of {num_shards} gets no examples of "
                      f"{source.name} ({source.num_examples} examples).")
    raw_t, labels_t, ids_t = tf.constant(raw), tf.constant(labels), tf.constant(ids)

    def epoch_indices(epoch):
      perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                      _fold(key, epoch))
      # A shard shorter than an epoch's share (uneven sharding) wraps around.
      positions = tf.range(skip_of(epoch), per_epoch, dtype=tf.int64) % n
      picked = tf.gather(perm, positions)
      return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(picked), epoch), picked))

    @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
    def fetch(epoch, i):
      return epoch, {"raw": tf.gather(raw_t, i), "label": tf.gather(labels_t, i),
                     "id": tf.gather(ids_t, i)}

    ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch_indices)
    return ds.map(fetch, num_parallel_calls=AUTOTUNE)

  open_epoch = source.raw_per_epoch(num_shards, index)
  buffer = shuffle_buffer or 10_000

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def epoch_examples(epoch):
    shuffle_seed = tf.random.stateless_uniform([], _fold(key, epoch), minval=None, maxval=None,
                                               dtype=tf.int64)
    # TFRecords: the file order too is drawn per epoch, then records are shuffled in a buffer.
    ds = open_epoch(shuffle_seed)
    ds = ds.shuffle(buffer, seed=shuffle_seed).repeat().take(per_epoch).skip(skip_of(epoch))
    return ds.map(lambda ex: (epoch, ex))

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_optimization.map_parallelization = True
  return options


def _views(source: DataSource, ds: tf.data.Dataset, *, image_size: int, key: tf.Tensor,
           recipe: str, crop_scale: tuple[float, float], hflip: bool, fused_decode: bool,
           num_parallel_calls: int, deterministic: bool,
           device_augment: bool = False) -> tf.data.Dataset:
  """(epoch, raw example) -> {"view1", "view2": uint8 [S, S, 3], "label", "id"}.

  The views of sample `id` at `epoch` use the seed derived from (key, epoch, id). Undecodable
  images are dropped (`map_skipping_bad`). With `device_augment` the views stop before the
  recipe's photometric ops, which the step runs (`augment.device_view_input`).
  """
  encoded = source.encoded if fused_decode else None

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def make_views(epoch, ex):
    # Encoded files: each view decodes only its crop window (decode_and_crop_jpeg).
    image = encoded(ex["raw"]) if encoded is not None else source.decode(ex)["image"]
    view1, view2 = augment.two_views_uint8(image, image_size, _fold(key, epoch, ex["id"]),
                                           recipe, crop_scale, hflip,
                                           encoded=encoded is not None,
                                           photometric=not device_augment)
    return {"view1": view1, "view2": view2, "label": ex["label"], "id": ex["id"]}

  view = (image_size, image_size, tf.uint8)
  return map_skipping_bad(source, ds, make_views, placeholder(view1=view, view2=view),
                          num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def _check_recipe_and_step(recipe: str, start_step: int) -> None:
  if recipe not in augment.AUGMENTATIONS:
    raise ValueError(f"Unknown augmentation recipe {recipe!r}; choose one of "
                     f"{sorted(augment.AUGMENTATIONS)}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")


def pretrain_dataset(source: DataSource, *, global_batch_size: int, image_size: int, seed: int,
                     recipe: str = "mocov2", crop_scale: tuple[float, float] = (0.2, 1.0),
                     hflip: bool = True,
                     input_context: tf.distribute.InputContext | None = None,
                     start_step: int = 0, shuffle_buffer: int | None = None,
                     deterministic: bool = True, fused_decode: bool = True,
                     num_parallel_calls: int = AUTOTUNE,
                     device_augment: bool = False) -> tf.data.Dataset:
  """Infinite stream of per-replica MoCo batches, fully determined by (seed, step).

  See the tfmochi.data docstring for the data-position contract. Works as the input_fn of
  `strategy.distribute_datasets_from_function(lambda ctx: pretrain_dataset(..., input_context=
  ctx))`: every input pipeline reads its own shard of the source.

  Args:
    source: from `load`.
    global_batch_size: B, summed over replicas.
    image_size: view side S.
    seed: run seed (data order and augmentations).
    recipe: "mocov2", "mocov1", "small" or "affine" (augment.AUGMENTATIONS; --augmentation).
    crop_scale: area range of the random resized crop.
    hflip: random horizontal flips in the views (off for digits and text).
    input_context: from distribute_datasets_from_function, or None for a single pipeline.
    start_step: first global step to produce (resume).
    shuffle_buffer: tfds sources only (in-memory sources use a full permutation): shuffle
      buffer of encoded examples; default 10,000.
    deterministic: keep the element order under parallel maps (needed for exact resume).
    fused_decode: sources of encoded images (folder, tfrecord, tfds): each view decodes only its
      crop window of a JPEG; False decodes the whole image once for both views (the same
      windows; for benchmarks).
    num_parallel_calls: of the decode + augment map.
    device_augment: end the views after their geometric ops (the same draws); the step runs the
      photometric ones (`augment.device_view_input`, --device_augment).

  Returns:
    tf.data.Dataset of {"view1": uint8 [b, S, S, 3], "view2": same, "label": int64 [b],
    "id": int64 [b]} with b = the per-replica batch (B without a context). The views are the
    augmented images before normalisation, rounded to uint8 (`augment.two_views_uint8`): a
    quarter of float32's bytes to the device; the step normalises them there
    (`augment.to_model_input`, called at the top of `MoCo.train_step`).
  """
  _check_recipe_and_step(recipe, start_step)
  num_shards, index, batch, replicas_per_pipeline = _input_topology(global_batch_size,
                                                                    input_context)
  spe = steps_per_epoch(source.num_examples, global_batch_size)
  if spe < 1:
    raise DataError(f"The global batch ({global_batch_size}) is larger than the "
                    f"{source.num_examples} examples of {source.name}/{source.split}.")
  batches_per_epoch = spe * replicas_per_pipeline  # this pipeline's batches in one epoch
  start_epoch, steps_in = divmod(start_step, spe)
  run_key = tf.constant([seed, 0], tf.int64)
  ds = _epoch_stream(source, num_shards, index, per_epoch=batches_per_epoch * batch,
                     start_epoch=start_epoch, first_skip=steps_in * replicas_per_pipeline * batch,
                     key=_fold(run_key, _SHUFFLE_STREAM, index), shuffle_buffer=shuffle_buffer)
  ds = _views(source, ds, image_size=image_size, key=_fold(run_key, _AUGMENT_STREAM),
              recipe=recipe, crop_scale=crop_scale, hflip=hflip, fused_decode=fused_decode,
              num_parallel_calls=num_parallel_calls, deterministic=deterministic,
              device_augment=device_augment)
  ds = ds.batch(batch, drop_remainder=True).prefetch(AUTOTUNE)
  return ds.with_options(_options(deterministic))


def eval_dataset(source: DataSource, *, batch_size: int, image_size: int,
                 train_augment: bool = False, seed: int = 0, shuffle: bool = False,
                 crop_min_scale: float = 0.08, hflip: bool = True,
                 input_context: tf.distribute.InputContext | None = None,
                 num_parallel_calls: int = AUTOTUNE) -> tf.data.Dataset:
  """One pass over a split for kNN / linear evaluation (MoCo lincls transforms).

  Args:
    source: from `load`.
    batch_size: examples per batch; the last batch may be smaller.
    image_size: side S.
    train_augment: linear_train_view (RandomResizedCrop 0.08-1 + flip) instead of center_view;
      its draws depend on (seed, id): pass a different seed per epoch for fresh crops.
    seed: augmentation and shuffle seed.
    shuffle: shuffle the examples (seeded; full permutation for in-memory sources).
    crop_min_scale, hflip: of the train_augment view (MoCo: 0.08, flips).
    input_context: read only this pipeline's shard.
    num_parallel_calls: of the decode + transform map.

  Returns:
    tf.data.Dataset of {"image": float32 [n, S, S, 3], "label": int64 [n], "id": int64 [n]}.
  """
  if input_context is None:
    ds = source.raw()
  else:
    ds = source.raw(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if shuffle:
    records = source.records()
    buffer = len(records[2]) if records is not None else 10_000
    ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=False)
  key = tf.constant([seed, 1], tf.int64)

  @tf.autograph.experimental.do_not_convert  # plain tensor code; silences AutoGraph
  def transform(ex):
    example = source.decode(ex)
    if train_augment:
      image = augment.linear_train_view(example["image"], image_size,
                                        _fold(key, example["id"]),
                                        crop_min_scale=crop_min_scale, hflip=hflip)
    else:
      image = augment.center_view(example["image"], image_size)
    return {"image": image, "label": example["label"], "id": example["id"]}

  ds = map_skipping_bad(source, ds, transform,
                        placeholder(image=(image_size, image_size, tf.float32)),
                        num_parallel_calls=num_parallel_calls, deterministic=True)
  return ds.batch(batch_size).prefetch(AUTOTUNE)

