"""The pretraining loop: data, strategy, model, optimizer, checkpoints, monitoring, export.

`train(config)` runs a whole pretraining job from a `TrainConfig` (no flags involved) and returns
the summary it also writes to `<model_dir>/summary.json`. The sections below follow the order of
a run: set up → data → model & optimizer → restore → loop (several steps per tf.function call,
progress, TensorBoard, kNN monitor, checkpoints, SIGTERM) → export → summary.

Interruptions (README "Reliability"): on one device or MirroredStrategy a SIGTERM/SIGINT sets a
flag that the loop reads at its next boundary (checkpoint, exit 0). Under MultiWorkerMirrored and
TPU strategies the same flag is handed to tf.distribute's `PreemptionCheckpointHandler`, which
agrees one step with every worker, so that all of them checkpoint there and stop together. A
worker that dies without notice makes the survivors' collectives fail (the coordination service
stops receiving its heartbeats); they stop with one `TrainingError` message, and a restart of every
worker resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time

from absl import logging
import keras
import tensorflow as tf

from tfmochi import checkpoints as ckpt_lib
from tfmochi import config as config_lib
from tfmochi import data as data_lib
from tfmochi import distribute
from tfmochi import evaluate as eval_lib
from tfmochi import models
from tfmochi import moco as moco_lib
from tfmochi import optimizer as optimizer_lib
from tfmochi import rundir
from tfmochi import schedules


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, ...); the message says what and what was kept."""


@dataclasses.dataclass
class _Preemption:
  """Set by SIGTERM/SIGINT: checkpoint at the next loop boundary and leave cleanly.

  Under MultiWorkerMirroredStrategy the flag is not acted on directly (a worker leaving alone would
  leave its peers waiting in a collective): tf.distribute's PreemptionCheckpointHandler polls it and
  chooses the step at which every worker checkpoints (`cluster_step`).
  """
  requested: bool = False
  signal_name: str = ""
  cluster_step: int | None = None  # set when the handler has saved the preemption checkpoint


class _ClusterPreempted(Exception):
  """Raised by the preemption handler's exit_fn once every worker has checkpointed."""


# Collective failures that mean "a peer is gone" (killed, crashed, unreachable): the coordination
# service reports missing heartbeats as UNAVAILABLE and aborts pending collectives; the others are
# what an aborted or timed-out collective raises.
_CLUSTER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                   tf.errors.DeadlineExceededError)


def _cluster_error_reason(error: tf.errors.OpError) -> str:
  """The useful line(s) of a collective error, without the "Detected at node" Python stack.

  E.g. "Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped sending
  heartbeats): /job:worker/replica:0/task:1".
  """
  lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
  for i, line in enumerate(lines):
    if "aborted by:" in line:
      reason = line.split("aborted by:", 1)[1].strip()
      if i + 1 < len(lines) and lines[i + 1].startswith("/job:"):
        reason += " " + lines[i + 1]
      return reason
  noise = ("File ", "Detected at node", "Graph execution error", "[[", "The error could be")
  kept = [line for line in lines if not line.startswith(noise)]
  return kept[0] if kept else type(error).__name__


class _PreemptionHandler(tf.distribute.experimental.PreemptionCheckpointHandler):
  """tf.distribute's handler, with quiet watcher threads when a peer dies.

  The handler's two background threads wait on the coordination service. When a worker dies
  without notice (or the chief, which hosts that service), their calls fail with UNAVAILABLE and
  the thread dies with a Python traceback on stderr, next to the one clear message the main thread
  gives for the same event. The overrides below log that failure at INFO instead. They wrap the
  handler's thread targets (private names of TensorFlow 2.21); if a TensorFlow release renames
  them, the overrides are simply not used and only the traceback comes back.
  """

  def _watch_step_to_save_key(self):
    try:
      super()._watch_step_to_save_key()
    except tf.errors.OpError as e:
      logging.info("Preemption watcher stopped: %s", str(e).splitlines()[0])

  def _poll_termination_signal(self):
    try:
      super()._poll_termination_signal()
    except tf.errors.OpError as e:
      logging.info("Termination signal watcher stopped: %s", str(e).splitlines()[0])


def resident_memory_mb() -> float | None:
  """This process's resident set size (VmRSS of /proc/self/status) in MB; None off Linux.

  Logged with every metrics.jsonl record so that a long run (or the soak test) shows whether host
  memory grows.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except (OSError, ValueError, IndexError):
    pass
  return None


def mask_labels(labels: tf.Tensor, ids: tf.Tensor, fraction: float, seed: int) -> tf.Tensor:
  """Keeps the label of a fixed, seeded fraction of the images; the others become -1.

  Whether image `id` keeps its label is a stateless function of (seed, id), so the subset is the
  same at every epoch, on every replica and after a resume.

  Args:
    labels: [b] int64 labels (-1 = unknown).
    ids: [b] int64 sample ids.
    fraction: p in [0, 1].
    seed: the run seed.

  Returns:
    [b] int64 labels.
  """
  if fraction >= 1.0:
    return labels
  # A hash of "seed:id" is a per-image uniform draw that needs no state and no loop.
  keys = tf.strings.join([tf.strings.as_string(tf.cast(seed, tf.int64)), ":",
                          tf.strings.as_string(tf.cast(ids, tf.int64))])
  buckets = 1 << 30
  u = tf.cast(tf.strings.to_hash_bucket_fast(keys, buckets), tf.float64) / buckets
  return tf.where(u < fraction, tf.cast(labels, tf.int64),
                  tf.fill(tf.shape(labels), tf.constant(-1, tf.int64)))


def _set_precision(name: str) -> None:
  policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[name]
  keras.mixed_precision.set_global_policy(policy)


def _check_model_dir(config: config_lib.TrainConfig) -> None:
  """The model_dir must be writable, and a resumed run must have the same model."""
  try:
    rundir.check_writable(config.model_dir)
  except rundir.RunDirError as e:
    raise config_lib.ConfigError(str(e)) from None
  path = os.path.join(config.model_dir, ckpt_lib.CONFIG_FILE)
  if tf.io.gfile.exists(path):
    old = rundir.read_json(path)
    fixed = ("arch", "small_stem", "embedding_dim", "mlp_head", "head_bn", "queue_size",
             "dataset")
    diff = [f"--{k}: {old.get(k)!r} -> {getattr(config, k)!r}" for k in fixed
            if k in old and old[k] != getattr(config, k)]
    if diff and ckpt_lib.list_checkpoints(config.model_dir):
      raise config_lib.ConfigError(
          f"--model_dir {config.model_dir} holds a run with another model ({'; '.join(diff)}). "
          "Resume it with its own settings, or use a new --model_dir.")


class _Progress:
  """One line per update: step/total, ETA, loss, proxy accuracy, lr, images/s."""

  def __init__(self, total: int, start: int, enabled: bool):
    self.total, self.start, self.enabled = total, start, enabled
    self.t0 = time.time()
    self.tty = sys.stdout.isatty()

  def update(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.time() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    width = 24
    filled = int(width * step / max(self.total, 1))
    bar = "=" * filled + "." * (width - filled)
    parts = " ".join(f"{k} {v:.4g}" for k, v in values.items())
    line = f"step {step}/{self.total} [{bar}] ETA {_fmt_time(eta)} {parts}"
    if self.tty:
      sys.stdout.write("\r" + line + " " * 4)
      if step >= self.total:
        sys.stdout.write("\n")
    else:
      sys.stdout.write(line + "\n")
    sys.stdout.flush()

  def newline(self) -> None:
    if self.enabled and self.tty:
      sys.stdout.write("\n")


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _knn_details(result: dict) -> str:
  """The protocol of a kNN monitor result: "k=14, t=0.1, 1497 train / 300 held-out, 6.1 s"."""
  return (f"k={result['k']}, t={result['t']:g}, {result['num_train']} train / "
          f"{result['num_test']} held-out, {result['seconds']:.1f} s")


def sync_to_first_replica(model) -> None:
  """Sets every replica's copy of `model`'s non-trainable variables to the first replica's.

  Under MirroredStrategy and TPUStrategy, Keras' BN moving statistics are mirrored variables
  without aggregation that each replica updates from its own slice of the batch; a cross-replica
  read gives the first replica's value (the one checkpoints and exports hold), and a
  cross-replica assign writes it to every copy. Variables of one device are left alone.
  """
  for weight in model.non_trainable_weights:
    variable = getattr(weight, "value", weight)
    if len(getattr(variable, "values", ())) > 1:
      variable.assign(variable.read_value())


# -------------------------------------------------------------------------------------------------


class Trainer:
  """Builds everything a run needs; `run()` trains to the end (or to a preemption)."""

  def __init__(self, config: config_lib.TrainConfig):
    self.config = config.validate()
    cfg = self.config
    if cfg.arch in models.SMOKE_ARCHS and cfg.export_format != "none":
      raise config_lib.ConfigError(
          f"--arch={cfg.arch} is for tests and smoke runs and has no torchvision counterpart to "
          f"export to; pass --export_format=none (got {cfg.export_format}).")
    # ---- set up
    if cfg.deterministic:
      tf.config.experimental.enable_op_determinism()
    # TF32 (Ampere and later GPUs) rounds float32 matmul/conv inputs to a 10-bit mantissa, the
    # head's q·Qᵀ and MoCHi's top-N included; TensorFlow turns it on by default, PyTorch's
    # matmuls do not (README "Design notes"). A no-op without such a GPU.
    tf.config.experimental.enable_tensor_float_32_execution(cfg.tf32)
    # Weight init seed (checkpoints.random_init_encoder rebuilds the same initial network).
    keras.utils.set_random_seed(ckpt_lib.weight_init_seed(cfg))
    _set_precision(cfg.mixed_precision)
    # ---- data first: a missing data set must fail in seconds, before any device set-up
    self.train_source = data_lib.load(cfg.dataset, "train", data_dir=cfg.data_dir,
                                      seed=cfg.seed,
                                      validate="decode" if cfg.validate_images else "none",
                                      tfrecord_label_offset=cfg.tfrecord_label_offset)
    if cfg.label_mode != "none" and not self.train_source.has_labels:
      raise config_lib.ConfigError(
          f"--label_mode={cfg.label_mode} needs labels, and the data set {cfg.dataset!r} has none. "
          "Use --label_mode=none, or a labelled data set.")
    self.strategy = distribute.make_strategy(cfg.strategy, tpu=cfg.tpu,
                                             cpu_replicas=cfg.cpu_replicas)
    self.num_replicas = self.strategy.num_replicas_in_sync
    try:
      # Resolved after the strategy: "auto" depends on the devices it found (TPU, GPU).
      self.jit_compile = distribute.resolve_jit_compile(cfg.jit_compile, self.strategy)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    self.fast_grad = models.resolve_fast_grad(cfg.fast_grad)
    if cfg.batch_size % self.num_replicas:
      raise config_lib.ConfigError(
          f"--batch_size {cfg.batch_size} (global) must be divisible by the {self.num_replicas} "
          "replicas.")
    per_replica = cfg.batch_size // self.num_replicas
    if cfg.bn_mode == "split" and per_replica % cfg.bn_splits:
      raise config_lib.ConfigError(
          f"--bn_mode=split needs the per-replica batch ({per_replica}) divisible by --bn_splits "
          f"({cfg.bn_splits}).")
    if cfg.bn_mode == "shuffle" and self.num_replicas == 1:
      logging.warning("--bn_mode=shuffle on a single device cannot shuffle BN statistics between "
                      "devices; use --bn_mode=split (MoCo's single-GPU recipe) or sync.")
    self.chief = distribute.is_chief(self.strategy)
    _check_model_dir(cfg)
    self.steps_per_epoch = data_lib.steps_per_epoch(self.train_source.num_examples,
                                                    cfg.batch_size)
    if self.steps_per_epoch < 1:
      raise config_lib.ConfigError(
          f"--batch_size {cfg.batch_size} is larger than the {self.train_source.num_examples} "
          f"training images of {cfg.dataset}; use a smaller batch.")
    self.total_steps = cfg.total_steps(self.steps_per_epoch)
    self.checkpoint_every = cfg.checkpoint_every_steps or self.steps_per_epoch
    self.knn_every = (int(round(cfg.knn_every_epochs * self.steps_per_epoch))
                      if cfg.knn_every_epochs > 0 else 0)

    # ---- model & optimizer (built in scope, before any tf.function traces)
    moco_config = cfg.moco_config(self.steps_per_epoch, self.total_steps)
    lr = schedules.scaled_learning_rate(cfg.learning_rate, cfg.batch_size)
    self.lr_schedule = schedules.WarmupCosine(
        lr, self.total_steps,
        warmup_steps=min(int(round(cfg.lr_warmup_epochs * self.steps_per_epoch)),
                         self.total_steps - 1),
        steps_per_epoch=self.steps_per_epoch if cfg.cosine_per_epoch else None)
    with self.strategy.scope():
      self.moco = moco_lib.MoCo(
          ckpt_lib.build_run_encoder(cfg, "query_encoder", fast_grad=self.fast_grad),
          ckpt_lib.build_run_encoder(cfg, "key_encoder", fast_grad=self.fast_grad), moco_config,
          cfg.batch_size)
      # PyTorch's SGD momentum (MoCo's); the learning rate is read at the trainer's step.
      # Coupled weight decay is added by MoCo.train_step (MoCoConfig.weight_decay).
      self.optimizer = optimizer_lib.SGD(self.moco.query_encoder.trainable_variables,
                                         self.lr_schedule, momentum=0.9)
      # Checkpointed in every precision (so a run may change --mixed_precision on resume); used
      # only with float16.
      self.loss_scale = optimizer_lib.DynamicLossScale(cfg.initial_loss_scale)
      # The one step counter: lr, momentum schedule, MoCHi warm-up, random draws, data position.
      # Skipped steps advance it too (their batch is consumed) and are counted below.
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self.scale_skipped = tf.Variable(0, dtype=tf.int64, trainable=False,
                                       name="loss_scale_skipped_steps",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.checkpoint = tf.train.Checkpoint(
        step=self.step, skipped=self.skipped, scale_skipped=self.scale_skipped,
        query_encoder=self.moco.query_encoder, key_encoder=self.moco.key_encoder,
        queue=self.moco.queue, optimizer=self.optimizer, loss_scale=self.loss_scale)
    directory = ckpt_lib.checkpoint_dir(cfg.model_dir)
    if not self.chief:  # every worker must save (collectives), only the chief's copy is kept
      directory = os.path.join(cfg.model_dir, f"worker_tmp_{self._task_id()}")
    self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                              max_to_keep=cfg.keep_checkpoints)
    self._metric_names = ["loss", "acc1", "acc5", "hardest_negative", "removed_same_class",
                          "finite", "finite_loss", "loss_scale_skip", "momentum"]
    if moco_config.objective.mochi.enabled:
      self._metric_names += ["synthetic_logit", "acc1_queue"]
    self._loop_fn = None
    self.preemption = _Preemption()
    self._last_saved_step = -1
    self._metrics = None  # rundir.MetricsLog of metrics.jsonl (chief only), set by run()

  def _task_id(self) -> int:
    resolver = getattr(self.strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)

  # ---- restore
  def restore(self) -> int:
    newest = ckpt_lib.list_checkpoints(self.config.model_dir)[:1]
    try:
      for path in newest:
        optimizer_lib.check_checkpoint(path)
    except optimizer_lib.LegacyCheckpointError as e:
      raise config_lib.ConfigError(str(e)) from None
    except (tf.errors.OpError, ValueError):
      pass  # unreadable: restore_with_fallback reports it (or falls back to an older one)
    path = ckpt_lib.restore_with_fallback(self.checkpoint, self.config.model_dir)
    step = int(self.step.numpy())
    # Read from the chief's directory by every worker, so every worker skips the same saves.
    self._last_saved_step = step if path else -1
    if path:
      logging.info("Resumed from %s at step %d.", path, step)
      if self.config.verbose:
        print(f"Resumed from {path} (step {step}/{self.total_steps}).", flush=True)
    return step

  # ---- input
  def _dataset(self, start_step: int):
    cfg = self.config

    def input_fn(ctx):
      ds = data_lib.pretrain_dataset(
          self.train_source, global_batch_size=cfg.batch_size, image_size=cfg.image_size,
          seed=cfg.seed, recipe=cfg.augmentation, crop_scale=(cfg.crop_min_scale, 1.0),
          hflip=cfg.hflip,
          input_context=ctx, start_step=start_step,
          deterministic=cfg.deterministic)
      if cfg.labeled_fraction < 1.0:
        # Semi-supervised runs: a fixed, seeded subset keeps its labels (host side, not on TPU).
        ds = ds.map(lambda b: dict(b, label=mask_labels(b["label"], b["id"],
                                                        cfg.labeled_fraction, cfg.seed)))
      return ds

    return self.strategy.distribute_datasets_from_function(input_fn)

  # ---- the compiled loop
  def _replica_step(self, batch):
    return self.moco.train_step(
        batch, self.optimizer, self.step, skip_nonfinite=self.config.nonfinite == "skip",
        loss_scale=self.loss_scale if self.config.mixed_precision == "float16" else None)

  def _make_loop(self):
    names = self._metric_names
    strategy = self.strategy
    replica_step = distribute.replica_step_function(self._replica_step, self.jit_compile, strategy)

    @tf.function
    def loop(iterator, num_steps):
      sums = {k: tf.constant(0.0) for k in names}
      first_bad = tf.constant(-1, tf.int64)
      bad_loss = tf.constant(False)
      for _ in tf.range(num_steps):
        batch = next(iterator)
        per_replica = strategy.run(replica_step, args=(batch,))
        metrics = {k: strategy.reduce("SUM", per_replica[k], axis=None) for k in names}
        finite = metrics["finite"] > 0.999
        if self.config.nonfinite == "skip":
          self.skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        self.scale_skipped.assign_add(tf.cast(metrics["loss_scale_skip"] > 0.5, tf.int64))
        is_first = tf.logical_and(first_bad < 0, tf.logical_not(finite))
        bad_loss = tf.where(is_first, metrics["finite_loss"] < 0.999, bad_loss)
        first_bad = tf.where(is_first, self.step, first_bad)
        self.step.assign_add(1)
        sums = {k: sums[k] + tf.where(tf.math.is_finite(metrics[k]), metrics[k], 0.0)
                for k in names}
      means = {k: v / tf.cast(num_steps, tf.float32) for k, v in sums.items()}
      means["first_nonfinite_step"] = first_bad
      means["nonfinite_loss"] = bad_loss
      return means

    return loop

  # ---- evaluation
  _knn_test_source = None  # the held-out split, loaded at the monitor's first use

  def _knn_sources(self):
    """(train, held-out) sources of the kNN monitor, or None when it cannot run."""
    cfg = self.config
    if self._knn_test_source is None:
      try:
        self._knn_test_source = data_lib.load(cfg.dataset, "test", data_dir=cfg.data_dir,
            seed=cfg.seed, tfrecord_label_offset=cfg.tfrecord_label_offset)
      except data_lib.DataError as e:
        logging.warning("kNN monitor skipped: %s", e)
        return None
    if not (self.train_source.has_labels and self._knn_test_source.has_labels):
      return None
    return self.train_source, self._knn_test_source

  def knn_monitor_cost(self) -> dict | None:
    """Images per monitor pass and its estimated cost as a share of an epoch (None: no monitor).

    Estimate: a forward pass of one view costs about 1/3 of a training step per image (the
    query's forward + backward is about three forwards); the key encoder's forward is left out
    of the step, so the share is an upper bound. In seconds: images / (3 x training images/s).
    """
    sources = self._knn_sources()
    if sources is None:
      return None
    cfg = self.config
    # The subsets the monitor will use (exact for in-memory sources, an upper bound for streams).
    train, test = (int(eval_lib.class_balanced_subset(source, per_class, cfg.seed).num_examples)
                   for source, per_class in zip(sources, (cfg.knn_train_per_class,
                                                          cfg.knn_test_per_class)))
    return {"train_images": train, "test_images": test, "images": train + test,
            "epoch_fraction": (train + test) / (3.0 * self.train_source.num_examples)}

  def knn_eval(self, raw_pixels: bool | None = False) -> dict | None:
    """Weighted kNN on the held-out split with the query backbone's pooled features.

    The bank and the queries are the class-balanced subsets of --knn_train_per_class and
    --knn_test_per_class (whole splits by default), and the forward passes run over the
    strategy's replicas (one device per worker under multi_worker, whose workers cannot gather
    each other's features). `raw_pixels`: see `evaluate.knn_eval`.
    """
    cfg = self.config
    sources = self._knn_sources()
    if sources is None:
      return None
    strategy = None if cfg.strategy == "multi_worker" else self.strategy
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    batch_size = -(-max(64, cfg.batch_size) // replicas) * replicas
    if strategy is not None:
      # Keras' BN moving statistics are mirrored variables without aggregation: each replica's
      # copy follows its own slice of the batch, and checkpoints and exports hold the first
      # replica's. Copying those to every replica makes the monitor (inference mode, so it uses
      # the moving statistics) measure the checkpointed network. Training never reads the moving
      # statistics, so the copy changes nothing else.
      sync_to_first_replica(self.moco.query_encoder)
    return eval_lib.knn_eval(self.moco.query_encoder, *sources, image_size=cfg.image_size,
                             k=cfg.knn_k, t=cfg.knn_t, batch_size=batch_size, strategy=strategy,
                             train_per_class=cfg.knn_train_per_class,
                             test_per_class=cfg.knn_test_per_class, seed=cfg.seed,
                             raw_pixels=raw_pixels)

  # ---- checkpoints and preemption
  def _save(self, step: int) -> None:
    """Checkpoints `step` unless it was the last one saved (every worker decides alike)."""
    if step != self._last_saved_step:
      self.manager.save(checkpoint_number=step)
      self._last_saved_step = step
    if self._metrics is not None:
      self._metrics.flush()  # object stores: metrics.jsonl up to this checkpoint (rundir rule 4)

  def _make_preemption_handler(self):
    """tf.distribute's PreemptionCheckpointHandler for multi_worker and tpu runs, else None.

    How it is wired, and why:
    * `termination_watcher_fn` is this process's SIGTERM/SIGINT flag. The handler polls it once a
      second; on the worker that got the signal it publishes "checkpoint after run call R+1" through
      the coordination service, waits until every worker has acknowledged, and then every worker
      checkpoints after the same number of `run` calls. Each call is one block of the loop below
      (`steps_per_loop` steps, the same blocks on every worker), so all checkpoint the same step.
      Without a watcher function the handler would install its own SIGTERM handler (main thread
      only) and ignore SIGINT.
    * `save_fn` saves with this trainer's CheckpointManager (chief: checkpoints/, other workers:
      worker_tmp_<i>), so the preemption checkpoint is an ordinary one: same layout, same
      `keep_checkpoints`, and the step it holds is also the data position of the resume.
    * The manager handed to the constructor is a stand-in over an empty Checkpoint whose directory
      never holds checkpoints. At construction the handler restores "the latest checkpoint" of that
      manager and attaches a `checkpointed_runs` variable to its Checkpoint. Given ours it would
      restore the newest checkpoint without our fallback to an older one when the newest is
      unreadable, read worker_tmp_<i> instead of the chief's checkpoints on the other workers, and
      add a variable that checkpoints of a run started on one device lack. Its run counter starts
      at 0 in every process, which is all it needs: the workers of one job count the same calls.
    * `grace_period=0`: checkpoint at the next loop boundary and stop, without training on through
      a grace window.
    * `exit_fn` raises `_ClusterPreempted` (instead of the default `sys.exit(42)`), so `run()`
      returns as after a single-device SIGTERM and the command exits 0 with the resume message.

    Platforms: on Linux hosts outside Google Cloud (and in tests) the handler works as above. On
    Google Cloud CPU and TPU VMs TensorFlow turns the handler into a no-op (it logs "does not
    support usage with TPU or CPU device on GCP"); there a TPU run still stops through the local
    flag (one client process drives every TPU host), while a CPU multi-worker run relies on
    periodic checkpoints. TPU runs call `save_checkpoint_if_preempted` at each loop boundary, which
    on Borg-managed TPUs checkpoints on the platform's preemption notice.
    """
    cfg = self.config
    if cfg.strategy not in ("multi_worker", "tpu"):
      return None

    def save_fn():
      step = int(self.step.numpy())
      self._save(step)
      self.preemption.cluster_step = step

    def exit_fn():
      raise _ClusterPreempted()

    termination = tf.distribute.experimental.TerminationConfig(
        termination_watcher_fn=lambda: self.preemption.requested, exit_fn=exit_fn,
        grace_period=0, save_fn=save_fn)
    stand_in = tf.train.CheckpointManager(
        tf.train.Checkpoint(), os.path.join(cfg.model_dir, "preemption_handler_unused"),
        max_to_keep=1)
    return _PreemptionHandler(self.strategy.cluster_resolver, stand_in,
                              termination_config=termination)

  @staticmethod
  def _close_preemption_handler(handler) -> None:
    """Stops the handler's watcher threads after a normal end of training.

    They are daemon threads blocked on the coordination service; left alone they would wake up with
    an error while the process exits. The handler's documented clean-up is its `__del__`, which
    never runs while those threads still reference it.
    """
    if handler is not None:
      handler.__del__()

  # ---- the run
  def _install_signal_handlers(self):
    def handler(signum, _frame):
      self.preemption.requested = True
      self.preemption.signal_name = signal.Signals(signum).name

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        previous[sig] = signal.signal(sig, handler)
      except ValueError:  # not in the main thread
        pass
    return previous

  def run(self) -> dict:
    cfg = self.config
    start_step = self.restore()
    if self.chief:
      self._metrics = rundir.MetricsLog(os.path.join(cfg.model_dir, ckpt_lib.METRICS_FILE),
                                        start_step)
      # The flags as given, plus what "auto" resolved to on this machine.
      rundir.write_json(os.path.join(cfg.model_dir, ckpt_lib.CONFIG_FILE),
                                 dict(dataclasses.asdict(cfg), resolved={
                                     "jit_compile": self.jit_compile,
                                     "fast_grad": self.fast_grad}))
    writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "train")) \
        if self.chief else tf.summary.create_noop_writer()
    random_init_path = os.path.join(cfg.model_dir, ckpt_lib.KNN_RANDOM_INIT_FILE)
    knn_random = None
    wants_knn = cfg.knn_eval and self.train_source.has_labels
    knn_cost = self.knn_monitor_cost() if wants_knn or self.knn_every else None
    if knn_cost is not None and cfg.verbose and self.chief:
      print(f"kNN monitor: {knn_cost['images']:,} images per pass ({knn_cost['train_images']:,} "
            f"train, {knn_cost['test_images']:,} held out), about "
            f"{100 * knn_cost['epoch_fraction']:.2g}% of an epoch each (a forward pass of one "
            "view ~ 1/3 of a training step per image); seconds per pass follow once the step's "
            "speed is measured. Bound it with --knn_train_per_class/--knn_test_per_class.",
            flush=True)
    if wants_knn and start_step == 0:
      knn_random = self.knn_eval(raw_pixels=None)
      if knn_random is not None and self.chief:
        rundir.write_json(random_init_path, knn_random)
        if cfg.verbose:
          print(f"kNN top-1 at random init: {knn_random['top1']:.2f}%"
                f"{eval_lib.baselines_text(knn_random, _knn_details(knn_random))}", flush=True)
    elif tf.io.gfile.exists(random_init_path):
      knn_random = rundir.read_json(random_init_path)

    previous_handlers = self._install_signal_handlers()
    preemption_handler = self._make_preemption_handler()
    # Under MultiWorkerMirroredStrategy only the handler may stop the loop (all workers at once).
    stop_locally = cfg.strategy != "multi_worker"
    loop = self._make_loop()
    iterator = iter(self._dataset(start_step))
    progress = _Progress(self.total_steps, start_step, cfg.verbose and self.chief)
    step = start_step
    last = {}
    knn_result = None
    t_start = time.time()
    images_seen = 0
    train_seconds = 0.0
    cluster_failure = None
    try:
      while step < self.total_steps and not (stop_locally and self.preemption.requested):
        boundaries = [self.total_steps, (step // self.checkpoint_every + 1) * self.checkpoint_every,
                      step + cfg.steps_per_loop]
        if self.knn_every:
          boundaries.append((step // self.knn_every + 1) * self.knn_every)
        n = min(boundaries) - step
        t0 = time.time()
        if preemption_handler is not None and cfg.strategy == "multi_worker":
          # Checkpoints and raises _ClusterPreempted first if a worker has been preempted.
          out = preemption_handler.run(loop, iterator, tf.constant(n, tf.int32))
        else:
          out = loop(iterator, tf.constant(n, tf.int32))
        out = {k: v.numpy() for k, v in out.items()}
        dt = time.time() - t0
        step += n
        train_seconds += dt
        images_seen += n * cfg.batch_size
        bad = int(out.pop("first_nonfinite_step"))
        what = "loss" if out.pop("nonfinite_loss") else "gradient"
        if bad >= 0 and cfg.nonfinite == "stop":
          kept = ckpt_lib.list_checkpoints(cfg.model_dir)
          raise TrainingError(
              f"The {what} became non-finite (NaN or inf) at step {bad}. Training stopped; the "
              f"last good checkpoint is kept ({kept[0] if kept else 'none was written yet'}). "
              "Lower --learning_rate, raise --temperature, check the input data, or pass "
              "--nonfinite=skip to skip such steps.")
        lr = float(self.lr_schedule(step - 1))  # what the last step used (same counter)
        ips = n * cfg.batch_size / max(dt, 1e-9)
        last = dict(out, lr=lr, images_per_sec=ips)
        counts = self._skip_counts()
        with writer.as_default(step=step):
          for k, v in {**last, **counts}.items():
            tf.summary.scalar(f"proxy_{k}" if k.startswith("acc") else k, v)
        shown = {"loss": out["loss"], "acc1": 100 * out["acc1"], "lr": lr, "img/s": ips}
        if cfg.nonfinite == "skip":
          shown["skipped"] = counts["skipped_steps"]
        if cfg.mixed_precision == "float16":
          shown["scale_skips"] = counts["loss_scale_skipped_steps"]
        progress.update(step, shown)
        if self.chief:
          self._log_metrics(dict(step=step, **{k: float(v) for k, v in last.items()}, **counts,
                                 rss_mb=resident_memory_mb()))
        if step % self.checkpoint_every == 0 or step >= self.total_steps \
            or (stop_locally and self.preemption.requested):
          self._save(step)
        if preemption_handler is not None and cfg.strategy == "tpu":
          preemption_handler.save_checkpoint_if_preempted()
        if knn_cost is not None and step - start_step > 2 * cfg.steps_per_loop \
            and "seconds" not in knn_cost:
          # The first blocks include tracing and warm-up; from the third the speed is the step's.
          knn_cost["seconds"] = knn_cost["images"] / (3.0 * ips)
          if cfg.verbose and self.chief:
            progress.newline()
            print(f"kNN monitor: about {knn_cost['seconds']:.0f} s per pass at {ips:.0f} "
                  "training images/s.", flush=True)
        if self.knn_every and (step % self.knn_every == 0) and step < self.total_steps:
          knn_result = self.knn_eval()
          if knn_result is not None:
            with writer.as_default(step=step):
              tf.summary.scalar("knn_top1", knn_result["top1"])
              tf.summary.scalar("knn_top5", knn_result["top5"])
              tf.summary.scalar("knn_k", knn_result["k"])
            progress.newline()
            if cfg.verbose and self.chief:
              print(f"kNN top-1 {knn_result['top1']:.2f}% top-5 {knn_result['top5']:.2f}% at "
                    f"step {step} ({_knn_details(knn_result)})", flush=True)
    except _ClusterPreempted:
      pass  # every worker has checkpointed at the agreed step (preemption.cluster_step)
    except _CLUSTER_ERRORS as e:
      if cfg.strategy != "multi_worker":
        raise
      cluster_failure = e
    finally:
      for sig, h in previous_handlers.items():
        signal.signal(sig, h)
      writer.flush()
      if self._metrics is not None:
        self._metrics.flush()  # object stores: also the records of a failed run, up to its end

    if cluster_failure is not None:
      # A peer died without notice: no handler call can checkpoint any more (that needs every
      # worker), and the handler's threads may be blocked on the lost peer, so they are left alone.
      kept = ckpt_lib.list_checkpoints(cfg.model_dir)
      raise TrainingError(
          f"Worker {self._task_id()} lost contact with the rest of the cluster after step {step} "
          f"({_cluster_error_reason(cluster_failure)}). A multi-worker job cannot go on with a "
          "worker missing. Restart every worker with the same command: training resumes from the "
          f"last checkpoint ({kept[0] if kept else 'none was written yet: it starts over'}).")

    if self.preemption.cluster_step is not None:
      step = self.preemption.cluster_step
      who = (f"Received {self.preemption.signal_name}" if self.preemption.requested
             else "Another worker of the cluster was preempted")
      return self._stopped(f"{who}: every worker checkpointed at step {step} and stopped. "
                           "Run the same command on every worker to resume.", step)
    if stop_locally and self.preemption.requested and step < self.total_steps:
      self._save(step)
      return self._stopped(f"Received {self.preemption.signal_name}: checkpointed at step {step} "
                           "and stopped. Run the same command to resume.", step)

    # ---- end of training: final kNN, export, summary
    self._close_preemption_handler(preemption_handler)
    self._save(step)
    if wants_knn:
      # The raw-pixel baseline comes with the random-init pass; a run that started without the
      # monitor gets it here.
      knn_result = self.knn_eval(raw_pixels=None if not knn_random or (
          "raw_pixels_top1" not in knn_random) else False)
    raw_pixels = next((r["raw_pixels_top1"] for r in (knn_random, knn_result)
                       if r and "raw_pixels_top1" in r), None)
    export_path = None
    if cfg.export_format != "none" and self.chief:
      export_path = self._export()
    summary = {
        "global_step": step,
        "final_loss": float(last.get("loss", float("nan"))),
        "final_proxy_acc1": float(100 * last.get("acc1", float("nan"))),
        "images_per_sec": float(images_seen / train_seconds) if train_seconds else None,
        "wall_seconds": float(time.time() - t_start),
        "knn_top1": knn_result["top1"] if knn_result else None,
        "knn_top5": knn_result["top5"] if knn_result else None,
        "knn_top1_random_init": knn_random["top1"] if knn_random else None,
        "knn_top1_raw_pixels": raw_pixels,
        "knn_k": knn_result["k"] if knn_result else None,
        "knn_t": cfg.knn_t,
        "knn_num_train": knn_result["num_train"] if knn_result else None,
        "knn_num_test": knn_result["num_test"] if knn_result else None,
        "knn_seconds": knn_result["seconds"] if knn_result else None,
        **self._skip_counts(),
        "skipped_images": self.train_source.skipped_while_reading,
        "export": export_path,
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "replicas": self.num_replicas,
    }
    if self.chief:
      rundir.write_json(os.path.join(cfg.model_dir, "summary.json"), summary)
      with writer.as_default(step=step):
        if knn_result:
          tf.summary.scalar("knn_top1", knn_result["top1"])
          tf.summary.scalar("knn_k", knn_result["k"])
      writer.flush()
    if cfg.verbose and self.chief:
      if knn_result:
        baselines = dict(knn_result, random_init_top1=knn_random["top1"] if knn_random else None,
                         raw_pixels_top1=raw_pixels)
        print(f"Final kNN top-1 on the held-out split: {knn_result['top1']:.2f}%"
              f"{eval_lib.baselines_text(baselines, _knn_details(knn_result))}", flush=True)
      print(f"Summary: {os.path.join(cfg.model_dir, 'summary.json')}", flush=True)
      if self.train_source.has_labels:
        print(f"Linear probe: python -m tfmochi.evaluate --model_dir={cfg.model_dir} "
              "--mode=linear (add --random_init for the baseline)", flush=True)
    return summary

  def _skip_counts(self) -> dict:
    """Steps that did not update the model so far (README "Design notes": one step counter).

    skipped_steps: non-finite loss or gradient under --nonfinite=skip; loss_scale_skipped_steps:
    float16 loss-scale overflows (expected, a few per run); loss_scale: the current scale.
    """
    counts = {"skipped_steps": int(self.skipped.numpy()),
              "loss_scale_skipped_steps": int(self.scale_skipped.numpy())}
    if self.config.mixed_precision == "float16":
      counts["loss_scale"] = float(self.loss_scale.scale.numpy())
    return counts

  def _stopped(self, message: str, step: int) -> dict:
    logging.warning(message)
    if self.config.verbose:
      print(message, flush=True)
    return {"preempted": True, "global_step": step}

  def _log_metrics(self, record: dict) -> None:
    """One JSON line per loop in <model_dir>/metrics.jsonl (what TensorBoard shows, in a form
    scripts and tests can read; a resumed run continues it). Appended on local disks; on object
    stores rewritten whole at each checkpoint (rundir rule 4)."""
    self._metrics.append(record)

  def _export(self) -> str | None:
    try:
      from tfmochi import export as export_lib
    except ImportError:
      logging.warning("tfmochi.export is not available; skipping the export.")
      return None
    out = os.path.join(self.config.model_dir, "export", self.config.export_format)
    export_lib.export_backbone(self.moco.query_encoder.backbone, out,
                               fmt=self.config.export_format, image_size=self.config.image_size,
                               overwrite=True, arch=self.config.arch,
                               small_stem=self.config.small_stem)
    if self.config.verbose:
      print(f"Exported the backbone ({self.config.export_format}) to {out}", flush=True)
    return out


def train(config: config_lib.TrainConfig) -> dict:
  """Runs a pretraining job to its end (or to a preemption) and returns its summary."""
  return Trainer(config).run()
