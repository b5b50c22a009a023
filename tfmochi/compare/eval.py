"""`python -m tfmochi.compare.eval --model_dir=RUN`: what a comparison sweep measures of one run.

`tfmochi.compare.sweep` starts it once per finished training run (a process of its own, so that a
crash or a kill loses only this run's evaluation). Into RUN it writes

  eval_knn.json                  weighted kNN of the final checkpoint
                                 (`evaluate.evaluate_checkpoint`), with the raw-pixel kNN
                                 and the trainer's random-init kNN beside it
  eval_linear_random_init.json   the linear probe of the network at random initialisation
  eval_linear.json               the linear probe of the final checkpoint
  eval_linear_raw_pixels.json    the same probe on the raw eval views (flattened pixels)
  analysis/report.json           the negatives analysis (`analyze.analyze_run`): alignment,
                                 uniformity, same-class share of the hardest negatives, ...
  analysis_baselines.json        the analysis' same-class shares of the hardest negatives on
                                 the same queue and queries for the network at random
                                 initialisation and for raw pixels (`analysis_baselines`)
  compare_eval.json              the kNN monitor's history over training steps and the seconds

The probes train on centre-view features extracted once (`linear_probe(...,
cache_features=True)`): minutes faster per run than MoCo's protocol (fresh crops every epoch),
and the same for every variant and baseline, but not the paper protocol
(`--nolinear_cache_features` runs the protocol for the networks; raw pixels stay cached). Each
file is skipped when it already holds the run's final step (and the probe's kind), so a killed
evaluation continues where it stopped.
"""

from __future__ import annotations

import glob
import os
import time

from tfmochi import cli

cli.quiet_tensorflow_startup()  # before TensorFlow's first import

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmochi import analyze  # noqa: E402
from tfmochi import augment  # noqa: E402
from tfmochi import checkpoints  # noqa: E402
from tfmochi.analyze import pipeline as analyze_pipeline  # noqa: E402
from tfmochi import data as data_lib  # noqa: E402
from tfmochi import evaluate  # noqa: E402
from tfmochi import rundir  # noqa: E402
from tfmochi import runfiles  # noqa: E402
from tfmochi.compare import report  # noqa: E402

ANALYSIS_DIR = "analysis"
_PROGRAM = "tfmochi.compare.eval"
TRAIN_EVENTS_DIR = "train"  # the trainer's TensorBoard scalars, among them the kNN monitor's


class _PixelBackbone:
  """A weightless "backbone" whose pooled features are the flattened eval view: [b, S*S*3].

  Lets `evaluate.linear_probe` run the very same probe on raw pixels.
  """
  weights = ()

  def __call__(self, images, training=False):
    del training
    return {"pooled": tf.reshape(images, [tf.shape(images)[0], -1])}


def final_step(model_dir: str) -> int:
  """The step of a finished run (summary.json); raises CheckpointError if it has not finished."""
  path = os.path.join(model_dir, runfiles.SUMMARY_FILE)
  if not tf.io.gfile.exists(path):
    raise rundir.CheckpointError(f"{model_dir} has no summary.json: the run has not finished. "
                                   "Train it to its end first (rerun the same train command).")
  return int(rundir.read_json(path)["global_step"])


def _done(path: str, expected: dict) -> bool:
  """Whether the JSON at `path` exists and holds the `expected` values (step, probe kind)."""
  if not tf.io.gfile.exists(path):
    return False
  try:
    found = rundir.read_json(path)
    return all(found.get(key) == value for key, value in expected.items())
  except (ValueError, tf.errors.OpError, AttributeError, TypeError):
    return False  # damaged: compute it again


def knn_history(model_dir: str) -> list[list[float]]:
  """[[step, kNN top-1 %], ...] of the kNN monitor: random init (step 0), every
  `--knn_every_epochs`, and the end, from knn_random_init.json and the trainer's TensorBoard
  scalars. A step logged twice (a resumed run repeats the steps after its last checkpoint)
  keeps its last value."""
  points = {}
  random_init = os.path.join(model_dir, runfiles.KNN_RANDOM_INIT_FILE)
  if tf.io.gfile.exists(random_init):
    points[0] = float(rundir.read_json(random_init)["top1"])
  pattern = os.path.join(model_dir, TRAIN_EVENTS_DIR, "events.out.tfevents.*")
  files = tf.io.gfile.glob(pattern) if "://" in model_dir else glob.glob(pattern)
  for path in sorted(files, key=lambda p: p.rsplit("tfevents.", 1)[-1]):
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.tag == "knn_top1":
            points[int(event.step)] = float(tf.make_ndarray(value.tensor))
    except tf.errors.DataLossError:
      continue  # a file cut short by a kill: its complete records were read
  return [[step, points[step]] for step in sorted(points)]


def raw_pixels_linear(config, settings: evaluate.EvalSettings, strategy=None,
                      progress=None) -> dict:
  """The linear probe of `settings` on the raw eval views of the run's split (`config`)."""
  train, test = evaluate.load_sources(config, settings)
  defaults = evaluate.default_linear_settings(config.dataset)
  result = evaluate.linear_probe(
      _PixelBackbone(), train, test, image_size=config.image_size,
      epochs=settings.linear_epochs or defaults["epochs"], lr=settings.linear_lr,
      batch_size=settings.batch_size, cache_features=True,
      crop_min_scale=defaults["crop_min_scale"], hflip=defaults["hflip"], seed=config.seed,
      strategy=strategy, progress=progress)
  return {**result, "mode": "linear", "feature": "raw_pixels", "checkpoint_step": 0,
          "dataset": train.name, "test_split": test.split, "seed": int(config.seed),
          "image_size": int(config.image_size)}


def _analysis_images(config, num_queries: int):
  """(source, layout, seed) of the images the run's negatives analysis embeds (its defaults:
  the train split, the run's K and seed)."""
  source = data_lib.load(config.dataset, "train", data_dir=config.data_dir,
                         seed=config.held_out_seed,
                         tfrecord_label_offset=config.tfrecord_label_offset)
  # pylint: disable=protected-access  (the analysis' own image selection, not a copy of it)
  layout = analyze_pipeline._Layout.plan(source, config.queue_size, num_queries)
  return source, layout, int(config.seed)


def _eval_view_pixels(source, layout, seed: int, image_size: int) -> dict[str, np.ndarray]:
  """The flattened, L2-normalised eval (centre) views of the analysis' images, in its order:
  the same seeded shuffle and take as `analyze.pipeline._embed`."""
  records = source.records()
  buffer = source.num_examples if records is not None else min(source.num_examples, 10_000)

  def view(ex):
    example = source.decode(ex)
    return {"image": augment.center_view(example["image"], image_size),
            "label": example["label"], "id": example["id"]}

  ds = source.raw().shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=False)
  ds = ds.take(layout.total).map(view).batch(256)
  parts = {"x": [], "label": [], "id": []}
  for batch in ds:
    images = batch["image"]
    parts["x"].append(tf.math.l2_normalize(tf.reshape(images, [tf.shape(images)[0], -1]),
                                           -1).numpy())
    parts["label"].append(batch["label"].numpy())
    parts["id"].append(batch["id"].numpy())
  return {name: np.concatenate(values) for name, values in parts.items()}


def _false_negative_shares(q, k, queue_slice, query_slice, emb, temperature) -> dict:
  """The analysis' false-negative shares (hardest 0.1/1/5%, chance) of one embedding."""
  report = analyze.negatives_report(
      q, k, emb["k"][queue_slice], emb["label"][query_slice], emb["label"][queue_slice],
      temperature, q_ids=emb["id"][query_slice], queue_ids=emb["id"][queue_slice])
  return {key: float(value) for key, value in report["false_negatives"].items()
          if isinstance(value, (int, float))}


def analysis_baselines(model_dir: str, num_queries: int) -> dict:
  """The same-class shares of each query's hardest negatives for the network at random
  initialisation (its projections of the analysis' two augmented views, key encoder = query
  encoder as at step 0) and for the raw pixels (flattened, L2-normalised eval views), on the
  queue and queries of the run's negatives analysis."""
  config = rundir.RunDir(model_dir).read_config()
  source, layout, seed = _analysis_images(config, num_queries)
  encoder, _ = checkpoints.random_init_encoder(model_dir)
  emb = analyze_pipeline._embed(  # pylint: disable=protected-access
      encoder, encoder, source, total=layout.total, query_range=layout.query_range,
      image_size=config.image_size, recipe=config.augmentation,
      crop_scale=(getattr(config, "crop_min_scale", 0.2), 1.0), seed=seed, batch_size=128)
  queue, queries = slice(0, layout.size), slice(*layout.query_range)
  result = {"checkpoint_step": 0, "queue_size": layout.size, "num_queries": layout.num_queries,
            "random_init": _false_negative_shares(emb["q"], emb["k"][queries], queue, queries,
                                                  emb, config.temperature), "raw_pixels": None}
  # Pixels only where the kNN has its raw-pixel baseline too: at 224 px a K x S*S*3 queue is GBs.
  if evaluate.raw_pixels_meaningful(config.image_size):
    pixels = _eval_view_pixels(source, layout, seed, config.image_size)
    if not np.array_equal(pixels["id"], emb["id"]):
      raise analyze.AnalyzeError("The raw-pixel baseline did not get the analysis' images.")
    pixels["k"] = pixels["x"]
    result["raw_pixels"] = _false_negative_shares(pixels["x"][queries], pixels["x"][queries],
                                                  queue, queries, pixels, config.temperature)
  return result


def _steps(model_dir: str, step: int, linear_epochs: int | None, cache_features: bool):
  """(name, output path, what a finished file holds, EvalSettings or None = the analysis), in
  the order they run. The random-init probe comes before the trained one so that
  eval_linear.json records it."""
  linear = dict(mode="linear", linear_cache_features=cache_features, linear_epochs=linear_epochs)
  probe = {"cache_features": cache_features}
  return (
      ("kNN", evaluate.eval_json_path(model_dir, "knn"), {"checkpoint_step": step},
       evaluate.EvalSettings("knn")),
      ("linear probe at random init", evaluate.eval_json_path(model_dir, "linear", True),
       {"checkpoint_step": 0, **probe}, evaluate.EvalSettings(**linear, random_init=True)),
      ("linear probe", evaluate.eval_json_path(model_dir, "linear"),
       {"checkpoint_step": step, **probe}, evaluate.EvalSettings(**linear)),
      ("linear probe on raw pixels", os.path.join(model_dir, report.RAW_PIXELS_LINEAR_FILE),
       {"checkpoint_step": 0}, evaluate.EvalSettings(**linear)),
      ("negatives analysis", os.path.join(model_dir, ANALYSIS_DIR, analyze.REPORT_FILE),
       {"checkpoint_step": step}, None),
      ("negatives analysis at random init and on raw pixels",
       os.path.join(model_dir, report.ANALYSIS_BASELINES_FILE), {"checkpoint_step": 0}, None),
  )


def evaluate_run(model_dir: str, *, strategy=None, linear_epochs: int | None = None,
                 linear_cache_features: bool = True, num_queries: int = 512,
                 progress=print) -> dict:
  """Runs every missing evaluation of a finished run; returns compare_eval.json's content.

  Args:
    model_dir: a finished training run (summary.json).
    strategy: a single-host tf.distribute strategy for kNN and the probes (None: one device).
    linear_epochs: the probes' epochs (None: the data set's default, `evaluate`).
    linear_cache_features: train the probes of the networks on cached centre-view features
      (fast); False: MoCo's protocol (fresh augmented crops every epoch). The raw-pixel probe
      always uses cached pixels.
    num_queries: M, the analysis' queries.
    progress: called with progress lines.
  """
  step = final_step(model_dir)
  config = rundir.RunDir(model_dir).read_config()
  seconds = {}
  for name, path, expected, settings in _steps(model_dir, step, linear_epochs,
                                               linear_cache_features):
    if _done(path, expected):
      continue
    start = time.time()
    progress(f"{model_dir}: {name}...")
    if path.endswith(report.ANALYSIS_BASELINES_FILE):
      rundir.write_json(path, analysis_baselines(model_dir, num_queries))
    elif settings is None:
      analyze.analyze_run(model_dir, os.path.dirname(path), num_queries=num_queries,
                          progress=lambda message: None)
    elif path.endswith(report.RAW_PIXELS_LINEAR_FILE):
      rundir.write_json(path, raw_pixels_linear(config, settings, strategy, lambda m: None))
    else:
      evaluate.evaluate_checkpoint(model_dir, settings, strategy=strategy,
                                   progress=lambda message: None)
    seconds[name] = time.time() - start
  summary = {"checkpoint_step": step, "knn_history": knn_history(model_dir),
             "linear_cache_features": linear_cache_features, "seconds": seconds}
  rundir.write_json(os.path.join(model_dir, report.COMPARE_EVAL_FILE), summary)
  return summary


# -------------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("model_dir", None, "The finished training run to evaluate.")
  flags.DEFINE_integer("linear_epochs", None, "Linear probe epochs (default: the data set's).")
  flags.DEFINE_bool("linear_cache_features", True, "Probe cached centre-view features (fast); "
                    "--nolinear_cache_features: MoCo's protocol (fresh crops every epoch).")
  flags.DEFINE_integer("num_queries", 512, "M, the queries of the negatives analysis.")
  flags.DEFINE_string("strategy", "default", "default, mirrored or tpu (as tfmochi.evaluate).")
  flags.DEFINE_integer("cpu_replicas", 1, "--strategy=mirrored without GPUs: logical CPUs.")
  flags.DEFINE_string("tpu", None, "--strategy=tpu: the TPU name, 'local' on a TPU VM.")


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tfmochi import distribute  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  status = cli.check_invocation(_PROGRAM, argv,
                                required={"model_dir": "the finished run to measure"})
  if status is not None:
    return status
  try:
    strategy = None
    if flag_values.strategy != "default":
      strategy = distribute.make_strategy(flag_values.strategy, tpu=flag_values.tpu,
                                          cpu_replicas=flag_values.cpu_replicas)
    evaluate_run(flag_values.model_dir, strategy=strategy,
                 linear_epochs=flag_values.linear_epochs,
                 linear_cache_features=flag_values.linear_cache_features,
                 num_queries=flag_values.num_queries)
  except (evaluate.EvalError, evaluate.BackboneChangedError, analyze.AnalyzeError,
          rundir.CheckpointError, data_lib.DataError) as e:
    return cli.error(_PROGRAM, str(e))
  return 0


def run():
  cli.run(_PROGRAM, _define_flags, main)


if __name__ == "__main__":
  run()
