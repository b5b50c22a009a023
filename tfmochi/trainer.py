"""The pretraining loop: set up, restore, a short loop that calls hooks, export, summary.

`train(config)` runs a whole pretraining job from a `TrainConfig` (no flags involved) and returns
the summary it also writes to `<model_dir>/summary.json`. `Trainer.__init__` sets up the numerics,
the data, the strategy, the run directory (`rundir.RunDir`) and the model (`build.TrainState`);
`Trainer.run` restores the newest checkpoint, then runs blocks of steps (several steps per
tf.function call) and after each block the hooks of `tfmochi.hooks` (non-finite handling,
progress, TensorBoard and metrics.jsonl, checkpoints, preemption, kNN monitor), and ends with the
final kNN pass, the export and the summary.

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
import time

from absl import logging
import keras
import tensorflow as tf

from tfmochi import augment
from tfmochi import build
from tfmochi import config as config_lib
from tfmochi import data as data_lib
from tfmochi import distribute
from tfmochi import evaluate as eval_lib
from tfmochi import hooks as hooks_lib
from tfmochi import hostcpu
from tfmochi import idhash
from tfmochi import models
from tfmochi import optimizer as optimizer_lib
from tfmochi import queue as queue_lib
from tfmochi import rundir
from tfmochi import runfiles
from tfmochi import schedules

TrainingError = hooks_lib.TrainingError

# Settings that make a different model: a run resumed with other values is refused.
_FIXED_SETTINGS = ("arch", "small_stem", "embedding_dim", "mlp_head", "head_bn", "queue_size",
                   "dataset")


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
  return tf.where(idhash.id_uniform(ids, seed) < fraction, tf.cast(labels, tf.int64),
                  tf.fill(tf.shape(labels), tf.constant(-1, tf.int64)))


def _check_model_dir(config: config_lib.TrainConfig, run_dir: rundir.RunDir) -> None:
  """The model_dir must be writable, and a resumed run must have the same model."""
  try:
    run_dir.check_writable()
  except rundir.RunDirError as e:
    raise config_lib.ConfigError(str(e)) from None
  old = run_dir.read(runfiles.CONFIG_FILE) or {}
  diff = [f"--{k}: {old.get(k)!r} -> {getattr(config, k)!r}" for k in _FIXED_SETTINGS
          if k in old and old[k] != getattr(config, k)]
  if diff and run_dir.list_checkpoints():
    raise config_lib.ConfigError(
        f"--model_dir {config.model_dir} holds a run with another model ({'; '.join(diff)}). "
        "Resume it with its own settings, or use a new --model_dir.")


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

  def __init__(self, config: config_lib.TrainConfig, hooks: tuple[hooks_lib.Hook, ...] = ()):
    """`hooks` act after every block of steps, after the trainer's own (progress, metrics.jsonl,
    checkpoints, preemption, the kNN monitor): a caller's way to watch or stop a run."""
    self.config = cfg = config.validate()
    self.extra_hooks = tuple(hooks)
    if cfg.arch in models.SMOKE_ARCHS and cfg.export_format in ("detectron2", "torchvision"):
      # Refused before training rather than after it (tfmochi.export.check_arch_format).
      raise config_lib.ConfigError(
          f"--arch={cfg.arch} is a small network with no torchvision counterpart, so it has no "
          f"{cfg.export_format} weight file; pass --export_format=saved_model, hub, keras or "
          "none.")
    if cfg.deterministic:
      tf.config.experimental.enable_op_determinism()
    # The weight init seed: checkpoints.random_init_encoder rebuilds the same initial network.
    keras.utils.set_random_seed(build.weight_init_seed(cfg))
    build.set_precision(cfg.mixed_precision, cfg.tf32)
    # Data first: a missing data set must fail in seconds, before any device set-up.
    self.train_source = data_lib.load(cfg.dataset, "train", data_dir=cfg.data_dir,
                                      seed=cfg.held_out_seed,
                                      validate="decode" if cfg.validate_images else "none",
                                      tfrecord_label_offset=cfg.tfrecord_label_offset)
    label_mode = cfg.moco.objective.label_mode
    if label_mode != "none" and not self.train_source.has_labels:
      raise config_lib.ConfigError(
          f"--label_mode={label_mode} needs labels, and the data set {cfg.dataset!r} has none. "
          "Use --label_mode=none, or a labelled data set.")
    self._set_up_devices()
    self.run_dir = rundir.RunDir(cfg.model_dir)
    _check_model_dir(cfg, self.run_dir)
    self._plan_steps()
    moco_config = cfg.moco_for_run(self.steps_per_epoch, self.total_steps,
                                   device_augment=self.device_augment)
    # Built in the strategy's scope, before any tf.function traces.
    self.state = build.build_train_state(cfg, self.strategy, moco_config, self.lr_schedule,
                                         self.fast_grad)
    self.moco, self.optimizer, self.loss_scale = (self.state.moco, self.state.optimizer,
                                                  self.state.loss_scale)
    self.step, self.skipped, self.scale_skipped = (self.state.step, self.state.skipped,
                                                   self.state.scale_skipped)
    self.checkpoint = self.state.checkpoint()
    self.preemption = hooks_lib.PreemptionHook(cfg.strategy)
    self.checkpointing = hooks_lib.CheckpointHook(
        self.run_dir.checkpoint_manager(self.checkpoint, cfg.keep_checkpoints,
                                        worker=None if self.chief else self._task_id()),
        self.checkpoint_every, self.total_steps, self.preemption.stop_requested)
    self._metric_names = ["loss", "acc1", "acc5", "hardest_negative", "removed_same_class",
                          "finite", "finite_loss", "loss_scale_skip", "momentum"]
    if moco_config.objective.mochi.enabled:
      self._metric_names += ["synthetic_logit", "acc1_queue"]
    self._metrics = None  # rundir.MetricsLog of metrics.jsonl (chief only), set by run()

  def _set_up_devices(self) -> None:
    """The strategy, its replicas, the resolved --jit_compile/--fast_grad/--device_augment, the
    batch split."""
    cfg = self.config
    self.strategy = distribute.make_strategy(cfg.strategy, tpu=cfg.tpu,
                                             cpu_replicas=cfg.cpu_replicas)
    self.num_replicas = self.strategy.num_replicas_in_sync
    try:
      # Resolved after the strategy: "auto" depends on the devices it found (TPU, GPU).
      self.jit_compile = distribute.resolve_jit_compile(cfg.jit_compile, self.strategy)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    self.fast_grad = models.resolve_fast_grad(cfg.fast_grad)
    self.device_augment = augment.resolve_device_augment(cfg.device_augment)
    # --tf32 on these devices: on a TPU it sets the XLA precision of float32 products.
    device = build.training_device(self.strategy)
    self.float32_matmuls = build.float32_matmuls(cfg.tf32, cfg.mixed_precision, *device)
    build.warn_emulated_bfloat16(cfg.mixed_precision, device[0], hostcpu.has_bfloat16_units())
    if cfg.batch_size % self.num_replicas:
      raise config_lib.ConfigError(
          f"--batch_size {cfg.batch_size} (global) must be divisible by the {self.num_replicas} "
          "replicas.")
    per_replica = cfg.batch_size // self.num_replicas
    if cfg.moco.bn_mode == "split" and per_replica % cfg.bn_splits:
      raise config_lib.ConfigError(
          f"--bn_mode=split needs the per-replica batch ({per_replica}) divisible by --bn_splits "
          f"({cfg.bn_splits}).")
    if cfg.moco.bn_mode == "shuffle" and self.num_replicas == 1:
      logging.warning("--bn_mode=shuffle on a single device cannot shuffle BN statistics between "
                      "devices; use --bn_mode=split (MoCo's single-GPU recipe) or sync.")
    self.chief = distribute.is_chief(self.strategy)

  def _plan_steps(self) -> None:
    """Steps per epoch, total steps, checkpoint and kNN intervals, the learning-rate schedule."""
    cfg = self.config
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
    self.lr_schedule = schedules.WarmupCosine(
        schedules.scaled_learning_rate(cfg.learning_rate, cfg.batch_size), self.total_steps,
        warmup_steps=min(int(round(cfg.lr_warmup_epochs * self.steps_per_epoch)),
                         self.total_steps - 1),
        steps_per_epoch=self.steps_per_epoch if cfg.cosine_per_epoch else None)

  def _task_id(self) -> int:
    resolver = getattr(self.strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)

  # ---- restore
  def restore(self) -> int:
    """Restores the newest readable checkpoint (if any); returns the step to start from."""
    paths = self.run_dir.list_checkpoints()
    try:
      for path in paths[:1]:
        optimizer_lib.check_checkpoint(path)
    except optimizer_lib.LegacyCheckpointError as e:
      raise config_lib.ConfigError(str(e)) from None
    except (tf.errors.OpError, ValueError):
      pass  # unreadable: RunDir.restore reports it (or falls back to an older one)
    path = self.run_dir.restore(self.checkpoint, paths=paths)
    step = int(self.step.numpy())
    # Read from the chief's directory by every worker, so every worker skips the same saves.
    self.checkpointing.last_saved_step = step if path else -1
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
          hflip=cfg.hflip, device_augment=self.device_augment,
          input_context=ctx, start_step=start_step,
          deterministic=cfg.deterministic)
      if cfg.labeled_fraction < 1.0:
        # Semi-supervised runs: a fixed, seeded subset keeps its labels (host side, not on TPU).
        ds = ds.map(lambda b: dict(b, label=mask_labels(b["label"], b["id"],
                                                        cfg.labeled_fraction, cfg.seed)))
      # Ids and labels reach the device as int32 (folded on the host: `queue.device_ids`), so the
      # step holds no 64-bit integer a TPU would have to emulate.
      return ds.map(lambda b: dict(b, id=queue_lib.device_ids(b["id"]),
                                   label=queue_lib.device_ids(b["label"])))

    return self.strategy.distribute_datasets_from_function(input_fn)

  # ---- the compiled loop
  def _replica_step(self, batch):
    return self.state.replica_step(batch)

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
            seed=cfg.held_out_seed, tfrecord_label_offset=cfg.tfrecord_label_offset)
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
    train, test = (int(data_lib.class_balanced_subset(source, per_class, cfg.seed).num_examples)
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

  # ---- the run
  def run(self) -> dict:
    cfg = self.config
    start_step = self.restore()
    writer = self.run_dir.summary_writer("train", enabled=self.chief)
    if self.chief:
      self._metrics = self.run_dir.metrics_log(start_step)
      self.checkpointing.metrics = self._metrics
      # The flags as given, plus what "auto" resolved to on this machine.
      self.run_dir.write(runfiles.CONFIG_FILE, dict(cfg.to_dict(), resolved={
          "jit_compile": self.jit_compile, "fast_grad": self.fast_grad,
          "float32_matmuls": self.float32_matmuls, "device_augment": self.device_augment}))
    progress = hooks_lib.ProgressHook(self.total_steps, start_step, cfg.verbose and self.chief,
                                      show_skipped=cfg.nonfinite == "skip",
                                      show_scale_skips=cfg.mixed_precision == "float16")
    self.metrics = hooks_lib.MetricsHook(writer, self._metrics.append if self.chief else None)
    self.knn_monitor = hooks_lib.KnnMonitorHook(
        self.knn_eval, self.knn_monitor_cost, final=cfg.knn_eval and self.train_source.has_labels,
        every=self.knn_every, total=self.total_steps, run_dir=self.run_dir, chief=self.chief,
        writer=writer, progress=progress, verbose=cfg.verbose)
    self.knn_monitor.before_training(start_step)
    hooks = [hooks_lib.NonFiniteHook(cfg.nonfinite, self.run_dir.list_checkpoints), progress,
             self.metrics, self.checkpointing, self.preemption, self.knn_monitor,
             *self.extra_hooks]
    step = self._train(start_step, hooks, writer)
    stopped = self._stop_after_preemption(step)
    return stopped if stopped is not None else self._finish(step, writer)

  def _train(self, start_step: int, hooks: list[hooks_lib.Hook], writer) -> int:
    """Blocks of steps up to the last step or a stop; the hooks act after each block.

    Returns:
      The step reached.

    Raises:
      TrainingError: a non-finite step (--nonfinite=stop), a lost multi-worker peer.
    """
    cfg = self.config
    self.preemption.start(self._make_preemption_handler)
    loop, iterator = self._make_loop(), iter(self._dataset(start_step))
    for hook in hooks:
      hook.begin()
    step = start_step
    try:
      while step < self.total_steps and not self.preemption.stop_requested():
        ends = [self.total_steps, step + cfg.steps_per_loop] + [h.boundary(step) for h in hooks]
        n = min(end for end in ends if end is not None) - step
        t0 = time.time()
        out = self.preemption.run(loop, iterator, tf.constant(n, tf.int32))
        out = {k: v.numpy() for k, v in out.items()}
        seconds = time.time() - t0
        step += n
        block = hooks_lib.Block(
            step=step, steps=n, seconds=seconds, lr=float(self.lr_schedule(step - 1)),
            first_nonfinite_step=int(out.pop("first_nonfinite_step")),
            nonfinite_loss=bool(out.pop("nonfinite_loss")), metrics=out,
            counts=self._skip_counts(), batch_size=cfg.batch_size)
        for hook in hooks:
          hook.after_block(block)
    except hooks_lib.ClusterPreempted:
      pass  # every worker has checkpointed at the agreed step (preemption.cluster_step)
    except hooks_lib.CLUSTER_ERRORS as e:
      if cfg.strategy != "multi_worker":
        raise
      self._lost_peer(step, e)
    finally:
      self.preemption.restore_signals()
      writer.flush()
      if self._metrics is not None:
        self._metrics.flush()  # object stores: also the records of a failed run, up to its end
    return step

  def _lost_peer(self, step: int, error: tf.errors.OpError) -> None:
    """A peer died without notice: no handler call can checkpoint any more (that needs every
    worker), and the handler's threads may be blocked on the lost peer, so they are left alone."""
    kept = self.run_dir.list_checkpoints()
    raise TrainingError(
        f"Worker {self._task_id()} lost contact with the rest of the cluster after step {step} "
        f"({hooks_lib.cluster_error_reason(error)}). A multi-worker job cannot go on with a "
        "worker missing. Restart every worker with the same command: training resumes from the "
        f"last checkpoint ({kept[0] if kept else 'none was written yet: it starts over'}).") \
        from None

  def _stop_after_preemption(self, step: int) -> dict | None:
    """The result of a run stopped by a signal (checkpointed), or None if it was not."""
    preemption = self.preemption
    if preemption.cluster_step is not None:
      who = (f"Received {preemption.signal_name}" if preemption.requested
             else "Another worker of the cluster was preempted")
      return self._stopped(f"{who}: every worker checkpointed at step {preemption.cluster_step} "
                           "and stopped. Run the same command on every worker to resume.",
                           preemption.cluster_step)
    if preemption.stop_requested() and step < self.total_steps:
      self.checkpointing.save(step)
      return self._stopped(f"Received {preemption.signal_name}: checkpointed at step {step} "
                           "and stopped. Run the same command to resume.", step)
    return None

  def _finish(self, step: int, writer) -> dict:
    """End of training: the last checkpoint, the final kNN pass, the export and the summary."""
    cfg = self.config
    self.preemption.close()
    self.checkpointing.save(step)
    self.knn_monitor.end()
    export_path = self._export() if cfg.export_format != "none" and self.chief else None
    summary = self._summary(step, export_path)
    knn = self.knn_monitor.result
    if self.chief:
      self.run_dir.write(runfiles.SUMMARY_FILE, summary)
      with writer.as_default(step=step):
        if knn:
          tf.summary.scalar("knn_top1", knn["top1"])
          tf.summary.scalar("knn_k", knn["k"])
      writer.flush()
    if cfg.verbose and self.chief:
      self.knn_monitor.report()
      print(f"Summary: {self.run_dir.join(runfiles.SUMMARY_FILE)}", flush=True)
      if self.train_source.has_labels:
        print(f"Linear probe: python -m tfmochi.evaluate --model_dir={cfg.model_dir} "
              "--mode=linear (add --random_init for the baseline)", flush=True)
    return summary

  def _summary(self, step: int, export_path: str | None) -> dict:
    """summary.json: the run's end state, speed, kNN results and baselines."""
    cfg, last = self.config, self.metrics.last
    knn, random = self.knn_monitor.result, self.knn_monitor.random
    stored = self.knn_monitor.raw_pixels_stored
    return {
        "global_step": step,
        "final_loss": float(last.get("loss", float("nan"))),
        "final_proxy_acc1": float(100 * last.get("acc1", float("nan"))),
        "images_per_sec": self.metrics.images_per_sec,
        "wall_seconds": self.metrics.wall_seconds,
        "knn_top1": knn["top1"] if knn else None,
        "knn_top5": knn["top5"] if knn else None,
        "knn_top1_random_init": random["top1"] if random else None,
        "knn_top1_raw_pixels": self.knn_monitor.raw_pixels_top1,
        # The same kNN on the data set's stored pixels when their size differs from the views'.
        "knn_top1_raw_pixels_stored": stored.get("raw_pixels_stored_top1"),
        "raw_pixels_stored_size": stored.get("raw_pixels_stored_size"),
        "knn_k": knn["k"] if knn else None,
        "knn_t": cfg.knn_t,
        "knn_num_train": knn["num_train"] if knn else None,
        "knn_num_test": knn["num_test"] if knn else None,
        "knn_seconds": knn["seconds"] if knn else None,
        **self._skip_counts(),
        "skipped_images": self.train_source.skipped_while_reading,
        "export": export_path,
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "replicas": self.num_replicas,
    }

  def _make_preemption_handler(self):
    """`hooks.PreemptionHook.make_handler` with this run's checkpoints (None on one host)."""
    def save() -> int:
      step = int(self.step.numpy())
      self.checkpointing.save(step)
      return step

    return self.preemption.make_handler(self.strategy, save,
                                        self.run_dir.join("preemption_handler_unused"))

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

  def _export(self) -> str | None:
    try:
      from tfmochi import export as export_lib
    except ImportError:
      logging.warning("tfmochi.export is not available; skipping the export.")
      return None
    out = self.run_dir.join("export", self.config.export_format)
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
