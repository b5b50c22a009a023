"""`--what=input`: the augmentation pipeline on synthetic images, JPEG photos or a data set."""

from __future__ import annotations

import os

from tfmochi import config as config_lib
from tfmochi.benchmark import timing


def synthetic_source(num_images: int, size: int, seed: int = 0):
  """An in-memory `data.DataSource` of random uint8 [size, size, 3] images with 10 labels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tfmochi import data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_images, size, size, 3), dtype=np.uint8)
  return data.from_numpy(images, rng.integers(0, 10, size=num_images), name="synthetic")


def jpeg_photo_source(directory: str, num_images: int, seed: int = 0,
                      height: int = 375, width: int = 500):
  """`num_images` real JPEG photos of height x width in ImageNet-layout TFRecords under
  `directory` (written once, reused), read back as `data.load("tfrecord")`.

  The photos are random crops of scikit-learn's two sample photographs (427 x 640, shipped with
  scikit-learn), resized to ImageNet's typical 500 x 375 and encoded at quality 90 (ImageNet's
  own JPEGs average about 110 kB at ~400 x 350), so decoding costs what it costs on real data.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  from tfmochi import data  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, f"train-00000-of-00001-{num_images}x{height}x{width}-s{seed}")
  if not tf.io.gfile.exists(path):
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    tf.io.gfile.makedirs(directory)
    with tf.io.TFRecordWriter(path + ".tmp") as writer:
      for i in range(num_images):
        photo = photos[i % len(photos)]
        h = int(rng.integers(photo.shape[0] // 2, photo.shape[0] + 1))
        w = min(photo.shape[1], int(round(h * width / height)))
        top = int(rng.integers(0, photo.shape[0] - h + 1))
        left = int(rng.integers(0, photo.shape[1] - w + 1))
        crop = tf.image.resize(photo[top:top + h, left:left + w], [height, width],
                               antialias=True)
        crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        image = tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)
        example = tf.train.Example(features=tf.train.Features(feature={
            data.TFRECORD_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[tf.io.encode_jpeg(image, quality=90).numpy()])),
            data.TFRECORD_LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(
                value=[1 + i % 10]))}))
        writer.write(example.SerializeToString())
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return data.load("tfrecord", "train", data_dir=path)


def bench_input(config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
                source=None, steps_per_call: int = 1, threads: int = 0,
                fused_decode: bool = True) -> dict:
  """Images/s of the pretraining input pipeline (`data.pretrain_dataset`) at config.image_size.

  Args:
    config: batch_size, image_size, augmentation, crop_min_scale, seed, deterministic,
      device_augment (resolved: true leaves the photometric ops to the step, so this measures
      the host's share only).
    warmup: untimed batches (pipeline start-up, autotuning).
    timed: timed calls, each fetching `steps_per_call` batches.
    source: a `data.DataSource` (default: `synthetic_source(512, 256)`).
    steps_per_call: batches per timed call.
    threads: size of the pipeline's private thread pool (0: tf.data's default, all cores); the
      result's images_per_sec_per_thread divides by it (per core when the cores are free).
    fused_decode: JPEG sources: decode each view's crop window (True) or the whole image once.

  Returns:
    The JSON-able result (images/s counts each image once, though it yields two views).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfmochi import data  # pylint: disable=g-import-not-at-top

  from tfmochi import augment  # pylint: disable=g-import-not-at-top

  source = source if source is not None else synthetic_source(512, 256, config.seed)
  device_augment = augment.resolve_device_augment(config.device_augment)
  ds = data.pretrain_dataset(source, global_batch_size=config.batch_size,
                             image_size=config.image_size, seed=config.seed,
                             recipe=config.augmentation, crop_scale=(config.crop_min_scale, 1.0),
                             deterministic=config.deterministic, fused_decode=fused_decode,
                             device_augment=device_augment)
  if threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = ds.with_options(options)
  iterator = iter(ds)

  def fetch():  # an eager iterator hands out finished batches: nothing left to wait for
    for _ in range(steps_per_call):
      next(iterator)

  results = timing.run_interleaved({"input": fetch}, warmup=warmup, timed=timed,
                            steps_per_call=steps_per_call)
  out = {"what": "input", **timing.summarize(results, config.batch_size)}
  out["config"] = {"source": source.name, "source_examples": source.num_examples,
                   "batch_size": config.batch_size, "image_size": config.image_size,
                   "augmentation": config.augmentation, "deterministic": config.deterministic,
                   "steps_per_call": steps_per_call, "threads": threads,
                   "fused_decode": fused_decode, "device_augment": device_augment,
                   "cpu_cores": len(os.sched_getaffinity(0))}
  out["images_per_sec_per_thread"] = out["variants"]["input"]["images_per_sec"] / (
      threads or len(os.sched_getaffinity(0)))
  return out
