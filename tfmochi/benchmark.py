"""`python -m tfmochi.benchmark --what=step|head|input`: speed and memory of tfmochi's pieces.

Each run prints ONE JSON line on stdout (and appends it to `--output` if given):

  --what=head   the contrastive head alone: queue logits, top-N, synthesis, loss and the gradient
                w.r.t. q (a `tf.function` with a GradientTape over q; the queue is a tensor), for
                MoCo (no MoCHi) and MoCHi(N, s, s') in the same process, interleaved. With
                `--compare_topn`, also the MoCHi head compiled whole by XLA with the exact and
                the approximate top-N (`--mochi_topn`).
  --what=step   a full MoCo v2 training step (synthetic random images, no input pipeline): the
                `MoCo` object, an SGD optimizer built before tracing and a `tf.function` running
                `moco.train_step` through `strategy.run` for `--steps_per_call` steps, as the
                trainer does. With MoCHi on and `--compare_moco`, the same step without MoCHi is
                timed in the same process, interleaved; `--compare_jit` adds the step compiled
                by XLA (`--jit_compile=true`).
  --what=input  the MoCo v2 augmentation pipeline (`data.pretrain_dataset`) on an in-memory source
                of random `--source_size`² uint8 images, on `--source_images` real 500x375 JPEG
                photos in TFRecords (`--input_source=jpeg`: decoding included, fused with the
                crops), or on the `--dataset` itself (`--input_source=dataset`), in images/s at
                `--image_size` (two views per image), and per thread with `--input_threads`.

The model, data and objective come from the training flags (`tfmochi.config.define_flags`:
`--arch --image_size --batch_size --queue_size --embedding_dim --mochi_num_hard --mochi_num_mix
--mochi_num_query_mix --temperature --loss --bn_mode --mixed_precision ...`), so a benchmark and a
training run use the same settings. Timing: `--warmup_steps` untimed calls per variant (tracing, XLA
compilation, allocator warm-up), then `--timed_steps` (>= 5) timed calls per variant, variants
interleaved call by call so that a noisy machine slows all of them alike; the median is reported.
Memory: the peak resident set size of each timed call, from the kernel's high-water mark (reset
before each call through /proc/self/clear_refs) and from a background thread sampling
/proc/self/status, and its increase over the RSS at the start of that call (freed heap memory is
returned to the OS before each call so the start is a fair baseline); and, because TensorFlow's
CPU allocator pools memory (so a repeated computation barely moves the RSS), the peak of that
allocator during the call and its increase (`tf_peak_mb`, `tf_increase_mb`).

Every function below takes explicit arguments; FLAGS are read only in `main`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tfmochi import config as config_lib  # noqa: E402
from tfmochi import memory  # noqa: E402

WHATS = ("step", "head", "input")
# MoCHi's paper setting, used by --what=head when the flags leave MoCHi off (N = 0).
PAPER_MOCHI = (1024, 1024, 512)

_MB = 1024.0 * 1024.0


# ------------------------------------------------------------------------------------------------
# Memory


def current_rss_mb() -> float:
  """Resident set size of this process in MB (0 where /proc is missing)."""
  return memory.resident_memory_mb() or 0.0


def _release_free_heap() -> None:
  """Returns freed malloc memory to the OS (glibc), so a phase's start RSS is not inflated by the
  previous phase's freed buffers. A no-op where malloc_trim does not exist."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _reset_peak() -> bool:
  """Resets the kernel's RSS high-water mark (VmHWM) of this process; False if not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _tf_allocator_mb(reset: bool = False) -> tuple[float, float] | None:
  """(current, peak) MB of TensorFlow's CPU allocator (tensors and XLA buffers), optionally
  resetting the peak first; None where the runtime does not keep these statistics."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if reset:
      tf.config.experimental.reset_memory_stats("CPU:0")
    info = tf.config.experimental.get_memory_info("CPU:0")
  except (ValueError, RuntimeError, tf.errors.OpError):
    return None
  return info["current"] / _MB, info["peak"] / _MB


class PeakMemory:
  """Peak memory of a code block: `with PeakMemory() as m: ...; m.peak_mb, m.increase_mb`.

  Resident set size: two sources, the larger wins: the kernel's VmHWM (exact, when it can be reset
  at the start) and a background thread reading VmRSS every `interval` seconds (TensorFlow releases
  the GIL while it computes, so the thread keeps sampling). TensorFlow's CPU allocator keeps the
  memory it has used in a pool, so once a computation has run, repeating it barely moves the RSS;
  the allocator's own peak (`tf_peak_mb`, `tf_increase_mb`: tensors and XLA buffers allocated
  during the block) is what tells two computations' transient memory apart.
  """

  def __init__(self, interval: float = 0.005):
    self.interval = interval
    self.start_mb = 0.0
    self.peak_mb = 0.0
    self.tf_start_mb = 0.0
    self.tf_peak_mb = 0.0
    self._stop = threading.Event()
    self._thread = None
    self._hwm_valid = False

  @property
  def increase_mb(self) -> float:
    return max(0.0, self.peak_mb - self.start_mb)

  @property
  def tf_increase_mb(self) -> float:
    return max(0.0, self.tf_peak_mb - self.tf_start_mb)

  def _sample(self):
    while not self._stop.is_set():
      self.peak_mb = max(self.peak_mb, current_rss_mb())
      self._stop.wait(self.interval)

  def __enter__(self) -> "PeakMemory":
    _release_free_heap()
    self._hwm_valid = _reset_peak()
    self.start_mb = self.peak_mb = current_rss_mb()
    self.tf_start_mb, self.tf_peak_mb = _tf_allocator_mb(reset=True) or (0.0, 0.0)
    self._stop.clear()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_mb = max(self.peak_mb, current_rss_mb())
    if self._hwm_valid:
      hwm = memory.status_kb("VmHWM")
      if hwm is not None:
        self.peak_mb = max(self.peak_mb, hwm / 1024.0)
    allocator = _tf_allocator_mb()
    if allocator is not None:
      self.tf_peak_mb = allocator[1]


# ------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class VariantResult:
  """Timings and memory of one benchmarked variant.

  Attributes:
    seconds_per_step: [timed calls] wall seconds per step of each timed call.
    peak_rss_mb: [timed calls] peak RSS during each timed call.
    rss_increase_mb: [timed calls] that peak minus the RSS at the start of the call.
    tf_peak_mb: [timed calls] peak of TensorFlow's CPU allocator during each timed call.
    tf_increase_mb: [timed calls] that peak minus the allocator's use at the start of the call.
  """
  seconds_per_step: list[float] = dataclasses.field(default_factory=list)
  peak_rss_mb: list[float] = dataclasses.field(default_factory=list)
  rss_increase_mb: list[float] = dataclasses.field(default_factory=list)
  tf_peak_mb: list[float] = dataclasses.field(default_factory=list)
  tf_increase_mb: list[float] = dataclasses.field(default_factory=list)

  def summary(self, images_per_step: int) -> dict:
    median = statistics.median(self.seconds_per_step)
    return {
        "median_seconds_per_step": median,
        "images_per_sec": images_per_step / median,
        "seconds_per_step": self.seconds_per_step,
        "peak_rss_mb": max(self.peak_rss_mb),
        "rss_increase_mb": max(self.rss_increase_mb),
        "tf_peak_mb": max(self.tf_peak_mb),
        "tf_increase_mb": max(self.tf_increase_mb),
    }


def run_interleaved(variants: dict[str, Callable[[], object]], *, warmup: int, timed: int,
                    steps_per_call: int = 1) -> dict[str, VariantResult]:
  """Times callables call by call in turn: A B A B ... after `warmup` untimed calls of each.

  Args:
    variants: name -> a callable running `steps_per_call` steps and returning something whose
      tensors are fetched (`.numpy()`) to wait for the work to finish.
    warmup: untimed calls per variant (first: tracing and compilation).
    timed: timed calls per variant.
    steps_per_call: steps each call runs (the per-step time is the call time divided by it).

  Returns:
    name -> VariantResult.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def finish(out):
    for t in tf.nest.flatten(out):
      if hasattr(t, "numpy"):
        t.numpy()

  for fn in variants.values():
    for _ in range(warmup):
      finish(fn())
  results = {name: VariantResult() for name in variants}
  for _ in range(timed):
    for name, fn in variants.items():
      with PeakMemory() as mem:
        start = time.perf_counter()
        finish(fn())
        elapsed = time.perf_counter() - start
      res = results[name]
      res.seconds_per_step.append(elapsed / steps_per_call)
      res.peak_rss_mb.append(mem.peak_mb)
      res.rss_increase_mb.append(mem.increase_mb)
      res.tf_peak_mb.append(mem.tf_peak_mb)
      res.tf_increase_mb.append(mem.tf_increase_mb)
  return results


def machine_info() -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  try:
    load = [round(v, 2) for v in os.getloadavg()]
  except OSError:
    load = None
  return {"cpus": os.cpu_count(), "loadavg": load, "tensorflow": tf.__version__,
          "keras": keras.__version__,
          "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
          "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}


def _compare(results: dict, images_per_step: int) -> dict:
  out = {"variants": {k: v.summary(images_per_step) for k, v in results.items()}}
  if "moco" in results and "mochi" in results:
    moco, mochi = out["variants"]["moco"], out["variants"]["mochi"]
    out["ratio_mochi_over_moco"] = (mochi["median_seconds_per_step"]
                                    / moco["median_seconds_per_step"])
    out["rss_increase_mochi_minus_moco_mb"] = mochi["rss_increase_mb"] - moco["rss_increase_mb"]
    out["tf_increase_mochi_minus_moco_mb"] = mochi["tf_increase_mb"] - moco["tf_increase_mb"]
  for name in results:
    for suffix, ratio in (("_keras_conv", "ratio_keras_conv_over_fast"),
                          ("_jit", "ratio_jit_over_plain")):
      if name.endswith(suffix) and name[:-len(suffix)] in results:
        base = out["variants"][name[:-len(suffix)]]["median_seconds_per_step"]
        out[ratio] = out["variants"][name]["median_seconds_per_step"] / base
  if "mochi_xla_exact" in results and "mochi_xla_approx" in results:
    v = out["variants"]
    out["ratio_xla_approx_over_exact"] = (v["mochi_xla_approx"]["median_seconds_per_step"]
                                          / v["mochi_xla_exact"]["median_seconds_per_step"])
  return out


# ------------------------------------------------------------------------------------------------
# --what=head


def head_inputs(batch_size: int, queue_size: int, dim: int, seed: int = 0) -> dict:
  """Random L2-normalised q, k [B, D], a queue [K, D], and ids/labels that never collide."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def unit(shape, stream):
    return tf.math.l2_normalize(tf.random.stateless_normal(shape, [seed, stream]), axis=-1)

  return {
      "q": unit([batch_size, dim], 1), "k": unit([batch_size, dim], 2),
      "queue": unit([queue_size, dim], 3),
      "query_ids": tf.range(batch_size, dtype=tf.int64),
      "queue_ids": tf.range(batch_size, batch_size + queue_size, dtype=tf.int64),
      "query_labels": tf.fill([batch_size], tf.constant(-1, tf.int64)),
      "queue_labels": tf.fill([queue_size], tf.constant(-1, tf.int64)),
  }


def make_objective_fn(objective_config, inputs: dict, jit_compile: bool = False) -> Callable[[], object]:
  """A zero-argument callable: one forward + backward (w.r.t. q) of `contrastive_objective`.

  The inputs are captured as arguments of a `tf.function` (not constants), so nothing is folded.
  `jit_compile` compiles the whole head with XLA (as `--jit_compile` or a TPU does: the top-N is
  then XLA's TopK, or its ApproxTopK with `--mochi_topn=approx`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfmochi import objective as objective_lib  # pylint: disable=g-import-not-at-top

  @tf.function(jit_compile=jit_compile)
  def step(q, k, queue, query_ids, queue_ids, query_labels, queue_labels):
    with tf.GradientTape() as tape:
      tape.watch(q)
      out = objective_lib.contrastive_objective(
          q, k, queue, objective_config, seed=tf.constant([1, 2], tf.int64), query_ids=query_ids,
          queue_ids=queue_ids, query_labels=query_labels, queue_labels=queue_labels)
      loss = tf.reduce_mean(out.loss)
    return loss, tape.gradient(loss, q)

  return lambda: step(**inputs)


def bench_head(config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
               compare_topn: bool = False) -> dict:
  """Times the contrastive head for MoCo and MoCHi, interleaved, in this process.

  Args:
    config: B = batch_size, K = queue_size, D = embedding_dim, the objective (temperature, loss,
      masks) and MoCHi's (N, s, s', --mochi_topn); when N = 0 the paper's (1024, 1024, 512) is
      used (N <= K).
    warmup: untimed calls per variant.
    timed: timed calls per variant.
    compare_topn: also time the MoCHi head compiled whole by XLA (XLA:CPU here, the TPU's
      compiler elsewhere) with the exact top-N ("mochi_xla_exact": TopK) and the approximate one
      ("mochi_xla_approx": ApproxTopK at --mochi_topn_recall).

  Returns:
    The JSON-able result (see `main`).
  """
  from tfmochi import mixing  # pylint: disable=g-import-not-at-top

  objective_config = config.objective_config()
  mochi = objective_config.mochi
  if not mochi.enabled:
    n, s, s2 = PAPER_MOCHI
    mochi = mixing.MochiConfig(min(n, config.queue_size), s, s2, config.mochi_beta_max,
                               top_n=config.mochi_topn, top_n_recall=config.mochi_topn_recall)
  inputs = head_inputs(config.batch_size, config.queue_size, config.embedding_dim, config.seed)
  variants = {
      "moco": make_objective_fn(dataclasses.replace(objective_config, mochi=mixing.MochiConfig(0, 0, 0)),
                           inputs),
      "mochi": make_objective_fn(dataclasses.replace(objective_config, mochi=mochi), inputs),
  }
  if compare_topn:
    for top_n in mixing.TOP_N_METHODS:
      variants[f"mochi_xla_{top_n}"] = make_objective_fn(
          dataclasses.replace(objective_config, mochi=dataclasses.replace(mochi, top_n=top_n)),
          inputs, jit_compile=True)
  results = run_interleaved(variants, warmup=warmup, timed=timed)
  out = {"what": "head", **_compare(results, config.batch_size)}
  out["config"] = {"batch_size": config.batch_size, "queue_size": config.queue_size,
                   "embedding_dim": config.embedding_dim, "temperature": config.temperature,
                   "loss": config.loss, "mask_duplicates": config.mask_duplicates,
                   "label_mode": config.label_mode,
                   "mochi": [mochi.num_hard, mochi.num_mix, mochi.num_query_mix],
                   "mochi_topn": mochi.top_n, "mochi_topn_recall": mochi.top_n_recall}
  return out


# ------------------------------------------------------------------------------------------------
# --what=step


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict:
  """A MoCo batch of random normalised views: {"view1", "view2": [B, S, S, 3], "id", "label"}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = [batch_size, image_size, image_size, 3]
  return {"view1": tf.random.stateless_normal(shape, [seed, 11]),
          "view2": tf.random.stateless_normal(shape, [seed, 12]),
          "id": tf.range(batch_size, dtype=tf.int64),
          "label": tf.fill([batch_size], tf.constant(-1, tf.int64))}


def make_train_step_fn(config: config_lib.TrainConfig, strategy, batch: dict,
                       steps_per_call: int = 1, fast_grad: bool | None = None,
                       jit_compile: bool | None = None) -> Callable[[], object]:
  """Builds a MoCo model, its optimizer and a compiled loop of `steps_per_call` training steps.

  The trainer's build (`build.build_train_state`: the model, its SGD optimizer and counters in
  the strategy's scope before tracing, at a constant learning rate here) and its replica step,
  run by a `tf.function` through `strategy.run` inside a `tf.range` loop. `fast_grad=False` builds the
  encoders with plain `keras.layers.Conv2D` (see `models.Conv2D`); None resolves --fast_grad.
  `jit_compile` compiles the replica step with XLA as the trainer does (None: --jit_compile).

  Returns:
    A zero-argument callable running `steps_per_call` steps and returning the last loss.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfmochi import build  # pylint: disable=g-import-not-at-top
  from tfmochi import distribute  # pylint: disable=g-import-not-at-top

  if jit_compile is None:
    jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  # MoCHi synthesises from the first step (its warm-up would only mask the same computation).
  moco_config = config.moco_config(steps_per_epoch=1000, total_steps=1_000_000)
  moco_config = dataclasses.replace(moco_config, mochi_warmup_steps=0)
  state = build.build_train_state(config, strategy, moco_config, 0.03, fast_grad)
  step = state.step
  replica_step = distribute.replica_step_function(
      lambda b: state.replica_step(b)["loss"], jit_compile, strategy)

  @tf.function
  def loop(b):
    loss = tf.constant(0.0)
    for _ in tf.range(steps_per_call):
      loss = strategy.reduce("SUM", strategy.run(replica_step, args=(b,)), axis=None)
      step.assign_add(1)
    return loss

  def replica_slice(ctx):  # this replica's rows of the global batch
    per_replica = config.batch_size // ctx.num_replicas_in_sync
    start = ctx.replica_id_in_sync_group * per_replica
    return {k: v[start:start + per_replica] for k, v in batch.items()}

  distributed = strategy.experimental_distribute_values_from_function(replica_slice)
  call = lambda: loop(distributed)  # noqa: E731
  call.tracing_count = loop.experimental_get_tracing_count  # 1 after any number of calls
  return call


def bench_step(config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
               steps_per_call: int = 1, compare_moco: bool = True,
               compare_keras_conv: bool = False, compare_jit: bool = False) -> dict:
  """Times full training steps: the flags' configuration, and plain MoCo next to a MoCHi one.

  Args:
    config: the training configuration (arch, image_size, batch_size, queue_size, MoCHi, ...).
    warmup: untimed calls per variant.
    timed: timed calls per variant (each `steps_per_call` steps).
    steps_per_call: training steps per `tf.function` call.
    compare_moco: with MoCHi on, also time the same step without MoCHi ("moco").
    compare_keras_conv: also time the first variant with plain `keras.layers.Conv2D` convolutions
      ("<name>_keras_conv"), i.e. without tfmochi's fast input gradients.
    compare_jit: also time the first variant with the replica step compiled by XLA
      ("<name>_jit"; the others follow --jit_compile, resolved to off on CPUs).

  Returns:
    The JSON-able result.
  """
  from tfmochi import build  # pylint: disable=g-import-not-at-top
  from tfmochi import distribute  # pylint: disable=g-import-not-at-top

  build.set_precision(config.mixed_precision, config.tf32)  # as the trainer
  strategy = distribute.make_strategy(config.strategy, tpu=config.tpu,
                                      cpu_replicas=config.cpu_replicas)
  batch = synthetic_batch(config.batch_size, config.image_size, config.seed)
  mochi_on = config.objective_config().mochi.enabled
  variants = {}
  moco_config = dataclasses.replace(config, mochi_num_hard=0, mochi_num_mix=0,
                                    mochi_num_query_mix=0)
  if not mochi_on or compare_moco:
    variants["moco"] = make_train_step_fn(moco_config, strategy, batch, steps_per_call)
  if mochi_on:
    variants["mochi"] = make_train_step_fn(config, strategy, batch, steps_per_call)
  if compare_keras_conv:
    first = next(iter(variants))
    variants[f"{first}_keras_conv"] = make_train_step_fn(
        moco_config if first == "moco" else config, strategy, batch, steps_per_call,
        fast_grad=False)
  if compare_jit:
    first = next(iter(variants))
    variants[f"{first}_jit"] = make_train_step_fn(
        moco_config if first == "moco" else config, strategy, batch, steps_per_call,
        jit_compile=True)
  results = run_interleaved(variants, warmup=warmup, timed=timed, steps_per_call=steps_per_call)
  out = {"what": "step", **_compare(results, config.batch_size)}
  # A step function traced more than once would be re-traced (slowly) during training too.
  out["tracing_count"] = {name: fn.tracing_count() for name, fn in variants.items()}
  out["config"] = {k: getattr(config, k) for k in (
      "arch", "small_stem", "image_size", "batch_size", "queue_size", "embedding_dim", "bn_mode",
      "bn_splits", "mixed_precision", "temperature", "loss", "mask_duplicates", "mochi_num_hard",
      "mochi_num_mix", "mochi_num_query_mix", "strategy", "cpu_replicas", "jit_compile",
      "fast_grad")}
  out["config"]["steps_per_call"] = steps_per_call
  out["config"]["replicas"] = strategy.num_replicas_in_sync
  return out


# ------------------------------------------------------------------------------------------------
# --what=input


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
    config: batch_size, image_size, augmentation, crop_min_scale, seed, deterministic.
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

  source = source if source is not None else synthetic_source(512, 256, config.seed)
  ds = data.pretrain_dataset(source, global_batch_size=config.batch_size,
                             image_size=config.image_size, seed=config.seed,
                             recipe=config.augmentation, crop_scale=(config.crop_min_scale, 1.0),
                             deterministic=config.deterministic, fused_decode=fused_decode)
  if threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = ds.with_options(options)
  iterator = iter(ds)

  def fetch():  # an eager iterator hands out finished batches: nothing left to wait for
    for _ in range(steps_per_call):
      next(iterator)

  results = run_interleaved({"input": fetch}, warmup=warmup, timed=timed,
                            steps_per_call=steps_per_call)
  out = {"what": "input", **_compare(results, config.batch_size)}
  out["config"] = {"source": source.name, "source_examples": source.num_examples,
                   "batch_size": config.batch_size, "image_size": config.image_size,
                   "augmentation": config.augmentation, "deterministic": config.deterministic,
                   "steps_per_call": steps_per_call, "threads": threads,
                   "fused_decode": fused_decode,
                   "cpu_cores": len(os.sched_getaffinity(0))}
  out["images_per_sec_per_thread"] = out["variants"]["input"]["images_per_sec"] / (
      threads or len(os.sched_getaffinity(0)))
  return out


# ------------------------------------------------------------------------------------------------
# Command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The training flags plus the benchmark's own (idempotent)."""
  config_lib.define_flags(flag_values)
  if "what" in flag_values:
    return
  flags.DEFINE_enum("what", "head", WHATS, "What to time: step (full training step), head "
                    "(contrastive head, MoCo vs MoCHi) or input (augmentation pipeline).",
                    flag_values=flag_values)
  flags.DEFINE_integer("warmup_steps", 3, "Untimed calls per variant before timing.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("timed_steps", 5, "Timed calls per variant (the median is reported).",
                       lower_bound=5, flag_values=flag_values)
  flags.DEFINE_bool("compare_moco", True, "--what=step with MoCHi on: also time the same step "
                    "without MoCHi, interleaved, and report the ratio.", flag_values=flag_values)
  flags.DEFINE_bool("compare_keras_conv", False, "--what=step: also time the first variant with "
                    "plain keras Conv2D layers (without tfmochi's fast input gradients).",
                    flag_values=flag_values)
  flags.DEFINE_bool("compare_jit", False, "--what=step: also time the first variant with the "
                    "replica step compiled by XLA (--jit_compile=true), interleaved.",
                    flag_values=flag_values)
  flags.DEFINE_bool("compare_topn", False, "--what=head: also time the MoCHi head compiled by "
                    "XLA with the exact and the approximate top-N (--mochi_topn).",
                    flag_values=flag_values)
  flags.DEFINE_integer("steps_per_call", 1, "Steps (or input batches) per timed call.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_enum("input_source", "synthetic", ("synthetic", "dataset", "jpeg"),
                    "--what=input: random uint8 images in memory, --dataset itself, or "
                    "--source_images real 500x375 JPEG photos in TFRecords (decoded per view "
                    "with the crop fused into the decode, as in training from TFRecords).",
                    flag_values=flag_values)
  flags.DEFINE_string("jpeg_dir", "/tmp/tfmochi_bench_jpeg", "--input_source=jpeg: where the "
                      "generated TFRecords are written (reused when present).",
                      flag_values=flag_values)
  flags.DEFINE_bool("input_fused_decode", True, "--what=input: decode only each view's crop "
                    "window of a JPEG (as training does); false: the whole image once for both "
                    "views.", flag_values=flag_values)
  flags.DEFINE_integer("input_threads", 0, "--what=input: threads of the input pipeline (0: "
                       "tf.data's default); the result also gives images/s per thread.",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer("source_size", 256, "--what=input: side of the synthetic source images.",
                       lower_bound=8, flag_values=flag_values)
  flags.DEFINE_integer("source_images", 512, "--what=input: number of synthetic source images.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads (0: its default).",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: its default).",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string("output", None, "Also append the JSON line to this file.",
                      flag_values=flag_values)


def run(what: str, config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
        steps_per_call: int = 1, compare_moco: bool = True, compare_keras_conv: bool = False,
        source=None, input_threads: int = 0, input_fused_decode: bool = True,
        compare_jit: bool = False, compare_topn: bool = False) -> dict:
  """Runs one benchmark and returns its JSON-able result (with the machine description)."""
  if timed < 5:
    raise ValueError(f"timed must be >= 5 (a median of fewer steps is noise), got {timed}.")
  if what == "head":
    out = bench_head(config, warmup=warmup, timed=timed, compare_topn=compare_topn)
  elif what == "step":
    out = bench_step(config, warmup=warmup, timed=timed, steps_per_call=steps_per_call,
                     compare_moco=compare_moco, compare_keras_conv=compare_keras_conv,
                     compare_jit=compare_jit)
  elif what == "input":
    out = bench_input(config, warmup=warmup, timed=timed, source=source,
                      steps_per_call=steps_per_call, threads=input_threads,
                      fused_decode=input_fused_decode)
  else:
    raise ValueError(f"what must be one of {', '.join(WHATS)}; got {what!r}.")
  out["warmup_steps"], out["timed_steps"] = warmup, timed
  out["machine"] = machine_info()
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])} (flags start with --).")
  flag_values = flags.FLAGS
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  # Thread pools can only be sized before the runtime starts, i.e. before the first op.
  if flag_values.intra_op_threads:
    tf.config.threading.set_intra_op_parallelism_threads(flag_values.intra_op_threads)
  if flag_values.inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(flag_values.inter_op_threads)
  try:
    config = config_lib.from_flags(flag_values)
  except config_lib.ConfigError as e:
    print(f"tfmochi.benchmark: error: {e}", file=sys.stderr, flush=True)
    return 2
  source = None
  if flag_values.what == "input":
    if flag_values.input_source == "dataset":
      from tfmochi import data  # pylint: disable=g-import-not-at-top
      source = data.load(config.dataset, "train", data_dir=config.data_dir, seed=config.seed,
                         tfrecord_label_offset=config.tfrecord_label_offset)
    elif flag_values.input_source == "jpeg":
      source = jpeg_photo_source(flag_values.jpeg_dir, flag_values.source_images, config.seed)
    else:
      source = synthetic_source(flag_values.source_images, flag_values.source_size, config.seed)
  result = run(flag_values.what, config, warmup=flag_values.warmup_steps,
               timed=flag_values.timed_steps, steps_per_call=flag_values.steps_per_call,
               compare_moco=flag_values.compare_moco,
               compare_keras_conv=flag_values.compare_keras_conv, source=source,
               input_threads=flag_values.input_threads,
               input_fused_decode=flag_values.input_fused_decode,
               compare_jit=flag_values.compare_jit, compare_topn=flag_values.compare_topn)
  line = json.dumps(result, sort_keys=True)
  print(line, flush=True)
  if flag_values.output:
    with open(flag_values.output, "a") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
