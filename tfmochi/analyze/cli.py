"""`python -m tfmochi.analyze`: the flags, and `main`, the only reader of them.

Errors (no checkpoint, unlabelled data, unwritable output, bad flags) end the command with one
message and exit status 2 (`tfmochi.cli`).
"""

from __future__ import annotations

import os

from tfmochi import cli as cli_lib
from tfmochi import data as data_lib
from tfmochi import rundir
from tfmochi.analyze import render
from tfmochi.analyze.pipeline import analyze_run
from tfmochi.analyze.report import AnalyzeError

PROGRAM = "tfmochi.analyze"


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("model_dir", None, "The training run (holds config.json, checkpoints/).")
  flags.DEFINE_string("output_dir", None, "Where report.json, the PNGs and index.html go "
                      "(default: <model_dir>/analysis).")
  flags.DEFINE_string("checkpoint", None, "A checkpoint prefix (default: the newest readable).")
  flags.DEFINE_integer("num_queries", 512, "M, the queries (capped by the data set).")
  flags.DEFINE_integer("queue_size", None, "K, the queue (default: the run's --queue_size, "
                       "capped by the data set).")
  flags.DEFINE_integer("seed", None, "Seed of the image selection, views and MoCHi draws "
                       "(default: the run's).")
  flags.DEFINE_string("split", "train", "Data split to embed.")
  flags.DEFINE_integer("batch_size", 128, "Images per forward pass.")
  flags.DEFINE_string("dataset", None, "Analyse on this data set (default: the run's).")
  flags.DEFINE_string("data_dir", None, "Data directory (default: the run's).")


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  status = cli_lib.check_invocation(PROGRAM, argv, required={"model_dir": "the training run to analyse"})
  if status is not None:
    return status
  output_dir = flag_values.output_dir or os.path.join(flag_values.model_dir, "analysis")
  try:
    report = analyze_run(flag_values.model_dir, output_dir, checkpoint_path=flag_values.checkpoint,
                         num_queries=flag_values.num_queries, queue_size=flag_values.queue_size,
                         seed=flag_values.seed, split=flag_values.split,
                         batch_size=flag_values.batch_size, dataset=flag_values.dataset,
                         data_dir=flag_values.data_dir, progress=print)
  except (AnalyzeError, rundir.CheckpointError, data_lib.DataError) as e:
    return cli_lib.error(PROGRAM, str(e))
  fn = report["false_negatives"]
  print(f"Hardest 1% of negatives: {100 * fn['hardest_1pct']:.2f}% same class (chance "
        f"{100 * fn['chance']:.2f}%); hardest 5% carry "
        f"{100 * report['gradient_share']['hardest_5pct']:.1f}% of the gradient; proxy top-1 "
        f"{report['proxy_top1']:.2f}% ({report['seconds']:.1f} s).")
  print(f"Report: {os.path.join(output_dir, render.HTML_FILE)}", flush=True)
  return 0


def run() -> None:
  """Entry point of `python -m tfmochi.analyze`."""
  cli_lib.run(PROGRAM, _define_flags, main)
