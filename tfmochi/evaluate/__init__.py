"""Evaluates a run's backbone: weighted kNN and MoCo's linear probe, once or as a side-car.

`python -m tfmochi.evaluate --model_dir=RUN --mode=knn|linear [--sidecar]` restores the query
encoder of a training run (config.json + checkpoints/) and writes <model_dir>/eval_<mode>.json
(top1, top5 in %, the settings, a history of every checkpoint evaluated) and TensorBoard scalars
under <model_dir>/eval. `--random_init` evaluates the run's network as the trainer initialised it
into eval_<mode>_random_init.json: the baseline pretraining must beat.

Modules, one job each:

  features   pooled backbone features in inference mode, on one device or over a single-host
             strategy's replicas (padded batches, gathered back in order)
  knn        weighted kNN of the L2-normalised features (MoCo's monitor: `auto_k`, `knn_accuracy`,
             `knn_eval`) + the raw-pixel baseline
  linear     MoCo's linear probe (main_lincls.py) with its sanity check of the frozen backbone
  results    eval_<mode>.json with its history, TensorBoard scalars, the random-init baseline
  pipeline   one checkpoint of a run: EvalSettings, restore, the run's data, evaluate, record
  sidecar    follow a running job and evaluate each checkpoint it writes
  cli        the command line (`tfmochi.cli` conventions: one message and exit status 2 on errors)

The library functions (`knn_eval`, `linear_probe`, `evaluate_checkpoint`, `run_sidecar`) take
explicit arguments and never read flags; every public name is importable from this package.
"""

from tfmochi import cli as _cli

_cli.quiet_tensorflow_startup()  # before TensorFlow's first import: `python -m` loads this first

# pylint: disable=g-import-not-at-top,g-bad-import-order
from tfmochi.accuracy import topk_accuracy  # noqa: E402
from tfmochi.evaluate.features import (  # noqa: E402
    EvalError, Progress, backbone_of, check_strategy, extract_pooled, padded_batches,
    pooled_feature_fn, require_labels)
from tfmochi.evaluate.knn import (  # noqa: E402
    AUTO_K_FRACTION, AUTO_K_MAX, RAW_PIXELS_MAX_SIZE, auto_k, eval_view_pixels, knn_accuracy,
    knn_eval, knn_predict_scores, raw_pixels_meaningful, stored_pixels)
from tfmochi.evaluate.linear import (  # noqa: E402
    LINEAR_BATCH_SIZE, LINEAR_CROP_MIN_SCALE, LINEAR_EPOCHS, LINEAR_INIT_STD, LINEAR_LR,
    LINEAR_MILESTONES, LINEAR_MOMENTUM, BackboneChangedError, default_linear_settings,
    linear_lr, linear_milestones, linear_probe, sanity_check, snapshot_weights)
from tfmochi.evaluate.results import (  # noqa: E402
    EVAL_SUBDIR, RANDOM_INIT_SUFFIX, baselines_text, eval_json_path, random_init_result,
    write_eval_scalars)
from tfmochi.evaluate.pipeline import (  # noqa: E402
    MODES, EvalSettings, evaluate_checkpoint, load_sources)
from tfmochi.evaluate.sidecar import run_sidecar, training_finished  # noqa: E402
from tfmochi.evaluate.cli import EVAL_STRATEGIES, main, run  # noqa: E402
