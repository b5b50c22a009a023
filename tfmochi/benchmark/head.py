"""`--what=head`: the contrastive head alone, MoCo and MoCHi(N, s, s') interleaved."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tfmochi import config as config_lib
from tfmochi.benchmark import timing

# MoCHi's paper setting, used by --what=head when the flags leave MoCHi off (N = 0).
PAPER_MOCHI = (1024, 1024, 512)


def head_inputs(batch_size: int, queue_size: int, dim: int, seed: int = 0) -> dict:
  """Random L2-normalised q, k [B, D], a queue [K, D], and ids/labels that never collide."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def unit(shape, stream):
    return tf.math.l2_normalize(tf.random.stateless_normal(shape, [seed, stream]), axis=-1)

  return {
      "q": unit([batch_size, dim], 1), "k": unit([batch_size, dim], 2),
      "queue": unit([queue_size, dim], 3),
      "query_ids": tf.range(batch_size, dtype=tf.int64),
      "queue_ids": tf.range(batch_size, batch_size + queue_size, dtype=tf.int64),
      "query_labels": tf.fill([batch_size], tf.constant(-1, tf.int64)),
      "queue_labels": tf.fill([queue_size], tf.constant(-1, tf.int64)),
  }


def make_objective_fn(objective_config, inputs: dict, jit_compile: bool = False,
                      objective_jit: bool = True) -> Callable[[], object]:
  """A zero-argument callable: one forward + backward (w.r.t. q) of `contrastive_objective`.

  The inputs are captured as arguments of a `tf.function` (not constants), so nothing is folded.
  `jit_compile` compiles the whole head with XLA (as `--jit_compile` or a TPU does: the top-N is
  then XLA's TopK, or its ApproxTopK with `--mochi_topn=approx`). `objective_jit=False` runs the
  objective as plain TensorFlow ops with autodiff instead of its own compiled pieces.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfmochi import objective as objective_lib  # pylint: disable=g-import-not-at-top

  @tf.function(jit_compile=jit_compile)
  def step(q, k, queue, query_ids, queue_ids, query_labels, queue_labels):
    with tf.GradientTape() as tape:
      tape.watch(q)
      out = objective_lib.contrastive_objective(
          q, k, queue, objective_config, seed=tf.constant([1, 2], tf.int64), query_ids=query_ids,
          queue_ids=queue_ids, query_labels=query_labels, queue_labels=queue_labels,
          jit_compile=objective_jit)
      loss = tf.reduce_mean(out.loss)
    return loss, tape.gradient(loss, q)

  return lambda: step(**inputs)


def bench_head(config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
               compare_topn: bool = False, compare_plain: bool = False) -> dict:
  """Times the contrastive head for MoCo and MoCHi, interleaved, in this process.

  Args:
    config: B = batch_size, K = queue_size, D = embedding_dim, the objective (temperature, loss,
      masks) and MoCHi's (N, s, s', --mochi_topn); when N = 0 the paper's (1024, 1024, 512) is
      used (N <= K).
    warmup: untimed calls per variant.
    timed: timed calls per variant.
    compare_topn: also time the MoCHi head compiled whole by XLA (XLA:CPU here, the TPU's
      compiler elsewhere) with the exact top-N ("mochi_xla_exact": TopK) and the approximate one
      ("mochi_xla_approx": ApproxTopK at --mochi_topn_recall).
    compare_plain: also time both heads as plain TensorFlow ops with autodiff ("moco_plain",
      "mochi_plain"; `contrastive_objective(jit_compile=False)`).

  Returns:
    The JSON-able result (see `main`).
  """
  from tfmochi import mixing  # pylint: disable=g-import-not-at-top

  objective_config = config.moco.objective
  mochi = objective_config.mochi
  if not mochi.enabled:
    n, s, s2 = PAPER_MOCHI
    mochi = mixing.MochiConfig(min(n, config.queue_size), s, s2, config.mochi_beta_max,
                               top_n=config.mochi_topn, top_n_recall=config.mochi_topn_recall)
  inputs = head_inputs(config.batch_size, config.queue_size, config.embedding_dim, config.seed)
  configs = {"moco": dataclasses.replace(objective_config, mochi=mixing.MochiConfig(0, 0, 0)),
             "mochi": dataclasses.replace(objective_config, mochi=mochi)}
  variants = {name: make_objective_fn(cfg, inputs) for name, cfg in configs.items()}
  if compare_plain:
    variants.update({f"{name}_plain": make_objective_fn(cfg, inputs, objective_jit=False)
                     for name, cfg in configs.items()})
  if compare_topn:
    for top_n in mixing.TOP_N_METHODS:
      variants[f"mochi_xla_{top_n}"] = make_objective_fn(
          dataclasses.replace(objective_config, mochi=dataclasses.replace(mochi, top_n=top_n)),
          inputs, jit_compile=True)
  results = timing.run_interleaved(variants, warmup=warmup, timed=timed)
  out = {"what": "head", **timing.summarize(results, config.batch_size)}
  out["config"] = {"batch_size": config.batch_size, "queue_size": config.queue_size,
                   "embedding_dim": config.embedding_dim, "temperature": config.temperature,
                   "loss": config.loss, "mask_duplicates": config.mask_duplicates,
                   "label_mode": config.label_mode,
                   "mochi": [mochi.num_hard, mochi.num_mix, mochi.num_query_mix],
                   "mochi_topn": mochi.top_n, "mochi_topn_recall": mochi.top_n_recall}
  return out
