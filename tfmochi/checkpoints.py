"""A run directory: its configuration, its checkpoints, atomic writes, restore with fallback.

Layout of `model_dir` (local or gs://):

  config.json            the TrainConfig of the run (written once, atomically)
  checkpoints/ckpt-N.*   tf.train.Checkpoint: step, query_encoder, key_encoder, queue, optimizer
  train/, eval/          TensorBoard event files
  summary.json           the end-of-run summary (atomically)
  knn_random_init.json   the trainer's kNN of the network before its first step
  eval_<mode>[_random_init].json   tfmochi.evaluate's results (of checkpoints / of the initial
                         network, see checkpoints.random_init_encoder)
  metrics.jsonl          one JSON record per training loop (see rundir.MetricsLog)
  export/<format>/       the exported backbone (complete once export_info.json exists)
  analysis/              tfmochi.analyze's report (complete once report.json exists)

How these files are written (through tf.io.gfile, each whole or not at all, without relying on an
atomic rename, so that model_dir may be a gs:// bucket) is the subject of `tfmochi.rundir`.

Everything downstream (export, evaluate, analyze) rebuilds the encoder from config.json and reads
the `query_encoder` node of the newest readable checkpoint, so any of them works on a run that is
still training.
"""

from __future__ import annotations

import os

from absl import logging
import tensorflow as tf

from tfmochi import rundir

CONFIG_FILE = "config.json"
KNN_RANDOM_INIT_FILE = "knn_random_init.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(ValueError):
  """A model_dir has no usable checkpoint, or one that does not fit the model. Clear message."""


# -------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(model_dir, CHECKPOINT_SUBDIR)


def list_checkpoints(model_dir: str) -> list[str]:
  """Checkpoint prefixes of a run, newest first (empty if none)."""
  directory = checkpoint_dir(model_dir)
  try:
    found = rundir.check_readable(directory, "The checkpoint directory")
  except rundir.RunDirError as e:  # an unknown scheme, a bucket without access, ...
    raise CheckpointError(str(e)) from None
  state = tf.train.get_checkpoint_state(directory) if found else None
  if state is None:
    return []
  paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
  # get_checkpoint_state has already prefixed relative entries with `directory`: joining them
  # again broke relative model_dirs (the quickstart's runs/quickstart).
  return [p for p in reversed(paths) if tf.io.gfile.exists(p + ".index")]


def checkpoint_step(path: str) -> int:
  """The step number of a `ckpt-N` prefix."""
  try:
    return int(path.rsplit("-", 1)[1])
  except (IndexError, ValueError):
    return -1


def restore_with_fallback(checkpoint: tf.train.Checkpoint, model_dir: str,
                          partial: bool = False) -> str | None:
  """Restores the newest *readable* checkpoint of a run; falls back to older ones with a warning.

  Args:
    checkpoint: the object graph to restore into.
    model_dir: the run directory.
    partial: allow the checkpoint to hold more than `checkpoint` (e.g. only the query encoder is
      wanted).

  Returns:
    The restored checkpoint prefix, or None when the run has no checkpoint yet.

  Raises:
    CheckpointError: checkpoints exist but none can be read into this model (e.g. another
      architecture), with the reason.
  """
  paths = list_checkpoints(model_dir)
  errors = []
  for path in paths:
    try:
      status = checkpoint.restore(path)
      if partial:
        status.expect_partial()
      # Every object of the model must be in the checkpoint (another architecture fails here).
      status.assert_existing_objects_matched()
      if errors:
        logging.warning("Restored the older checkpoint %s because newer ones could not be read: "
                        "%s", path, "; ".join(errors))
      return path
    except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError, EOFError) as e:
      # A truncated file can surface as IndexError ("Read less bytes than requested").
      reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      errors.append(f"{os.path.basename(path)}: {reason}")
      logging.warning("Cannot read checkpoint %s: %s", path, reason)
  if errors:
    raise CheckpointError(
        f"No checkpoint in {checkpoint_dir(model_dir)} could be read into this model ("
        + "; ".join(errors) + "). If the run used another --arch, --embedding_dim, --mlp_head, "
        "--head_bn or --small_stem, use the same values (config.json of the run has them), or a "
        "new --model_dir.")
  return None


def load_run_config(model_dir: str):
  """The TrainConfig a run was started with (from model_dir/config.json)."""
  from tfmochi import config as config_lib  # local: config imports the heavy modules

  path = os.path.join(model_dir, CONFIG_FILE)
  try:
    found = rundir.check_readable(path)
  except rundir.RunDirError as e:  # an unknown scheme, a bucket without access, ...
    raise CheckpointError(str(e)) from None
  if not found:
    if not tf.io.gfile.exists(model_dir):
      raise CheckpointError(f"--model_dir {model_dir} does not exist. Point it at the directory a "
                            "training run wrote (it holds config.json and checkpoints/).")
    raise CheckpointError(f"{model_dir} has no {CONFIG_FILE}: it is not a tfmochi training "
                          "directory (python -m tfmochi.train --model_dir=... writes one).")
  try:
    return config_lib.TrainConfig.from_dict(rundir.read_json(path))
  except (ValueError, tf.errors.OpError) as e:
    raise CheckpointError(f"{path} cannot be read ({rundir.reason(e)}).") from None


def encoder_bn_mode(moco_bn_mode: str) -> str:
  """The models.build_backbone BN layer for a MoCo bn_mode (shuffle/none use plain BN)."""
  return {"split": "split", "sync": "sync"}.get(moco_bn_mode, "standard")


def build_run_encoder(config, name: str, fast_grad: bool | None = None):
  """The encoder a run with TrainConfig `config` trains (query or key: same architecture).

  The one place that maps a run's settings to `models.build_encoder`, for the trainer and for
  everything that rebuilds a run's encoders (export, evaluate, analyze, benchmark). `fast_grad`
  None resolves the run's --fast_grad here (the weights are the same either way).
  """
  from tfmochi import models  # local import: keeps this module light for the trainer

  if fast_grad is None:
    fast_grad = models.resolve_fast_grad(getattr(config, "fast_grad", "auto"))

  return models.build_encoder(
      config.arch, embedding_dim=config.embedding_dim, mlp=config.mlp_head,
      small_stem=config.small_stem, bn_mode=encoder_bn_mode(config.bn_mode),
      bn_splits=config.bn_splits, head_bn=config.head_bn, name=name, fast_grad=fast_grad)


def weight_init_seed(config) -> int:
  """The global seed the trainer sets before it builds a run's networks.

  Offset from --seed: a global TF seed of 0 makes tf.data's shuffle compare a tensor op-seed to 0
  inside a graph (OperatorNotAllowedInGraphError).
  """
  return config.seed + 1


def random_init_encoder(model_dir: str):
  """A run's query encoder as the trainer initialises it, before its first step.

  The baseline a pretrained checkpoint must beat (`evaluate --random_init`). Sets the global
  random seeds (keras.utils.set_random_seed), as the trainer does before building its networks.

  Returns:
    (encoder, train_config).

  Raises:
    CheckpointError: no config.json (not a run directory).
  """
  import keras  # local import: keeps this module light for the trainer

  config = load_run_config(model_dir)
  keras.utils.set_random_seed(weight_init_seed(config))
  return build_run_encoder(config, "query_encoder"), config


def restore_encoder(model_dir: str, checkpoint_path: str | None = None):
  """Rebuilds a run's query encoder and loads its newest readable checkpoint.

  Args:
    model_dir: the run directory.
    checkpoint_path: a specific checkpoint prefix (default: the newest readable one).

  Returns:
    (encoder, train_config, step).

  Raises:
    CheckpointError: no config, no checkpoint, or a checkpoint that does not fit.
  """
  config = load_run_config(model_dir)
  encoder = build_run_encoder(config, "query_encoder")
  step = tf.Variable(0, dtype=tf.int64)
  ckpt = tf.train.Checkpoint(step=step, query_encoder=encoder)
  if checkpoint_path is not None:
    try:
      ckpt.read(checkpoint_path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError) as e:
      raise CheckpointError(f"Cannot read {checkpoint_path} into a {config.arch} encoder: "
                            f"{str(e).splitlines()[0][:300]}") from None
    path = checkpoint_path
  else:
    path = restore_with_fallback(ckpt, model_dir, partial=True)
  if path is None:
    raise CheckpointError(f"{model_dir} has no checkpoint yet (looked in "
                          f"{checkpoint_dir(model_dir)}). Train first, or wait for the first "
                          "checkpoint of a running job.")
  return encoder, config, int(step.numpy())
