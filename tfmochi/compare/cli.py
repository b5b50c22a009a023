"""`python -m tfmochi.compare`: the sweep's flags, checked into a `SweepConfig`, and its progress
lines (`tfmochi.cli` conventions: one message and exit status 2 on errors). Imports no TensorFlow.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import flags

from tfmochi import cli
from tfmochi.compare import report
from tfmochi.compare import sweep
from tfmochi.compare import variants as variants_lib

FLAGS = flags.FLAGS
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_PROGRAM = "tfmochi.compare"

def _define_flags() -> None:
  """The command's flags (defined when it runs: the names overlap tfmochi.train's)."""
  flags.DEFINE_string("base_flagfile", None,
                      "The tfmochi.train flag file every variant starts from.")
  flags.DEFINE_string("variants", None, "Comma-separated variant names (tfmochi.compare.variants: "
                      "moco_v2, mochi, mochi_N_s_s', mochi_s_only, mochi_sprime_only, debiased, "
                      "hard, drop_hardest_P, keep_hardest_P, oracle, supcon, or a --variants_file "
                      "name). Default: the names the --variants_file lists.")
  flags.DEFINE_string("variants_file", None, "A file of 'name: --flag=value ...' lines (and "
                      "names to run).")
  flags.DEFINE_integer("seeds", 5, "Seeds per variant: --first_seed .. --first_seed + seeds - 1 "
                       "(the paired 95% interval is mean +- t sd / sqrt(n), t = 4.30 at 3 seeds, 2.78 at "
                       "5, 2.26 at 10).")
  flags.DEFINE_integer("first_seed", 0, "The first seed.")
  flags.DEFINE_string("output_dir", None, "Where runs/, results.json, results.md and plots go.")
  flags.DEFINE_integer("train_steps", None, "Override the base's schedule: training steps.")
  flags.DEFINE_float("epochs", None, "Override the base's schedule: epochs.")
  flags.DEFINE_enum("strategy", "default", STRATEGIES, "Training (and evaluation) strategy.")
  flags.DEFINE_integer("cpu_replicas", 1, "--strategy=mirrored without GPUs: logical CPUs.")
  flags.DEFINE_string("tpu", None, "--strategy=tpu: the TPU name ('local' on a TPU VM).")
  flags.DEFINE_string("train_flags", "", "More tfmochi.train flags for every run, e.g. "
                      "'--data_dir=/data --knn_every_epochs=1'.")
  flags.DEFINE_integer("linear_epochs", None, "Linear probe epochs (default: the data set's).")
  flags.DEFINE_bool("linear_cache_features", True, "Linear probes on cached centre-view features "
                    "(fast); --nolinear_cache_features: MoCo's protocol, fresh crops every epoch.")
  flags.DEFINE_integer("num_queries", 512, "Queries of the negatives analysis.")


def config_from_flags() -> sweep.SweepConfig:
  """A SweepConfig from the parsed flags; raises VariantError / ValueError with the fix."""
  if not FLAGS.base_flagfile or not os.path.isfile(FLAGS.base_flagfile):
    raise ValueError(f"--base_flagfile must name an existing tfmochi.train flag file, got "
                     f"{FLAGS.base_flagfile!r} (e.g. configs/compare_digits.flags).")
  if not FLAGS.output_dir:
    raise ValueError("--output_dir is required (runs/, results.json and results.md go there).")
  if FLAGS.seeds < 1 or FLAGS.first_seed < 0:
    raise ValueError(f"--seeds must be >= 1 and --first_seed >= 0; got {FLAGS.seeds}, "
                     f"{FLAGS.first_seed}.")
  defined, listed = ({}, [])
  if FLAGS.variants_file:
    defined, listed = variants_lib.read_variants_file(FLAGS.variants_file)
  names = variants_lib.split_names(FLAGS.variants) if FLAGS.variants else listed
  train_flags = tuple(shlex.split(FLAGS.train_flags))
  if any(not f.startswith("--") for f in train_flags):
    raise ValueError("--train_flags must hold only flags (--name=value); got "
                     f"{FLAGS.train_flags!r}.")
  return sweep.SweepConfig(
      base_flagfile=FLAGS.base_flagfile, variants=tuple(variants_lib.resolve(names, defined)),
      seeds=tuple(range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds)),
      output_dir=FLAGS.output_dir, train_steps=FLAGS.train_steps, epochs=FLAGS.epochs,
      strategy=FLAGS.strategy, cpu_replicas=FLAGS.cpu_replicas, tpu=FLAGS.tpu,
      train_flags=train_flags, linear_epochs=FLAGS.linear_epochs,
      linear_cache_features=FLAGS.linear_cache_features, num_queries=FLAGS.num_queries)


def main(argv) -> int:
  if len(argv) > 1:
    return cli.error(_PROGRAM, f"unexpected arguments {' '.join(argv[1:])} (flags start with --).")
  try:
    config = config_from_flags()
  except ValueError as e:  # VariantError too
    return cli.error(_PROGRAM, str(e))
  start = time.time()
  print(f"Sweep: {len(config.variants)} variant(s) x {len(config.seeds)} seed(s) -> "
        f"{config.output_dir}", flush=True)
  try:
    results = sweep.run_sweep(config)
  except KeyboardInterrupt:
    print("Interrupted; rerun the same command to continue the sweep.", file=sys.stderr)
    return 130
  failed = sorted({r["variant"] for r in results["runs"] if r["status"] == "failed"})
  table = os.path.join(config.output_dir, report.MARKDOWN_FILE)
  print(f"Done in {time.time() - start:.0f} s: {table}"
        + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
  return 1 if results.get("stopped") else 0


def run():
  cli.run(_PROGRAM, _define_flags, main)
