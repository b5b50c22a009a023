"""`python -m tfmochi.train --flagfile=configs/mochi.flags`: MoCo v2 / MoCHi pretraining.

The only place (with tfmochi.benchmark) that reads absl FLAGS. Without flags it trains the offline
quickstart (real handwritten digits shipped with scikit-learn) on the CPU in a few minutes.
Bad flags, data or paths end with one clear message and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tfmochi import config as config_lib  # noqa: E402

config_lib.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])} (flags start with --).")
  logging.set_verbosity(logging.WARNING)  # progress goes to stdout; keep INFO chatter out
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  # (tfmochi.config already imports TensorFlow through the method configs it validates with, so
  # even --help costs the ~11 s import on 2 cores; these imports add the data and trainer code.)
  from tfmochi import checkpoints
  from tfmochi import data
  from tfmochi import trainer

  try:
    config = config_lib.from_flags(FLAGS)
    summary = trainer.train(config)
  except (config_lib.ConfigError, data.DataError, checkpoints.CheckpointError,
          trainer.TrainingError) as e:
    logging.flush()
    print(f"\ntfmochi.train: error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0 if summary else 1


def run():
  app.run(main)


if __name__ == "__main__":
  run()
