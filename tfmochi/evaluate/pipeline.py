"""One checkpoint of a run, evaluated: settings, restore, the run's data, kNN or probe, record.

`evaluate_checkpoint(model_dir, EvalSettings(mode=...))` restores the query encoder of a training
run (config.json + checkpoints/), or rebuilds the network as the trainer initialised it
(`random_init`: same architecture and weight seed, no checkpoint needed), evaluates it on the
run's data set (or another) and records the result (`results`). Settings left None take the
run's value from its config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses

import tensorflow as tf

from tfmochi import checkpoints
from tfmochi import data as data_lib
from tfmochi.evaluate import features as features_lib
from tfmochi.evaluate import knn as knn_eval_lib
from tfmochi.evaluate import linear as linear_lib
from tfmochi.evaluate import results as results_lib
from tfmochi.evaluate.features import EvalError, Progress

MODES = ("knn", "linear")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What `evaluate_checkpoint` does. None means "the run's value" (from its config.json).

  Attributes:
    mode: "knn" or "linear".
    knn_k, knn_t: kNN neighbours (0 = auto) and temperature (None: the run's --knn_k /
      --knn_t).
    linear_epochs, linear_crop_min_scale, linear_hflip: None: the data set's default
      (`default_linear_settings`: MoCo's 100 epochs, crops 0.08-1, flips; quickstart 30, 0.5-1,
      no flips).
    linear_lr, batch_size, linear_cache_features: see `linear_probe`.
    dataset, data_dir: evaluate on another data set / location than the run's.
    seed: None: the run's seed (it also fixes the quickstart held-out split).
    random_init: evaluate the run's network at its random initialisation (the trainer's weight
      seed, no checkpoint) instead of a checkpoint: the baseline that pretraining must beat.
  """
  mode: str = "knn"
  knn_k: int | None = None
  knn_t: float | None = None
  linear_epochs: int | None = None
  linear_lr: float = linear_lib.LINEAR_LR
  batch_size: int = linear_lib.LINEAR_BATCH_SIZE
  linear_cache_features: bool = False
  linear_crop_min_scale: float | None = None
  linear_hflip: bool | None = None
  dataset: str | None = None
  data_dir: str | None = None
  seed: int | None = None
  random_init: bool = False

  def validate(self) -> "EvalSettings":
    """Raises EvalError naming the bad value; returns self."""
    problems = []
    if self.mode not in MODES:
      problems.append(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
    if self.knn_k is not None and self.knn_k < 0:
      problems.append(f"--knn_k must be >= 1 (or 0 = auto); got {self.knn_k}")
    if self.knn_t is not None and not self.knn_t > 0:
      problems.append(f"--knn_t must be > 0; got {self.knn_t}")
    if self.linear_epochs is not None and self.linear_epochs < 1:
      problems.append(f"--linear_epochs must be >= 1; got {self.linear_epochs}")
    if not self.linear_lr > 0:
      problems.append(f"--linear_lr must be > 0; got {self.linear_lr}")
    if self.linear_crop_min_scale is not None and not 0 < self.linear_crop_min_scale <= 1:
      problems.append("--linear_crop_min_scale must be in (0, 1]; got "
                      f"{self.linear_crop_min_scale}")
    if self.batch_size < 1:
      problems.append(f"--batch_size must be >= 1; got {self.batch_size}")
    if problems:
      raise EvalError("; ".join(problems) + ".")
    return self

  def linear_options(self, dataset: str) -> dict:
    """{"epochs", "crop_min_scale", "hflip"}: these settings over `dataset`'s defaults."""
    defaults = linear_lib.default_linear_settings(self.dataset or dataset)
    return {"epochs": self.linear_epochs or defaults["epochs"],
            "crop_min_scale": (defaults["crop_min_scale"] if self.linear_crop_min_scale is None
                               else self.linear_crop_min_scale),
            "hflip": defaults["hflip"] if self.linear_hflip is None else self.linear_hflip}


def load_sources(config, settings: EvalSettings) -> tuple[data_lib.DataSource,
                                                          data_lib.DataSource]:
  """The (train, held-out) splits to evaluate on: the run's data set unless overridden."""
  dataset = settings.dataset or config.dataset
  data_dir = settings.data_dir if settings.data_dir is not None else config.data_dir
  seed = config.held_out_seed if settings.seed is None else settings.seed
  offset = getattr(config, "tfrecord_label_offset", 1)
  train = data_lib.load(dataset, "train", data_dir=data_dir, seed=seed,
                        tfrecord_label_offset=offset)
  test = data_lib.load(dataset, "test", data_dir=data_dir, seed=seed,
                       tfrecord_label_offset=offset)
  what = "kNN evaluation" if settings.mode == "knn" else "The linear probe"
  features_lib.require_labels(train, what)
  features_lib.require_labels(test, what)
  return train, test


def _restore(model_dir: str, settings: EvalSettings, checkpoint_path: str | None,
             strategy: tf.distribute.Strategy | None):
  """(encoder, config, step, path): the checkpoint's, or the random-init network's (0, None)."""
  if settings.random_init and checkpoint_path is not None:
    raise EvalError("--random_init evaluates the network before training; it takes no "
                    "--checkpoint.")
  with strategy.scope() if strategy is not None else contextlib.nullcontext():
    if settings.random_init:
      encoder, config = checkpoints.random_init_encoder(model_dir)
      return encoder, config, 0, None
    return checkpoints.restore_encoder(model_dir, checkpoint_path)


def _evaluate_mode(encoder, config, train: data_lib.DataSource, test: data_lib.DataSource,
                   settings: EvalSettings, *, seed: int, step: int,
                   strategy: tf.distribute.Strategy | None, progress: Progress | None) -> dict:
  """The kNN or linear-probe result of `encoder` (see `knn_eval` / `linear_probe`)."""
  if settings.mode == "knn":
    return knn_eval_lib.knn_eval(
        encoder, train, test, image_size=config.image_size,
        k=settings.knn_k if settings.knn_k is not None else config.knn_k,
        t=settings.knn_t if settings.knn_t is not None else config.knn_t,
        batch_size=settings.batch_size, strategy=strategy)
  options = settings.linear_options(config.dataset)
  what = "the random-init network" if settings.random_init else f"step {step}"
  features_lib.say(progress, f"Linear probe of {what}: {options['epochs']} epochs, lr "
                   f"{settings.linear_lr:g}, batch {settings.batch_size}, "
                   + ("cached centre-view features" if settings.linear_cache_features
                      else f"random-resized-crop ({options['crop_min_scale']:g}-1)"
                      + (" + flip" if options["hflip"] else ", no flip")
                      + " views (backbone run every epoch)"))
  return linear_lib.linear_probe(encoder, train, test, image_size=config.image_size,
                                 lr=settings.linear_lr, batch_size=settings.batch_size,
                                 cache_features=settings.linear_cache_features, seed=seed,
                                 strategy=strategy, progress=progress, **options)


def evaluate_checkpoint(model_dir: str, settings: EvalSettings, *,
                        checkpoint_path: str | None = None,
                        sources: tuple[data_lib.DataSource, data_lib.DataSource] | None = None,
                        strategy: tf.distribute.Strategy | None = None,
                        progress: Progress | None = None, write: bool = True) -> dict:
  """Evaluates one checkpoint of a run and records the result.

  Args:
    model_dir: the training run (config.json, checkpoints/).
    settings: what to run (validated here).
    checkpoint_path: a checkpoint prefix (default: the newest readable one).
    sources: (train, test) data to use instead of loading the run's data set.
    strategy: a single-host strategy to spread the evaluation over (the encoder is built in its
      scope); None: one device.
    progress: called with progress lines (default: absl logging).
    write: write eval_<mode>.json and the TensorBoard scalars.

  Returns:
    The result dict: top1, top5 (%), checkpoint_step, checkpoint, mode, random_init, dataset,
    image_size, arch, the mode's settings (see `knn_eval` / `linear_probe`) and, when the run
    has a random-init result of this mode (`random_init_result`), random_init_top1.

  Raises:
    rundir.CheckpointError: no run, no checkpoint, or an unreadable one.
    EvalError: bad settings or unlabelled data.
    data.DataError: the data set cannot be loaded.
    BackboneChangedError: the linear probe changed the backbone.
  """
  settings.validate()
  strategy = features_lib.check_strategy(strategy, settings.batch_size)
  encoder, config, step, path = _restore(model_dir, settings, checkpoint_path, strategy)
  train, test = sources if sources is not None else load_sources(config, settings)
  if sources is not None:
    features_lib.require_labels(train, f"{settings.mode} evaluation")
    features_lib.require_labels(test, f"{settings.mode} evaluation")
  seed = config.held_out_seed if settings.seed is None else settings.seed
  result = _evaluate_mode(encoder, config, train, test, settings, seed=seed, step=step,
                          strategy=strategy, progress=progress)
  result = {**result, "mode": settings.mode, "checkpoint_step": int(step), "checkpoint": path,
            "random_init": bool(settings.random_init), "model_dir": model_dir,
            "dataset": train.name, "train_split": train.split, "test_split": test.split,
            "image_size": int(config.image_size), "arch": config.arch, "feature": "pooled",
            "seed": int(seed), "replicas": strategy.num_replicas_in_sync if strategy else 1}
  if not settings.random_init:
    baseline = results_lib.random_init_result(model_dir, settings.mode)
    if baseline is not None:
      result["random_init_top1"] = float(baseline["top1"])
  if write:
    results_lib.record(model_dir, result)
  return result
