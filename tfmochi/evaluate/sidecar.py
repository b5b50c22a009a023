"""Side-car evaluation: follow a running training job and evaluate each checkpoint it writes.

`run_sidecar` follows `<model_dir>/checkpoints` with `tf.train.checkpoints_iterator`, evaluates
each new checkpoint as training writes it (`evaluate_checkpoint`), and stops once the run's
summary.json exists and the newest checkpoint has been evaluated, or after `timeout` seconds.
"""

from __future__ import annotations

import os
import time

from absl import logging
import tensorflow as tf

from tfmochi import data as data_lib
from tfmochi import rundir
from tfmochi import runfiles
from tfmochi.evaluate import features as features_lib
from tfmochi.evaluate import pipeline
from tfmochi.evaluate.features import EvalError, Progress

def training_finished(model_dir: str, last_path: str | None) -> bool:
  """True when the run's summary.json exists and its newest checkpoint has been evaluated.

  A summary.json left by an earlier run that has since been resumed does not count: the resumed
  run's checkpoints are past that summary's global_step.
  """
  summary_path = os.path.join(model_dir, runfiles.SUMMARY_FILE)
  if not tf.io.gfile.exists(summary_path):
    return False
  latest = tf.train.latest_checkpoint(rundir.RunDir(model_dir).checkpoint_dir)
  if latest is None:
    return True  # a finished run without any checkpoint: nothing will come
  if latest != last_path:
    return False
  try:
    final_step = rundir.read_json(summary_path).get("global_step")
  except (ValueError, tf.errors.OpError, AttributeError):
    final_step = None
  return not (isinstance(final_step, int) and rundir.checkpoint_step(latest) > final_step)


def run_sidecar(model_dir: str, settings: pipeline.EvalSettings, *, timeout: float = 3600.0,
                poll_interval: float = 10.0,
                sources: tuple[data_lib.DataSource, data_lib.DataSource] | None = None,
                strategy: tf.distribute.Strategy | None = None,
                progress: Progress | None = None) -> list[dict]:
  """Evaluates every new checkpoint of a (running) training job until it ends.

  Args:
    model_dir: the run; it need not have a checkpoint (or exist) yet.
    settings: what to run.
    timeout: give up after this many seconds in total.
    poll_interval: how often to check for the end of training while no checkpoint is new
      (at least every 2 s).
    sources: (train, test) instead of the run's data set (loaded once, at the first checkpoint).
    strategy: see `evaluate_checkpoint`.
    progress: progress lines.

  Returns:
    The results, one per evaluated checkpoint (each also written as `evaluate_checkpoint` does).
  """
  settings.validate()
  if settings.random_init:
    raise EvalError("--random_init and --sidecar are exclusive (the random-init network has no "
                    "checkpoints to follow).")
  if timeout <= 0 or poll_interval <= 0:
    raise EvalError(f"--sidecar_timeout must be > 0 (got {timeout}) and the poll interval > 0.")
  deadline = time.time() + timeout
  state = {"path": None}  # the newest checkpoint handled (evaluated or skipped)
  results = []

  def stop() -> bool:
    return time.time() >= deadline or training_finished(model_dir, state["path"])

  # checkpoints_iterator polls every second and gives up a wait once less than a second is
  # left, so a wait shorter than 2 s would return at once and spin; hence the floor.
  iterator = tf.train.checkpoints_iterator(rundir.RunDir(model_dir).checkpoint_dir,
                                           timeout=max(2.0, min(poll_interval, timeout)),
                                           timeout_fn=stop)
  for path in iterator:
    features_lib.say(progress, f"side-car: evaluating {path}")
    try:
      if sources is None:
        sources = pipeline.load_sources(rundir.RunDir(model_dir).read_config(), settings)
      result = pipeline.evaluate_checkpoint(model_dir, settings, checkpoint_path=path,
                                            sources=sources, strategy=strategy,
                                            progress=progress)
    except rundir.CheckpointError as e:
      # Typically the trainer deleted it (max_to_keep) before we got to it: go on.
      logging.warning("side-car: skipping %s: %s", path, e)
      state["path"] = path
      continue
    results.append(result)
    state["path"] = path
    features_lib.say(progress, f"side-car: step {result['checkpoint_step']}: {settings.mode} "
                     f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%")
    if time.time() >= deadline:
      break
  return results
