"""The contrastive head: from (q, k, queue) to the loss, with every option of the loss family.

This is one MoCo/MoCHi step minus the encoders, as a pure function of tensors:

  l_pos = q·k                                   [B]
  l_neg = q·Qᵀ                                  [B, K]  against the queue *before* this step's keys
  masks (-inf): duplicates of the query's own image, same-class entries (class oracle),
                Cai et al.'s hardest-p% removal / keep-only-hardest-p%
  MoCHi: s + s' synthetic logits from each query's top-N (XLA-compiled, logit space)
  loss over [l_pos | l_neg | l_mix] (InfoNCE, debiased, hard, or SupCon), proxy accuracy over the
  same row

Researchers can call `contrastive_head` directly with their own encoders; the trainer calls it
inside `strategy.run`. It never reads or writes variables (the queue comes in as tensors), so it is
safe under any tf.distribute strategy and under XLA.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import tensorflow as tf

from tfmochi import losses as losses_lib
from tfmochi import mixing

LABEL_MODES = ("none", "oracle", "supcon")

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Everything that defines the contrastive objective.

  Attributes:
    temperature: T.
    loss: "infonce" | "debiased" | "hard".
    tau_plus: τ+ of the debiased and hard losses.
    hard_beta: β of the hard loss.
    drop_hardest: Cai et al.: remove the hardest p% of the queue negatives per query (or None).
    keep_hardest: Cai et al.: keep only the hardest p% of the queue negatives per query (or None).
    mochi: MoCHi(N, s, s') (N = 0 disables it).
    mask_duplicates: remove queue entries whose sample id equals the query's (-1 never matches).
    label_mode: "none" (self-supervised), "oracle" (remove same-class queue entries, and so the
      synthetic points built from them) or "supcon" (same-class queue entries become positives;
      SupCon's L_out averaged over the positives). Unknown labels (-1) never match.
  """
  temperature: float = 0.2
  loss: str = "infonce"
  tau_plus: float = 0.1
  hard_beta: float = 1.0
  drop_hardest: float | None = None
  keep_hardest: float | None = None
  mochi: mixing.MochiConfig = dataclasses.field(
      default_factory=lambda: mixing.MochiConfig(0, 0, 0))
  mask_duplicates: bool = False
  label_mode: str = "none"

  def validate(self, queue_size: int | None = None) -> "HeadConfig":
    """Raises ValueError naming the argument and its allowed range; returns self."""
    losses_lib.check_temperature(self.temperature)
    losses_lib.check_loss_name(self.loss)
    losses_lib.check_tau_plus(self.tau_plus)
    losses_lib.check_hard_beta(self.hard_beta)
    if self.drop_hardest is not None and self.keep_hardest is not None:
      raise ValueError("drop_hardest and keep_hardest are exclusive: give at most one.")
    if self.drop_hardest is not None:
      losses_lib.check_percent("drop_hardest", self.drop_hardest)
    if self.keep_hardest is not None:
      losses_lib.check_percent("keep_hardest", self.keep_hardest)
    if self.label_mode not in LABEL_MODES:
      raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}; got "
                       f"{self.label_mode!r}.")
    if self.label_mode == "supcon" and self.loss != "infonce":
      raise ValueError("label_mode=supcon replaces the loss by SupCon; use loss=infonce with it.")
    self.mochi.validate(queue_size)
    return self


class HeadOutput(NamedTuple):
  """What `contrastive_head` returns.

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


def same_entry_mask(query_values: tf.Tensor, queue_values: tf.Tensor) -> tf.Tensor:
  """[B], [K] -> [B, K] bool: True where both are known (>= 0) and equal."""
  q = tf.cast(query_values, tf.int64)[:, None]
  n = tf.cast(queue_values, tf.int64)[None, :]
  return tf.logical_and(tf.equal(q, n), tf.logical_and(q >= 0, n >= 0))


def contrastive_head(q: tf.Tensor, k: tf.Tensor, queue: tf.Tensor, config: HeadConfig, *,
                     seed: tf.Tensor | None = None, mochi_enabled: bool | tf.Tensor = True,
                     query_ids: tf.Tensor | None = None, queue_ids: tf.Tensor | None = None,
                     query_labels: tf.Tensor | None = None,
                     queue_labels: tf.Tensor | None = None,
                     row_offset: int | tf.Tensor = 0, global_rows: int | None = None,
                     return_features: bool = False,
                     jit_compile: bool | None = True) -> HeadOutput:
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
    A `HeadOutput`.
  """
  q = tf.cast(q, tf.float32)
  k = tf.stop_gradient(tf.cast(k, tf.float32))
  queue = tf.stop_gradient(tf.cast(queue, tf.float32))
  l_pos = tf.reduce_sum(q * k, axis=-1)  # [B]
  l_neg = tf.matmul(q, queue, transpose_b=True)  # [B, K]
  batch = tf.shape(q)[0]

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
  if config.label_mode == "supcon":
    # Same-class entries are positives, not negatives: keep them in the row (not removed) and
    # mark them; Cai-style/duplicate removal still applies to them.
    positives_queue = tf.logical_and(same_class, tf.logical_not(remove))
  l_neg = losses_lib.apply_mask(l_neg, remove)

  synthesis = None
  negatives = l_neg
  if config.mochi.enabled:
    if seed is None:
      raise ValueError("MoCHi needs a seed ([2] int tensor).")
    # In supcon mode the same-class entries must not be mixed as "hard negatives".
    mix_source = l_neg
    if config.label_mode == "supcon":
      mix_source = losses_lib.apply_mask(l_neg, positives_queue)
    synthesis = mixing.synthesize(q, queue, mix_source, seed, config.mochi,
                                  enabled=mochi_enabled, row_offset=row_offset,
                                  global_rows=global_rows, return_features=return_features,
                                  jit_compile=jit_compile)
    negatives = tf.concat([l_neg, synthesis.logits], axis=1)  # [B, K + s + s']

  accuracy = losses_lib.proxy_accuracy(l_pos, negatives)
  accuracy_queue = losses_lib.proxy_accuracy(l_pos, l_neg) if synthesis is not None else accuracy
  if config.label_mode == "supcon":
    logits = tf.concat([l_pos[:, None], negatives], axis=1)  # [B, 1 + K (+ s + s')]
    extra = tf.zeros([batch, negatives.shape[1] - l_neg.shape[1]], tf.bool)
    positive_mask = tf.concat([tf.ones([batch, 1], tf.bool), positives_queue, extra], axis=1)
    loss = losses_lib.supcon_from_logits(logits, positive_mask, config.temperature)
  else:
    loss = losses_lib.contrastive_loss(l_pos, negatives, loss=config.loss,
                                       temperature=config.temperature,
                                       tau_plus=config.tau_plus, hard_beta=config.hard_beta)
  return HeadOutput(loss=loss, l_pos=l_pos, l_neg=negatives, accuracy=accuracy,
                    removed_same_class=removed_same_class, synthesis=synthesis,
                    accuracy_queue=accuracy_queue)
