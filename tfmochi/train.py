"""`python -m tfmochi.train --flagfile=configs/mochi.flags`: MoCo v2 / MoCHi pretraining.

The only place (with tfmochi.benchmark) that reads absl FLAGS. Without flags it trains the offline
quickstart (real handwritten digits shipped with scikit-learn) on the CPU in a few minutes.
Bad flags, data or paths end with one clear message and exit status 2, never a traceback.
TensorFlow's C++ start-up logs are hidden; TF_CPP_MIN_LOG_LEVEL=0 shows them.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

from tfmochi import cli
from tfmochi import config as config_lib  # no TensorFlow: --help and flag errors answer at once

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])} (flags start with --).")
  return train_from_flags(FLAGS)


def train_from_flags(flag_values: flags.FlagValues) -> int:
  """Trains the run that parsed `flag_values` describe; returns the exit status.

  Bad flags, data, paths or a non-finite loss end with one `tfmochi.train: error: ...` line on
  stderr and status 2. `main` passes the global FLAGS; tests pass their own FlagValues (defined
  with `config.define_flags(flag_values)`), so the error cases need no process of their own.
  """
  logging.set_verbosity(logging.WARNING)  # progress goes to stdout; keep INFO chatter out
  try:
    config = config_lib.from_flags(flag_values)  # before TensorFlow loads: errors come at once
  except config_lib.ConfigError as e:
    return _error(e)
  # The flags are valid: now TensorFlow loads, its start-up logs filtered in a command's process.
  cli.quiet_tensorflow_startup()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  from tfmochi import rundir  # pylint: disable=g-import-not-at-top
  from tfmochi import data  # pylint: disable=g-import-not-at-top
  from tfmochi import trainer  # pylint: disable=g-import-not-at-top

  try:
    summary = trainer.train(config)
  except (config_lib.ConfigError, data.DataError, rundir.CheckpointError,
          trainer.TrainingError) as e:
    return _error(e)
  return 0 if summary else 1


def _error(e: Exception) -> int:
  """One `tfmochi.train: error: ...` line on stderr; the exit status 2."""
  logging.flush()
  print(f"\ntfmochi.train: error: {e}", file=sys.stderr, flush=True)
  return 2


def run():
  config_lib.define_flags()  # here, not at import: importing this module defines no flag
  app.run(main)


if __name__ == "__main__":
  run()
