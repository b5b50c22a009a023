"""A run's query encoder rebuilt from its directory: as a checkpoint left it, or as initialised.

Evaluation, analysis and export all start here: the run's config.json gives the architecture
(`build.build_run_encoder`), `rundir.RunDir.restore` the newest readable checkpoint (falling back
to older ones). Errors are `rundir.CheckpointError`, whose message names the run and the fix.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from tfmochi import build
from tfmochi import rundir


class RestoredEncoder(NamedTuple):
  """What `restore_encoder` returns: unpack as `encoder, config, step, path = ...`."""
  encoder: keras.Model
  config: object  # the run's TrainConfig
  step: int
  path: str  # the checkpoint prefix read


def random_init_encoder(model_dir: str):
  """A run's query encoder as the trainer initialises it, before its first step.

  The baseline a pretrained checkpoint must beat (`evaluate --random_init`). Sets the global
  random seeds (keras.utils.set_random_seed), as the trainer does before building its networks.

  Returns:
    (encoder, train_config).

  Raises:
    rundir.CheckpointError: no config.json (not a run directory).
  """
  config = rundir.RunDir(model_dir).read_config()
  keras.utils.set_random_seed(build.weight_init_seed(config))
  return build.build_run_encoder(config, "query_encoder"), config


def restore_encoder(model_dir: str, checkpoint_path: str | None = None) -> RestoredEncoder:
  """Rebuilds a run's query encoder and loads a checkpoint into it.

  Args:
    model_dir: the run directory.
    checkpoint_path: a specific checkpoint prefix (default: the newest readable one, falling back
      to older ones).

  Returns:
    RestoredEncoder(encoder, train_config, step, checkpoint prefix).

  Raises:
    rundir.CheckpointError: no config, no checkpoint, or a checkpoint that does not fit.
  """
  run_dir = rundir.RunDir(model_dir)
  config = run_dir.read_config()
  encoder = build.build_run_encoder(config, "query_encoder")
  step = tf.Variable(0, dtype=tf.int64)
  path = run_dir.restore(tf.train.Checkpoint(step=step, query_encoder=encoder), partial=True,
                         paths=None if checkpoint_path is None else [checkpoint_path])
  if path is None:
    raise rundir.CheckpointError(
        f"{model_dir} has no checkpoint yet (looked in {run_dir.checkpoint_dir}). Train first, "
        "or wait for the first checkpoint of a running job.")
  return RestoredEncoder(encoder, config, int(step.numpy()), path)
