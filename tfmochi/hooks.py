"""What the training loop does between two blocks of steps, one small class per concern.

The trainer's loop (`Trainer._train`) runs the compiled loop for a block of steps, wraps what it
returned in a `Block`, and hands it to each hook in turn:

  NonFiniteHook    stops with `TrainingError` when a step's loss or gradient was NaN/inf
                   (--nonfinite=stop)
  MetricsHook      TensorBoard scalars and one metrics.jsonl record per block
  ProgressHook     the console line: step/total, ETA, loss, proxy accuracy, lr, images/s
  CheckpointHook   saves at --checkpoint_every_steps, at the end and when a stop was requested
  PreemptionHook   SIGTERM/SIGINT, and tf.distribute's PreemptionCheckpointHandler under
                   multi_worker and tpu
  KnnMonitorHook   the kNN monitor: its cost, a pass at random init, every --knn_every_epochs and
                   at the end

A hook may also ask the loop to stop a block at a given step (`boundary`), so that it acts exactly
there (a checkpoint every N steps, a kNN pass every M).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from typing import Callable

from absl import logging
import tensorflow as tf

from tfmochi import evaluate as eval_lib
from tfmochi import memory
from tfmochi import rundir
from tfmochi import runfiles


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, ...); the message says what and what was kept."""


@dataclasses.dataclass
class Block:
  """One call of the compiled loop: `steps` steps that ended at step `step`.

  Attributes:
    step: the global step after the block.
    steps: steps in the block.
    seconds: wall time of the block.
    metrics: the means over the block of the step's metrics ("loss", "acc1", ...).
    lr: the learning rate of the block's last step.
    first_nonfinite_step: the first step whose loss or gradient was non-finite (-1: none).
    nonfinite_loss: whether that was the loss (else the gradient).
    counts: steps that did not update the model so far (`Trainer._skip_counts`).
    batch_size: the global batch.
  """
  step: int
  steps: int
  seconds: float
  metrics: dict
  lr: float
  first_nonfinite_step: int = -1
  nonfinite_loss: bool = False
  counts: dict = dataclasses.field(default_factory=dict)
  batch_size: int = 0

  @property
  def images_per_sec(self) -> float:
    return self.steps * self.batch_size / max(self.seconds, 1e-9)

  @property
  def values(self) -> dict:
    """The block's metrics with lr and images_per_sec: what TensorBoard and metrics.jsonl get."""
    return dict(self.metrics, lr=self.lr, images_per_sec=self.images_per_sec)


class Hook:
  """Called by the loop after every block; `boundary` may end a block at a step of its choice."""

  def begin(self) -> None:
    """Called once, just before the first block."""

  def boundary(self, step: int) -> int | None:
    """The step at which the block starting at `step` must end for this hook (None: any)."""
    del step
    return None

  def after_block(self, block: Block) -> None:
    del block


def format_time(seconds: float) -> str:
  """h:mm:ss, or "?" for an unknown (non-finite) duration."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -------------------------------------------------------------------------------------------------


class NonFiniteHook(Hook):
  """--nonfinite=stop: a block with a non-finite step ends training with one message.

  Args:
    mode: --nonfinite ("stop" acts; "skip" steps were already skipped by the step itself).
    list_checkpoints: the run's checkpoints, newest first (named in the message as what is kept).
  """

  def __init__(self, mode: str, list_checkpoints: Callable[[], list[str]]):
    self.mode = mode
    self.list_checkpoints = list_checkpoints

  def after_block(self, block: Block) -> None:
    if block.first_nonfinite_step < 0 or self.mode != "stop":
      return
    kept = self.list_checkpoints()
    what = "loss" if block.nonfinite_loss else "gradient"
    raise TrainingError(
        f"The {what} became non-finite (NaN or inf) at step {block.first_nonfinite_step}. "
        "Training stopped; the last good checkpoint is kept "
        f"({kept[0] if kept else 'none was written yet'}). Lower --learning_rate, raise "
        "--temperature, check the input data, or pass --nonfinite=skip to skip such steps.")


class MetricsHook(Hook):
  """TensorBoard scalars and one metrics.jsonl record per block; totals for the summary.

  Args:
    writer: a tf.summary writer (a no-op writer off the chief).
    log: appends a record to metrics.jsonl (None off the chief).

  Attributes:
    last: the last block's values (loss, acc1, ..., lr, images_per_sec).
    images, seconds: images trained on and seconds spent in blocks so far (this process).
  """

  def __init__(self, writer, log: Callable[[dict], None] | None):
    self.writer = writer
    self.log = log
    self.last: dict = {}
    self.images = 0
    self.seconds = 0.0
    self.t_start = time.time()

  def begin(self) -> None:
    self.t_start = time.time()

  def after_block(self, block: Block) -> None:
    self.last = block.values
    self.images += block.steps * block.batch_size
    self.seconds += block.seconds
    with self.writer.as_default(step=block.step):
      for k, v in {**self.last, **block.counts}.items():
        tf.summary.scalar(f"proxy_{k}" if k.startswith("acc") else k, v)
    if self.log is not None:
      self.log(dict(step=block.step, **{k: float(v) for k, v in self.last.items()},
                    **block.counts, rss_mb=memory.resident_memory_mb()))

  @property
  def images_per_sec(self) -> float | None:
    """Training images per second over this process's blocks (None before the first)."""
    return float(self.images / self.seconds) if self.seconds else None

  @property
  def wall_seconds(self) -> float:
    """Seconds since the loop began (blocks, checkpoints, kNN passes, ...)."""
    return float(time.time() - self.t_start)


class ProgressHook(Hook):
  """One console line per block: step/total, ETA, loss, proxy accuracy, lr, images/s.

  On a terminal the line is rewritten in place (`newline` ends it before other output).
  """

  def __init__(self, total: int, start: int, enabled: bool, show_skipped: bool = False,
               show_scale_skips: bool = False):
    self.total, self.start, self.enabled = total, start, enabled
    self.show_skipped, self.show_scale_skips = show_skipped, show_scale_skips
    self.t0 = time.time()
    self.tty = sys.stdout.isatty()

  def begin(self) -> None:
    self.t0 = time.time()

  def after_block(self, block: Block) -> None:
    shown = {"loss": block.metrics["loss"], "acc1": 100 * block.metrics["acc1"], "lr": block.lr,
             "img/s": block.images_per_sec}
    if self.show_skipped:
      shown["skipped"] = block.counts["skipped_steps"]
    if self.show_scale_skips:
      shown["scale_skips"] = block.counts["loss_scale_skipped_steps"]
    self.update(block.step, shown)

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
    line = f"step {step}/{self.total} [{bar}] ETA {format_time(eta)} {parts}"
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


class CheckpointHook(Hook):
  """Saves every `every` steps, at the last step, and at a block where a stop was requested.

  Args:
    manager: the run's tf.train.CheckpointManager.
    every: --checkpoint_every_steps (or the steps of an epoch).
    total: the run's last step.
    stop_requested: whether this process is about to stop (SIGTERM): save before leaving.

  Attributes:
    last_saved_step: the newest step saved or restored (-1: none), so that every worker skips
      the same saves.
    metrics: the run's MetricsLog, flushed with each checkpoint (see rundir.MetricsLog), or None.
  """

  def __init__(self, manager: tf.train.CheckpointManager, every: int, total: int,
               stop_requested: Callable[[], bool]):
    self.manager, self.every, self.total = manager, every, total
    self.stop_requested = stop_requested
    self.last_saved_step = -1
    self.metrics: rundir.MetricsLog | None = None

  def boundary(self, step: int) -> int:
    return (step // self.every + 1) * self.every

  def after_block(self, block: Block) -> None:
    if block.step % self.every == 0 or block.step >= self.total or self.stop_requested():
      self.save(block.step)

  def save(self, step: int) -> None:
    """Checkpoints `step` unless it was the last one saved (every worker decides alike)."""
    if step != self.last_saved_step:
      self.manager.save(checkpoint_number=step)
      self.last_saved_step = step
    if self.metrics is not None:
      self.metrics.flush()  # object stores: metrics.jsonl up to this checkpoint (rundir.MetricsLog)


# -------------------------------------------------------------------------------------------------
# Preemption


class ClusterPreempted(Exception):
  """Raised by the preemption handler's exit_fn once every worker has checkpointed."""


# Collective failures that mean "a peer is gone" (killed, crashed, unreachable): the coordination
# service reports missing heartbeats as UNAVAILABLE and aborts pending collectives; the others are
# what an aborted or timed-out collective raises.
CLUSTER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                  tf.errors.DeadlineExceededError)


def cluster_error_reason(error: tf.errors.OpError) -> str:
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
  """tf.distribute's handler, with quiet watcher threads when a peer dies, and `close`.

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

  def close(self) -> None:
    """Stops the watcher threads after a normal end of training.

    They are daemon threads blocked on the coordination service; left alone they would wake up
    with an error while the process exits. TensorFlow 2.21 has no public way to stop them: its
    finaliser is the clean-up, and it never runs while those threads still reference the handler.
    It only stops threads that are still running, so the later garbage collection is harmless.
    """
    self.__del__()


class PreemptionHook(Hook):
  """SIGTERM/SIGINT: checkpoint at the next block boundary and stop (exit 0, resumable).

  On one device or MirroredStrategy the signal sets a flag the loop reads after each block. Under
  MultiWorkerMirrored and TPU strategies the flag is handed to tf.distribute's
  PreemptionCheckpointHandler (`make_handler`), which agrees one step with every worker, so that
  all of them checkpoint there and stop together (`cluster_step`); a worker leaving alone would
  leave its peers waiting in a collective.

  Args:
    strategy_name: --strategy.
  """

  def __init__(self, strategy_name: str):
    self.strategy_name = strategy_name
    self.requested = False
    self.signal_name = ""
    self.cluster_step: int | None = None  # set once the handler has saved the preemption ckpt
    self.handler: _PreemptionHandler | None = None
    self._previous = {}

  @property
  def stops_locally(self) -> bool:
    """False under multi_worker: only the handler may stop the loop (all workers at once)."""
    return self.strategy_name != "multi_worker"

  def stop_requested(self) -> bool:
    return self.stops_locally and self.requested

  def start(self, make_handler: Callable[[], _PreemptionHandler | None]) -> None:
    """Installs the SIGTERM/SIGINT handlers (main thread only), then the cluster handler."""
    def on_signal(signum, _frame):
      self.requested = True
      self.signal_name = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, on_signal)
      except ValueError:  # not in the main thread
        pass
    self.handler = make_handler()

  def restore_signals(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def make_handler(self, strategy: tf.distribute.Strategy, save: Callable[[], int],
                   stand_in_dir: str) -> _PreemptionHandler | None:
    """tf.distribute's PreemptionCheckpointHandler for multi_worker and tpu runs, else None.

    The handler polls our signal flag (`termination_watcher_fn`: without one it would install its
    own SIGTERM handler and ignore SIGINT) and, once every worker has acknowledged, calls
    `save` (the trainer's own manager: an ordinary checkpoint, same layout, same data position)
    after the same number of `run` calls, i.e. the same block, on every worker; then `exit_fn`
    raises `ClusterPreempted` instead of sys.exit(42), so training returns as after a local stop.
    `grace_period=0`: no training on through a grace window. The manager it is given is a
    stand-in over an empty Checkpoint in an unused directory: handed ours, it would restore the
    newest checkpoint without our fallback, read worker_tmp_<i> on the other workers, and add a
    variable that single-device checkpoints lack. On Google Cloud CPU and TPU VMs TensorFlow makes
    the handler a no-op; a TPU run (one client process) still stops through the local flag.
    """
    if self.strategy_name not in ("multi_worker", "tpu"):
      return None

    def save_fn():
      self.cluster_step = save()

    def exit_fn():
      raise ClusterPreempted()

    termination = tf.distribute.experimental.TerminationConfig(
        termination_watcher_fn=lambda: self.requested, exit_fn=exit_fn, grace_period=0,
        save_fn=save_fn)
    stand_in = tf.train.CheckpointManager(tf.train.Checkpoint(), stand_in_dir, max_to_keep=1)
    return _PreemptionHandler(strategy.cluster_resolver, stand_in,
                              termination_config=termination)

  def run(self, loop, *args):
    """Calls `loop(*args)`; under multi_worker through the handler, which checkpoints and raises
    ClusterPreempted first if a worker has been preempted."""
    if self.handler is not None and self.strategy_name == "multi_worker":
      return self.handler.run(loop, *args)
    return loop(*args)

  def after_block(self, block: Block) -> None:
    if self.handler is not None and self.strategy_name == "tpu":
      # On Borg-managed TPUs: checkpoints on the platform's preemption notice.
      self.handler.save_checkpoint_if_preempted()

  def close(self) -> None:
    if self.handler is not None:
      self.handler.close()


# -------------------------------------------------------------------------------------------------
# kNN monitor


def knn_details(result: dict) -> str:
  """The protocol of a kNN monitor result: "k=14, t=0.1, 1497 train / 300 held-out, 6.1 s"."""
  return (f"k={result['k']}, t={result['t']:g}, {result['num_train']} train / "
          f"{result['num_test']} held-out, {result['seconds']:.1f} s")


class KnnMonitorHook(Hook):
  """The kNN monitor: its cost up front, a pass at random init, every `every` steps, at the end.

  Args:
    evaluate: runs one pass (`Trainer.knn_eval(raw_pixels=...)`); None when it cannot run.
    cost: the monitor's images per pass (`Trainer.knn_monitor_cost`); None when it cannot run.
    final: --knn_eval on labelled data: a pass at random init and at the end.
    every: steps between passes during training (0: none).
    total: the run's last step.
    run_dir: where knn_random_init.json is kept.
    writer: the TensorBoard writer.
    progress: the console line (ended before each message).
    verbose: print messages (the chief only).

  Attributes:
    random: the random-init result (this run's, or read back on resume), or None.
    result: the newest pass's result, or None.
  """

  def __init__(self, evaluate: Callable[..., dict | None], cost: Callable[[], dict | None], *,
               final: bool, every: int, total: int, run_dir: rundir.RunDir, chief: bool,
               writer, progress: ProgressHook, verbose: bool):
    self.evaluate, self.final, self.every, self.total = evaluate, final, every, total
    self.run_dir, self.chief, self.writer, self.progress = run_dir, chief, writer, progress
    self.verbose = verbose and chief
    self.cost = cost() if final or every else None
    self.random: dict | None = None
    self.result: dict | None = None
    self._blocks = 0

  def before_training(self, start_step: int) -> None:
    """Announces the cost; at step 0 measures the network at random init (else reads it back)."""
    cost = self.cost
    if cost is not None and self.verbose:
      print(f"kNN monitor: {cost['images']:,} images per pass ({cost['train_images']:,} "
            f"train, {cost['test_images']:,} held out), about "
            f"{100 * cost['epoch_fraction']:.2g}% of an epoch each (a forward pass of one "
            "view ~ 1/3 of a training step per image); seconds per pass follow once the step's "
            "speed is measured. Bound it with --knn_train_per_class/--knn_test_per_class.",
            flush=True)
    if self.final and start_step == 0:
      self.random = self.evaluate(raw_pixels=None)
      if self.random is not None and self.chief:
        self.run_dir.write(runfiles.KNN_RANDOM_INIT_FILE, self.random)
        if self.verbose:
          print(f"kNN top-1 at random init: {self.random['top1']:.2f}%"
                f"{eval_lib.baselines_text(self.random, knn_details(self.random))}", flush=True)
    else:
      self.random = self.run_dir.read(runfiles.KNN_RANDOM_INIT_FILE)

  def boundary(self, step: int) -> int | None:
    return (step // self.every + 1) * self.every if self.every else None

  def after_block(self, block: Block) -> None:
    self._blocks += 1
    if self.cost is not None and self._blocks == 2:
      # The first block includes tracing and compilation; the second runs at the step's speed.
      self.cost["seconds"] = self.cost["images"] / (3.0 * block.images_per_sec)
      if self.verbose:
        self.progress.newline()
        print(f"kNN monitor: about {self.cost['seconds']:.0f} s per pass at "
              f"{block.images_per_sec:.0f} training images/s.", flush=True)
    if self.every and block.step % self.every == 0 and block.step < self.total:
      self.result = self.evaluate()
      if self.result is not None:
        with self.writer.as_default(step=block.step):
          for key in ("top1", "top5", "k"):
            tf.summary.scalar(f"knn_{key}", self.result[key])
        self.progress.newline()
        if self.verbose:
          print(f"kNN top-1 {self.result['top1']:.2f}% top-5 {self.result['top5']:.2f}% at "
                f"step {block.step} ({knn_details(self.result)})", flush=True)

  def end(self) -> None:
    """The final pass (--knn_eval); the raw-pixel baseline with it if the random-init pass
    (run before the monitor was on) has none."""
    if self.final:
      has_raw = self.random is not None and "raw_pixels_top1" in self.random
      self.result = self.evaluate(raw_pixels=False if has_raw else None)

  @property
  def raw_pixels_top1(self) -> float | None:
    return self._baseline("raw_pixels_top1")

  @property
  def raw_pixels_stored(self) -> dict:
    """{"raw_pixels_stored_top1", "raw_pixels_stored_size"} of the stored pixels, or {}."""
    top1 = self._baseline("raw_pixels_stored_top1")
    if top1 is None:
      return {}
    return {"raw_pixels_stored_top1": top1,
            "raw_pixels_stored_size": self._baseline("raw_pixels_stored_size")}

  def _baseline(self, key: str):
    return next((r[key] for r in (self.random, self.result) if r and key in r), None)

  def report(self) -> None:
    """The final result with its baselines, on the console."""
    if not (self.verbose and self.result):
      return
    baselines = dict(self.result, random_init_top1=self.random["top1"] if self.random else None,
                     raw_pixels_top1=self.raw_pixels_top1, **self.raw_pixels_stored)
    print(f"Final kNN top-1 on the held-out split: {self.result['top1']:.2f}%"
          f"{eval_lib.baselines_text(baselines, knn_details(self.result))}", flush=True)
