"""`python -m tfmochi.evaluate`: the flags, and `main`, the only reader of them.

Errors (no run, no checkpoint, a data set without labels, bad flags) end the command with one
message and exit status 2 (`tfmochi.cli`).
"""

from __future__ import annotations

import tensorflow as tf

from tfmochi import cli as cli_lib
from tfmochi import data as data_lib
from tfmochi import distribute
from tfmochi import rundir
from tfmochi.evaluate import linear as linear_lib
from tfmochi.evaluate import pipeline
from tfmochi.evaluate import results as results_lib
from tfmochi.evaluate import sidecar as sidecar_lib
from tfmochi.evaluate.features import EvalError

PROGRAM = "tfmochi.evaluate"
EVAL_STRATEGIES = ("default", "mirrored", "tpu")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("model_dir", None, "The training run (holds config.json, checkpoints/).")
  flags.DEFINE_string("mode", "knn", f"One of {', '.join(pipeline.MODES)}.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint prefix (default: the newest readable).")
  flags.DEFINE_integer("knn_k", None, "kNN neighbours; 0 = auto: a tenth of the bank's smallest "
                       "class, at most 200, so that a query's neighbours can all be of its own "
                       "class (default: the run's --knn_k, 0 = auto).")
  flags.DEFINE_float("knn_t", None, "kNN temperature (default: the run's --knn_t, 0.1).")
  flags.DEFINE_integer("linear_epochs", None,
                       f"Linear probe epochs (default {linear_lib.LINEAR_EPOCHS}; 30 for "
                       "quickstart). The lr drops x0.1 at 60% and 80% of them.")
  flags.DEFINE_float("linear_crop_min_scale", None,
                     f"Smallest random-resized-crop area of the probe's training views (default "
                     f"{linear_lib.LINEAR_CROP_MIN_SCALE:g} as in MoCo; 0.5 for quickstart).")
  flags.DEFINE_bool("linear_hflip", None, "Random horizontal flips of the probe's training views "
                    "(default: yes as in MoCo; no for quickstart, whose digits change meaning).")
  flags.DEFINE_float("linear_lr", linear_lib.LINEAR_LR,
                     "Linear probe learning rate (SGD, momentum 0.9).")
  flags.DEFINE_integer("batch_size", linear_lib.LINEAR_BATCH_SIZE, "Batch size (both modes).")
  flags.DEFINE_bool("linear_cache_features", False,
                    "Extract centre-view features once and train the linear classifier on them "
                    "(fast, no augmentation) instead of fresh crops every epoch (the protocol).")
  flags.DEFINE_string("dataset", None, "Evaluate on this data set (default: the run's).")
  flags.DEFINE_string("data_dir", None, "Data directory (default: the run's).")
  flags.DEFINE_integer("seed", None, "Seed of the held-out split tfmochi makes (default: the run's --split_seed).")
  flags.DEFINE_bool("random_init", False,
                    "Evaluate the run's network at its random initialisation (no checkpoint): the "
                    "baseline pretraining must beat. Writes eval_<mode>_random_init.json, which "
                    "later evaluations of the run report next to their own top-1.")
  flags.DEFINE_string("strategy", "default", "Where to run: default (one device), mirrored (all "
                      "local GPUs, or --cpu_replicas logical CPUs) or tpu (--tpu). --batch_size is "
                      "the global batch.")
  flags.DEFINE_integer("cpu_replicas", 1, "--strategy=mirrored without GPUs: logical CPUs.")
  flags.DEFINE_string("tpu", None, "--strategy=tpu: the TPU name, 'local' on a TPU VM, or a "
                      "grpc:// address.")
  flags.DEFINE_bool("sidecar", False, "Follow the run: evaluate each new checkpoint until "
                    "summary.json appears (or --sidecar_timeout).")
  flags.DEFINE_float("sidecar_timeout", 3600.0, "Side-car: give up after this many seconds.")
  flags.DEFINE_float("sidecar_poll_secs", 10.0, "Side-car: how often to look for the end of "
                     "training while no new checkpoint appears.")


def _settings(flag_values) -> pipeline.EvalSettings:
  return pipeline.EvalSettings(
      mode=flag_values.mode, knn_k=flag_values.knn_k, knn_t=flag_values.knn_t,
      linear_epochs=flag_values.linear_epochs, linear_lr=flag_values.linear_lr,
      batch_size=flag_values.batch_size, linear_cache_features=flag_values.linear_cache_features,
      linear_crop_min_scale=flag_values.linear_crop_min_scale,
      linear_hflip=flag_values.linear_hflip, dataset=flag_values.dataset,
      data_dir=flag_values.data_dir, seed=flag_values.seed, random_init=flag_values.random_init)


def _strategy(flag_values) -> tf.distribute.Strategy:
  try:
    return distribute.make_strategy(flag_values.strategy, tpu=flag_values.tpu,
                                    cpu_replicas=flag_values.cpu_replicas)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    raise EvalError(f"--strategy={flag_values.strategy} cannot start: "
                    f"{str(e).splitlines()[0]}") from None


def _evaluate(flag_values, settings: pipeline.EvalSettings) -> dict | None:
  """The result the flags ask for (the side-car's last one); None: the side-car found none."""
  settings.validate()
  strategy = _strategy(flag_values)
  model_dir = flag_values.model_dir
  if not flag_values.sidecar:
    return pipeline.evaluate_checkpoint(model_dir, settings, checkpoint_path=flag_values.checkpoint,
                                        strategy=strategy, progress=print)
  if flag_values.checkpoint:
    raise EvalError("--checkpoint and --sidecar are exclusive (the side-car follows every new "
                    "checkpoint).")
  results = sidecar_lib.run_sidecar(model_dir, settings, timeout=flag_values.sidecar_timeout,
                                    poll_interval=flag_values.sidecar_poll_secs,
                                    strategy=strategy, progress=print)
  return results[-1] if results else None


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  status = cli_lib.check_invocation(PROGRAM, argv, required={"model_dir": "the training run to evaluate"})
  if status is not None:
    return status
  settings, model_dir = _settings(flag_values), flag_values.model_dir
  if flag_values.strategy not in EVAL_STRATEGIES:
    return cli_lib.error(PROGRAM, f"--strategy must be one of {', '.join(EVAL_STRATEGIES)} "
                         f"(evaluation runs on one host); got {flag_values.strategy!r}.")
  try:
    result = _evaluate(flag_values, settings)
  except (EvalError, rundir.CheckpointError, data_lib.DataError,
          linear_lib.BackboneChangedError) as e:
    return cli_lib.error(PROGRAM, str(e))
  if result is None:
    return cli_lib.error(PROGRAM, f"no checkpoint could be evaluated in "
                         f"{rundir.RunDir(model_dir).checkpoint_dir} within "
                         f"--sidecar_timeout={flag_values.sidecar_timeout:g} s.")
  name = "kNN" if settings.mode == "knn" else "Linear"
  what = "random init" if settings.random_init else f"step {result['checkpoint_step']}"
  baseline = results_lib.baselines_text(result,
                                        f"k={result['k']}" if settings.mode == "knn" else "")
  print(f"{name} top-1 {result['top1']:.2f}%{baseline} top-5 {result['top5']:.2f}% on "
        f"{result['dataset']}/{result['test_split']} ({what}, {result['seconds']:.1f} s) -> "
        f"{results_lib.eval_json_path(model_dir, settings.mode, settings.random_init)}",
        flush=True)
  return 0


def run() -> None:
  """Entry point of `python -m tfmochi.evaluate`."""
  cli_lib.run(PROGRAM, _define_flags, main)
