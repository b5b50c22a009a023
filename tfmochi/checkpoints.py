"""The run-directory names of tfmochi's Python API, by the names the README and callers use.

The run directory (layout, config.json, checkpoint listing, restore with fallback) is
`tfmochi.rundir.RunDir`; rebuilding a run's encoders is `tfmochi.build`. This module only gives
their functions of a `model_dir` path, e.g. `checkpoints.restore_encoder(run_dir)`.
"""

from __future__ import annotations

from tfmochi import rundir
from tfmochi.build import build_run_encoder  # noqa: F401
from tfmochi.build import encoder_bn_mode  # noqa: F401
from tfmochi.build import random_init_encoder  # noqa: F401
from tfmochi.build import restore_encoder  # noqa: F401
from tfmochi.build import weight_init_seed  # noqa: F401
from tfmochi.rundir import CHECKPOINT_SUBDIR  # noqa: F401
from tfmochi.rundir import CONFIG_FILE  # noqa: F401
from tfmochi.rundir import KNN_RANDOM_INIT_FILE  # noqa: F401
from tfmochi.rundir import METRICS_FILE  # noqa: F401
from tfmochi.rundir import CheckpointError  # noqa: F401
from tfmochi.rundir import checkpoint_step  # noqa: F401


def checkpoint_dir(model_dir: str) -> str:
  return rundir.RunDir(model_dir).checkpoint_dir


def list_checkpoints(model_dir: str) -> list[str]:
  """Checkpoint prefixes of a run, newest first (`RunDir.list_checkpoints`)."""
  return rundir.RunDir(model_dir).list_checkpoints()


def restore_with_fallback(checkpoint, model_dir: str, partial: bool = False) -> str | None:
  """The newest readable checkpoint of a run restored into `checkpoint` (`RunDir.restore`)."""
  return rundir.RunDir(model_dir).restore(checkpoint, partial=partial)


def load_run_config(model_dir: str):
  """The TrainConfig a run was started with (`RunDir.read_config`)."""
  return rundir.RunDir(model_dir).read_config()
