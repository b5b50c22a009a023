"""The contrastive objective: from (q, k, queue) to the loss, with every option of the loss family.

This is one MoCo/MoCHi step minus the encoders, as a pure function of tensors
(docs/ALGORITHMS.md §4):

  l_pos = q·k                                   [B]
  l_neg = q·Qᵀ                                  [B, K]  against the queue *before* this step's keys
  masks (-inf): duplicates of the query's own image, same-class entries (class oracle),
                Cai et al.'s hardest-p% removal / keep-only-hardest-p%
  MoCHi: s + s' synthetic logits from each query's top-N (`tfmochi.mixing`, logit space)
  loss over [l_pos | l_neg | l_mix] (`tfmochi.losses`: InfoNCE, debiased, hard, or SupCon), proxy
  accuracy over the same row

From a flag to the loss: `--temperature` is `TrainConfig.moco.objective.temperature`; `MoCo`
passes its `config.objective` here, and `contrastive_objective` hands `config.temperature` to
`losses.contrastive_loss` (or `losses.supcon_from_logits`).

Researchers can call `contrastive_objective` directly with their own encoders; `MoCo.train_step`
calls it inside `strategy.run`. It never reads or writes variables (the queue comes in as
tensors), so it is safe under any tf.distribute strategy and under XLA.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from tfmochi import config as config_lib
from tfmochi import losses as losses_lib
from tfmochi import mixing
from tfmochi import queue as queue_lib

# The objective's config is the branch `config.TrainConfig.moco.objective` (fields documented
# there, checked when built): T, the loss family, the masks and MoCHi's `MochiConfig`.
ObjectiveConfig = config_lib.ObjectiveConfig
LABEL_MODES = config_lib.LABEL_MODES


class ObjectiveOutput(NamedTuple):
  """What `contrastive_objective` returns.

  Attributes:
    loss: [B] per-example loss (float32).
    l_pos: [B] positive cosine logits.
    l_neg: [B, K + s + s'] negative cosine logits as the loss saw them (-inf = removed).
    accuracy: {1: [B], 5: [B]} proxy-task accuracy over the whole row the loss sees (queue and
      MoCHi's synthetic negatives, masks applied), as MoCo's and MoCHi's Acc@k.
    removed_same_class: [B] how many queue entries the class oracle removed (0 otherwise).
    synthesis: the `mixing.Synthesis` (None without MoCHi).
    accuracy_queue: {1: [B], 5: [B]} the same against the (masked) queue entries only: how well
      the query finds its key among real images, whatever MoCHi adds.
  """
  loss: tf.Tensor
  l_pos: tf.Tensor
  l_neg: tf.Tensor
  accuracy: dict
  removed_same_class: tf.Tensor
  synthesis: mixing.Synthesis | None
  accuracy_queue: dict | None = None


class _Masks(NamedTuple):
  """Which queue entries leave the row, and which become positives (SupCon)."""
  remove: tf.Tensor  # [B, K] bool: -inf in l_neg
  positives: tf.Tensor | None  # [B, K] bool, label_mode="supcon" only
  removed_same_class: tf.Tensor  # [B] float32: entries the class oracle removed


def same_entry_mask(query_values: tf.Tensor, queue_values: tf.Tensor) -> tf.Tensor:
  """[B], [K] -> [B, K] bool: True where both are known (>= 0) and equal.

  Compared as int32 (`queue.device_ids`, whose folding of ids beyond int32 may make two samples
  equal: its collision rule), so no 64-bit integer op reaches a TPU's step.
  """
  q = queue_lib.device_ids(query_values)[:, None]
  n = queue_lib.device_ids(queue_values)[None, :]
  return tf.logical_and(tf.equal(q, n), tf.logical_and(q >= 0, n >= 0))


def queue_masks(l_neg: tf.Tensor, config: ObjectiveConfig, *, query_ids=None, queue_ids=None,
                query_labels=None, queue_labels=None) -> _Masks:
  """The masks of the queue logits l_neg [B, K]: duplicates, class oracle, Cai, SupCon positives.

  Order matters: Cai's hardest p% are counted among the entries that are still present, and
  SupCon's positives are the same-class entries that no other mask removed.
  """
  batch = tf.shape(l_neg)[0]
  remove = tf.zeros_like(l_neg, tf.bool)
  if config.mask_duplicates:
    if query_ids is None or queue_ids is None:
      raise ValueError("mask_duplicates needs query_ids and queue_ids.")
    remove = tf.logical_or(remove, same_entry_mask(query_ids, queue_ids))
  same_class = None
  removed_same_class = tf.zeros([batch], tf.float32)
  if config.label_mode != "none":
    if query_labels is None or queue_labels is None:
      raise ValueError(f"label_mode={config.label_mode} needs query_labels and queue_labels.")
    same_class = same_entry_mask(query_labels, queue_labels)  # [B, K]
    if config.label_mode == "oracle":
      removed_same_class = tf.reduce_sum(
          tf.cast(tf.logical_and(same_class, tf.logical_not(remove)), tf.float32), axis=-1)
      remove = tf.logical_or(remove, same_class)
  if config.drop_hardest is not None or config.keep_hardest is not None:
    masked = losses_lib.apply_mask(l_neg, remove)
    remove = tf.logical_or(remove, losses_lib.hardest_negatives_mask(
        masked, drop_hardest=config.drop_hardest, keep_hardest=config.keep_hardest))
  positives = None
  if config.label_mode == "supcon":
    # Same-class entries are positives, not negatives: they stay in the row (not removed) and
    # are marked; Cai-style and duplicate removal still apply to them.
    positives = tf.logical_and(same_class, tf.logical_not(remove))
  return _Masks(remove, positives, removed_same_class)


def _loss(l_pos: tf.Tensor, negatives: tf.Tensor, queue_positives: tf.Tensor | None,
          config: ObjectiveConfig) -> tf.Tensor:
  """[B] loss over the row [l_pos | negatives]; with SupCon, `queue_positives` [B, K] marks the
  first K negatives that are positives too (MoCHi's synthetic points never are)."""
  if config.label_mode != "supcon":
    return losses_lib.contrastive_loss(l_pos, negatives, loss=config.loss,
                                       temperature=config.temperature,
                                       tau_plus=config.tau_plus, hard_beta=config.hard_beta)
  batch = tf.shape(l_pos)[0]
  logits = tf.concat([l_pos[:, None], negatives], axis=1)  # [B, 1 + K (+ s + s')]
  synthetic = tf.zeros([batch, negatives.shape[1] - queue_positives.shape[1]], tf.bool)
  positive_mask = tf.concat([tf.ones([batch, 1], tf.bool), queue_positives, synthetic], axis=1)
  return losses_lib.supcon_from_logits(logits, positive_mask, config.temperature)


def contrastive_objective(q: tf.Tensor, k: tf.Tensor, queue: tf.Tensor, config: ObjectiveConfig,
                          *, seed: tf.Tensor | None = None,
                          mochi_enabled: bool | tf.Tensor = True,
                          query_ids: tf.Tensor | None = None, queue_ids: tf.Tensor | None = None,
                          query_labels: tf.Tensor | None = None,
                          queue_labels: tf.Tensor | None = None,
                          row_offset: int | tf.Tensor = 0, global_rows: int | None = None,
                          return_features: bool = False,
                          jit_compile: bool | None = True) -> ObjectiveOutput:
  """Loss of a batch of queries against their keys and the queue.

  Args:
    q: [B, D] L2-normalised queries (carry the gradient).
    k: [B, D] L2-normalised keys (treated as constants).
    queue: [K, D] the queue before this step's keys are written (a tensor).
    config: the objective.
    seed: [2] stateless seed for MoCHi (required when MoCHi is on).
    mochi_enabled: scalar bool; False during MoCHi's warm-up (same shapes, no retrace).
    query_ids, queue_ids: [B], [K] sample ids for `mask_duplicates`.
    query_labels, queue_labels: [B], [K] labels (-1 unknown) for the label modes.
    row_offset, global_rows: this replica's place in the global batch, so MoCHi draws the same
      synthetic negatives whatever the number of replicas (see `mixing.synthesize`).
    return_features: ask MoCHi for the explicit synthetic features (analysis).
    jit_compile: passed to `mixing.synthesize`.

  Returns:
    An `ObjectiveOutput`.
  """
  q = tf.cast(q, tf.float32)
  k = tf.stop_gradient(tf.cast(k, tf.float32))
  queue = tf.stop_gradient(tf.cast(queue, tf.float32))
  l_pos = tf.reduce_sum(q * k, axis=-1)  # [B]
  l_neg = tf.matmul(q, queue, transpose_b=True)  # [B, K]
  masks = queue_masks(l_neg, config, query_ids=query_ids, queue_ids=queue_ids,
                      query_labels=query_labels, queue_labels=queue_labels)
  l_neg = losses_lib.apply_mask(l_neg, masks.remove)

  synthesis = None
  negatives = l_neg
  if config.mochi.enabled:
    if seed is None:
      raise ValueError("MoCHi needs a seed ([2] int tensor).")
    # SupCon's positives must not be mixed as "hard negatives".
    mix_source = l_neg if masks.positives is None else losses_lib.apply_mask(l_neg,
                                                                              masks.positives)
    synthesis = mixing.synthesize(q, queue, mix_source, seed, config.mochi,
                                  enabled=mochi_enabled, row_offset=row_offset,
                                  global_rows=global_rows, return_features=return_features,
                                  jit_compile=jit_compile)
    negatives = tf.concat([l_neg, synthesis.logits], axis=1)  # [B, K + s + s']

  accuracy = losses_lib.proxy_accuracy(l_pos, negatives)
  accuracy_queue = losses_lib.proxy_accuracy(l_pos, l_neg) if synthesis is not None else accuracy
  return ObjectiveOutput(loss=_loss(l_pos, negatives, masks.positives, config), l_pos=l_pos,
                         l_neg=negatives, accuracy=accuracy,
                         removed_same_class=masks.removed_same_class, synthesis=synthesis,
                         accuracy_queue=accuracy_queue)
