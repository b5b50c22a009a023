"""The negatives analysis of a run's checkpoint, end to end: `analyze_run`.

Set-up (as in training): K images give the queue, keys = L2-normalised projections of one
augmented view by the momentum (key) encoder (the query encoder if the checkpoint has none); M
queries = the query encoder's projections of the *other* view. Queries are other images than the
queue's when the data set has K + M images; otherwise they are queue images and each query's own
key is removed from its negatives (the duplicate mask of `--mask_duplicates`). Both encoders run
in inference mode. MoCHi is the run's MoCHi(N, s, s'), or MoCHi(min(1024, K/8), 1024, 512) when
the run had it off. `report.negatives_report` measures, `render` draws; report.json is written
last: an analysis is complete once it exists (a rerun into the same OUT deletes it before
writing anything, `rundir.begin_directory`).
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from tfmochi import augment
from tfmochi import build
from tfmochi import checkpoints
from tfmochi import data as data_lib
from tfmochi import mixing
from tfmochi import rundir
from tfmochi.analyze import render
from tfmochi.analyze import wordnet
from tfmochi.analyze.report import AnalyzeError, ClassSimilarity, negatives_report
from tfmochi.evaluate.features import Progress

REPORT_FILE = "report.json"


def check_output_dir(output_dir: str) -> None:
  """Creates output_dir and proves it is writable; raises AnalyzeError otherwise."""
  try:
    rundir.check_writable(output_dir, "--output_dir")
  except rundir.RunDirError as e:
    raise AnalyzeError(str(e)) from None


def _restore_key_encoder(config, checkpoint_path: str):
  """The run's momentum encoder from a checkpoint, or None when it has none."""
  encoder = build.build_run_encoder(config, "key_encoder")
  try:
    tf.train.Checkpoint(key_encoder=encoder).read(checkpoint_path).expect_partial() \
        .assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError):
    return None
  return encoder


def mochi_for_analysis(config, queue_size: int) -> tuple[mixing.MochiConfig, str]:
  """The run's MoCHi(N, s, s'), or MoCHi(min(1024, K/8), 1024, 512) when it had MoCHi off.

  N is capped at K (the analysis queue may be smaller than the run's). Returns (config, a note
  saying which it is).
  """
  run = config.moco.objective.mochi
  mochi = mixing.MochiConfig(run.num_hard, run.num_mix, run.num_query_mix, run.beta_max)
  note = "(the run's)"
  if not mochi.enabled:
    mochi = mixing.MochiConfig(max(1, min(1024, queue_size // 8)), 1024, 512)
    note = "(defaults: the run had MoCHi off)"
  return dataclasses.replace(mochi, num_hard=min(mochi.num_hard, queue_size)), note


def _embed(query_encoder, key_encoder, source: data_lib.DataSource, *, total: int,
           query_range: tuple[int, int], image_size: int, recipe: str,
           crop_scale: tuple[float, float], seed: int, batch_size: int) -> dict[str, np.ndarray]:
  """Keys of `total` seeded-random images, queries for the images in query_range.

  Returns:
    {"k": [total, D], "q": [M, D] (L2-normalised), "label": [total], "id": [total]}.
  """
  records = source.records()
  buffer = source.num_examples if records is not None else min(source.num_examples, 10_000)
  key = tf.constant([seed, 7], tf.int64)

  def views(ex):
    example = source.decode(ex)
    view_q, view_k = augment.two_views(
        example["image"], image_size,
        tf.random.experimental.stateless_fold_in(key, example["id"]), recipe, crop_scale)
    return {"view_q": view_q, "view_k": view_k, "label": example["label"], "id": example["id"]}

  ds = source.raw().shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=False)
  ds = ds.take(total).map(views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]
  embed_q = tf.function(lambda x: tf.math.l2_normalize(query_encoder(x, training=False), -1),
                        input_signature=spec)
  embed_k = tf.function(lambda x: tf.math.l2_normalize(key_encoder(x, training=False), -1),
                        input_signature=spec)
  out = {"k": [], "q": [], "label": [], "id": []}
  q_start, q_end = query_range
  position = 0
  for batch in ds:
    n = int(batch["id"].shape[0])
    out["k"].append(embed_k(batch["view_k"]).numpy())
    lo, hi = max(position, q_start), min(position + n, q_end)
    if lo < hi:
      out["q"].append(embed_q(batch["view_q"][lo - position:hi - position]).numpy())
    out["label"].append(batch["label"].numpy())
    out["id"].append(batch["id"].numpy())
    position += n
  if position < total:
    raise AnalyzeError(f"{source.name}/{source.split} yielded only {position} of the {total} "
                       "images the analysis needs.")
  return {name: np.concatenate(parts) for name, parts in out.items()}


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Which embedded images are the queue (the first K) and which the M queries."""
  size: int  # K
  num_queries: int  # M
  disjoint: bool  # queries are other images than the queue's
  total: int  # images to embed
  query_range: tuple[int, int]  # the queries' positions among them

  @classmethod
  def plan(cls, source: data_lib.DataSource, queue_size: int, num_queries: int) -> "_Layout":
    n = source.num_examples
    size = min(queue_size, n)
    if size < 2:
      raise AnalyzeError(f"{source.name}/{source.split} has {n} images; the analysis needs >= 2.")
    m = min(num_queries, n)
    disjoint = size + m <= n
    return cls(size, m, disjoint, size + m if disjoint else max(size, m),
               (size, size + m) if disjoint else (0, m))

  def describe(self, source: data_lib.DataSource) -> str:
    return (f"{self.total} images of {source.name}/{source.split} (queue K={self.size}, queries "
            f"M={self.num_queries}, "
            f"{'disjoint images' if self.disjoint else 'same images, own key masked'})")


def _labelled_source(config, model_dir: str, checkpoint_path: str | None, *, split: str,
                     dataset: str | None, data_dir: str | None,
                     source: data_lib.DataSource | None) -> data_lib.DataSource:
  """The data to embed, after the cheap checks (a checkpoint exists, the data are labelled)."""
  if checkpoint_path is None and not rundir.RunDir(model_dir).list_checkpoints():
    checkpoints.restore_encoder(model_dir)  # raises its clear "no checkpoint yet" message
  if source is None:
    source = data_lib.load(dataset, split, data_dir=data_dir, seed=config.held_out_seed,
                           tfrecord_label_offset=config.tfrecord_label_offset)
  if not source.has_labels:
    raise AnalyzeError(f"{source.name}/{source.split} has no labels; the analysis needs them "
                       "(false negatives are same-class negatives). Use a labelled data set.")
  return source


def _encoders(model_dir: str, checkpoint_path: str | None):
  """(query encoder, key encoder, which the keys come from, config, step, checkpoint path)."""
  query_encoder, config, step, path = checkpoints.restore_encoder(model_dir, checkpoint_path)
  key_encoder = _restore_key_encoder(config, path)
  key_source = "momentum (key) encoder"
  if key_encoder is None:
    key_encoder, key_source = query_encoder, "query encoder (the checkpoint has no key encoder)"
  return query_encoder, key_encoder, key_source, config, step, path


def _measure(emb: dict[str, np.ndarray], layout: _Layout, config, *, dataset: str,
             data_dir: str | None, seed: int, class_similarity: ClassSimilarity | None) -> dict:
  """`negatives_report` of the embedded queue and queries, noting MoCHi's and WordNet's source."""
  size, qs = layout.size, slice(*layout.query_range)
  run_mochi, mochi_source = mochi_for_analysis(config, size)
  sem_message = None
  if class_similarity is None:
    class_similarity, sem_message = wordnet.semantic_similarity_fn(dataset, data_dir)
  report = negatives_report(emb["q"], emb["k"][qs], emb["k"][:size], emb["label"][qs],
                            emb["label"][:size], config.temperature, q_ids=emb["id"][qs],
                            queue_ids=emb["id"][:size], mochi=run_mochi, seed=seed,
                            class_similarity=class_similarity)
  report["mochi"]["source"] = mochi_source
  if report["semantic_similarity"] is None:
    report["semantic_similarity"] = {"available": False, "message": sem_message}
  return report


def _write(report: dict, output_dir: str) -> None:
  """The plots, index.html and, last (the completion marker), report.json."""
  rundir.begin_directory(output_dir, REPORT_FILE)  # an earlier analysis there: now incomplete
  plots = render.write_plots(report, output_dir)
  report["plots"] = plots
  report["html"] = render.HTML_FILE
  render.write_html(report, output_dir, plots)
  rundir.write_json(os.path.join(output_dir, REPORT_FILE), report)  # the marker, last


def _check_sizes(num_queries: int, queue_size: int | None, batch_size: int) -> None:
  if num_queries < 1 or (queue_size is not None and queue_size < 2) or batch_size < 1:
    raise AnalyzeError(f"--num_queries must be >= 1, --queue_size >= 2 and --batch_size >= 1; got "
                       f"{num_queries}, {queue_size}, {batch_size}.")


def analyze_run(model_dir: str, output_dir: str, *, checkpoint_path: str | None = None,
                num_queries: int = 512, queue_size: int | None = None, seed: int | None = None,
                split: str = "train", batch_size: int = 128, dataset: str | None = None,
                data_dir: str | None = None, source: data_lib.DataSource | None = None,
                class_similarity: ClassSimilarity | None = None,
                progress: Progress | None = None) -> dict:
  """The whole analysis of a run's checkpoint: report.json, the PNGs and index.html.

  Args:
    model_dir: the training run.
    output_dir: where to write (created; may be gs://).
    checkpoint_path: a checkpoint prefix (default: the newest readable one).
    num_queries: M (capped by the data set).
    queue_size: K (default: the run's --queue_size); capped by the data set.
    seed: image selection, views and MoCHi draws (default: the run's seed).
    split: data split to embed.
    batch_size: images per forward pass.
    dataset, data_dir: another data set / location than the run's.
    source: a DataSource to use instead of loading one.
    class_similarity: (class_a, class_b) -> similarity, for the semantic analysis (default:
      WordNet Wu-Palmer for ImageNet data sets when available).
    progress: progress lines (default: absl logging).

  Returns:
    The report (also in output_dir/report.json).

  Raises:
    AnalyzeError, rundir.CheckpointError, data.DataError.
  """
  say = progress or (lambda message: logging.info("%s", message))
  _check_sizes(num_queries, queue_size, batch_size)
  check_output_dir(output_dir)
  start = time.time()
  config = rundir.RunDir(model_dir).read_config()  # cheap checks first, then the model
  data_dir = config.data_dir if data_dir is None else data_dir
  source = _labelled_source(config, model_dir, checkpoint_path, split=split,
                            dataset=dataset or config.dataset, data_dir=data_dir, source=source)
  query_encoder, key_encoder, key_source, config, step, path = _encoders(model_dir,
                                                                         checkpoint_path)
  seed = config.seed if seed is None else seed
  layout = _Layout.plan(source, queue_size or config.moco.queue_size, num_queries)
  say(f"Embedding {layout.describe(source)} with the checkpoint of step {step}...")
  emb = _embed(query_encoder, key_encoder, source, total=layout.total,
               query_range=layout.query_range, image_size=config.image_size,
               recipe=config.augmentation,
               crop_scale=(getattr(config, "crop_min_scale", 0.2), 1.0), seed=seed,
               batch_size=batch_size)
  say("Measuring the negatives...")
  report = _measure(emb, layout, config, dataset=source.name, data_dir=data_dir, seed=seed,
                    class_similarity=class_similarity)
  report["run"] = {"model_dir": model_dir, "checkpoint": path, "checkpoint_step": int(step),
                   "dataset": source.name, "split": source.split, "arch": config.arch,
                   "image_size": int(config.image_size), "augmentation": config.augmentation,
                   "keys": key_source, "queries_disjoint_from_queue": bool(layout.disjoint),
                   "seed": int(seed)}
  report["checkpoint_step"] = int(step)
  report["seconds"] = float(time.time() - start)
  _write(report, output_dir)
  return report
