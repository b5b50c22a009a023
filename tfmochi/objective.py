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
tensors), so it is safe under any tf.distribute strategy and under XLA. By default it compiles
itself with XLA in two pieces around MoCHi's top-N and returns the loss with q's gradient
computed alongside it (`_parts`; docs/DESIGN.md, "The objective under XLA").
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import tensorflow as tf

from tfmochi import config as config_lib
from tfmochi import losses as losses_lib
from tfmochi import mixing
from tfmochi import queue as queue_lib
from tfmochi import topn

# The objective's config is the branch `config.TrainConfig.moco.objective` (fields documented
# there, checked when built): T, the loss family, the masks and MoCHi's `MochiConfig`.
ObjectiveConfig = config_lib.ObjectiveConfig
LABEL_MODES = config_lib.LABEL_MODES
# The k of the logged proxy accuracy Acc@k (MoCo logs Acc@1 and Acc@5).
_TOPK = (1, 5)


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
    l_neg_queue: [B, K] the queue's part of l_neg (masks applied), without the synthetic logits.
  """
  loss: tf.Tensor
  l_pos: tf.Tensor
  l_neg: tf.Tensor
  accuracy: dict
  removed_same_class: tf.Tensor
  synthesis: mixing.Synthesis | None
  accuracy_queue: dict | None = None
  l_neg_queue: tf.Tensor | None = None


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


def _loss(l_pos: tf.Tensor, negatives: tuple, queue_positives: tf.Tensor | None,
          config: ObjectiveConfig) -> tf.Tensor:
  """[B] loss over the row [l_pos | negatives] (blocks [B, K] and [B, s + s'], see
  `losses.as_blocks`); with SupCon, `queue_positives` [B, K] marks the first K negatives that are
  positives too (MoCHi's synthetic points never are)."""
  if config.label_mode != "supcon":
    return losses_lib.contrastive_loss(l_pos, negatives, loss=config.loss,
                                       temperature=config.temperature,
                                       tau_plus=config.tau_plus, hard_beta=config.hard_beta)
  negatives = tf.concat(negatives, axis=1)
  batch = tf.shape(l_pos)[0]
  logits = tf.concat([l_pos[:, None], negatives], axis=1)  # [B, 1 + K (+ s + s')]
  synthetic = tf.zeros([batch, negatives.shape[1] - queue_positives.shape[1]], tf.bool)
  positive_mask = tf.concat([tf.ones([batch, 1], tf.bool), queue_positives, synthetic], axis=1)
  return losses_lib.supcon_from_logits(logits, positive_mask, config.temperature)


def _front(q: tf.Tensor, k: tf.Tensor, queue: tf.Tensor, query_ids, queue_ids, query_labels,
           queue_labels, *, config: ObjectiveConfig):
  """l_pos [B], the masked queue logits l_neg [B, K], SupCon's positives [B, K] (or None) and
  removed_same_class [B]: everything before MoCHi's top-N."""
  q = tf.cast(q, tf.float32)
  k = tf.stop_gradient(tf.cast(k, tf.float32))
  queue = tf.stop_gradient(tf.cast(queue, tf.float32))
  l_pos = tf.reduce_sum(q * k, axis=-1)  # [B]
  l_neg = tf.matmul(q, queue, transpose_b=True)  # [B, K]
  masks = queue_masks(l_neg, config, query_ids=query_ids, queue_ids=queue_ids,
                      query_labels=query_labels, queue_labels=queue_labels)
  return l_pos, losses_lib.apply_mask(l_neg, masks.remove), masks.positives, \
      masks.removed_same_class


def _tail(q: tf.Tensor, k: tf.Tensor, queue: tf.Tensor, l_pos: tf.Tensor, l_neg: tf.Tensor,
          positives, hard, seed, enabled, row_offset, *, config: ObjectiveConfig,
          global_rows: int | None, return_features: bool, with_jacobian: bool):
  """MoCHi's synthesis, the loss and the proxy ranks, from the front's logits and the top-N.

  Returns (loss [B], the synthesis' tensors or None, rank over the queue [B], rank over the
  synthetic negatives [B], J [B, D] or None); the ranks give Acc@k without a second pass over
  [B, K + s + s']. With `with_jacobian`, J = ∂(Σ_b loss_b)/∂q through l_pos = q·k, l_neg = q·Qᵀ
  and MoCHi's direct use of q: row b of the loss depends on q_b alone, so row b of J is
  ∂loss_b/∂q_b and the gradient for any upstream dy [B] is dy[:, None]·J.
  """
  q = tf.cast(q, tf.float32)
  tape = (tf.GradientTape(watch_accessed_variables=False) if with_jacobian
          else contextlib.nullcontext())
  with tape:
    if with_jacobian:
      tape.watch([q, l_pos, l_neg])
    syn = z_hard = None
    negatives = (l_neg,)  # blocks of the row (losses_lib.as_blocks): no [B, K + s + s'] copy
    rank_syn = tf.zeros_like(l_pos, tf.int32)
    if config.mochi.enabled:
      mix_source = l_neg if positives is None else losses_lib.apply_mask(l_neg, positives)
      if with_jacobian:
        # The synthetic logits reach l_neg through their top-N logits: taken here as a variable
        # of their own, their gradient is [B, N] and is added into ∂/∂l_neg below, instead of
        # autodiff's zero-filled [B, K] buffer, scatter and add (two passes over [B, K]).
        z_hard = tf.gather(tf.stop_gradient(tf.cast(mix_source, tf.float32)), hard,
                           batch_dims=1)
        tape.watch(z_hard)
      syn = mixing.synthesize_from_hardest(q, queue, mix_source, hard, seed, config.mochi,
                                           enabled=enabled, row_offset=row_offset,
                                           global_rows=global_rows,
                                           return_features=return_features, z_hard=z_hard)
      syn = syn._replace(hard_indices=None)  # the caller has it; an output would be a copy
      negatives = (l_neg, syn.logits)  # [B, K] and [B, s + s']
      rank_syn = losses_lib.proxy_rank(l_pos, syn.logits)
    loss = _loss(l_pos, negatives, positives, config)
    total = tf.reduce_sum(loss)
  jacobian = None
  if with_jacobian:
    sources = [q, l_pos, l_neg] + ([z_hard] if z_hard is not None else [])
    grads = tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    g_q, g_pos, g_neg = grads[:3]
    if z_hard is not None:  # the top-N entries of each row are distinct: one addition each
      rows = tf.broadcast_to(tf.range(tf.shape(hard)[0])[:, None], tf.shape(hard))
      g_neg = tf.tensor_scatter_nd_add(g_neg, tf.stack([rows, hard], axis=-1), grads[3])
    k = tf.stop_gradient(tf.cast(k, tf.float32))
    queue = tf.stop_gradient(tf.cast(queue, tf.float32))
    jacobian = g_q + g_pos[:, None] * k + tf.matmul(g_neg, queue)  # [B, D]
  return loss, syn, losses_lib.proxy_rank(l_pos, l_neg), rank_syn, jacobian


@tf.custom_gradient
def _with_gradient(q: tf.Tensor, loss: tf.Tensor, jacobian: tf.Tensor):
  """loss [B] (a constant) made to carry the gradient dy[:, None]·J [B, D] to q [B, D]."""
  def grad(dy):
    return dy[:, None] * jacobian, None, None
  return tf.identity(loss), grad


@functools.lru_cache(maxsize=None)
def _parts(config: ObjectiveConfig, global_rows: int | None, return_features: bool,
           compiled: bool):
  """(front, tail) for one objective: plain Python functions, or tf.functions compiled by XLA.

  Compiled, each part is one XLA computation, and the tail computes q's gradient together with
  the loss (`_tail`'s J): the log-sum-exp, its gradient, the masks and the proxy ranks fuse into
  a few passes over [B, K], instead of one kernel and one [B, K] buffer per operation, and no
  [B, K] activation is kept for a backward pass (the gradient of a compiled tf.function called
  from plain TensorFlow is not compiled with it). The top-N between the two stays outside: on a
  CPU the chunked exact selection of `tfmochi.topn` is several times faster than XLA's TopK.
  """
  front = functools.partial(_front, config=config)
  tail = functools.partial(_tail, config=config, global_rows=global_rows,
                           return_features=return_features, with_jacobian=compiled)
  if not compiled:
    return front, tail
  compile_ = functools.partial(tf.function, jit_compile=True, reduce_retracing=True,
                               autograph=False)
  return compile_(front), compile_(tail)


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
    jit_compile: True: two XLA computations around MoCHi's top-N, q's gradient computed with
      the loss (only `loss` carries a gradient, to q; see `_parts`). False or None: plain ops,
      every output differentiable (for callers that never differentiate the loss). Inside XLA
      (`--jit_compile`, TPU), or without XLA for the CPU (tensorflow-tpu's wheel): plain ops.

  Returns:
    An `ObjectiveOutput`.
  """
  mochi = config.mochi
  if mochi.enabled:
    if seed is None:
      raise ValueError("MoCHi needs a seed ([2] int tensor).")
    mochi.validate(queue_size=queue.shape[0])
  plain = jit_compile is None or topn.inside_xla()
  compiled = not plain and bool(jit_compile) and topn.host_xla_available()
  front, tail = _parts(config, global_rows, bool(return_features), compiled)
  q = tf.cast(q, tf.float32)
  # Compiled, the tail returns q's gradient itself: the logits enter it as constants.
  q_front = tf.stop_gradient(q) if compiled else q
  l_pos, l_neg, positives, removed_same_class = front(q_front, k, queue, query_ids, queue_ids,
                                                      query_labels, queue_labels)
  hard = None
  if mochi.enabled:
    # SupCon's positives must not be mixed as "hard negatives".
    mix_source = l_neg if positives is None else losses_lib.apply_mask(l_neg, positives)
    hard = mixing.hardest_indices(mix_source, mochi, inside_xla=plain)
    seed = tf.convert_to_tensor(seed)
  loss, syn, rank_queue, rank_syn, jacobian = tail(
      q_front, k, queue, l_pos, l_neg, positives, hard, seed,
      tf.convert_to_tensor(mochi_enabled, tf.bool), tf.convert_to_tensor(row_offset, tf.int32))
  if compiled:
    loss = _with_gradient(q, loss, jacobian)
  return _output(loss, l_pos, l_neg, removed_same_class, syn, hard, rank_queue, rank_syn)


def _output(loss, l_pos, l_neg, removed_same_class, syn, hard, rank_queue, rank_syn
            ) -> ObjectiveOutput:
  """The `ObjectiveOutput` of the tail's results: the full row of negatives and Acc@k."""
  negatives = l_neg
  if syn is not None:
    syn = syn._replace(hard_indices=hard)
    negatives = tf.concat([l_neg, syn.logits], axis=1)  # [B, K + s + s']; pruned when unused
  rank = rank_queue + rank_syn
  accuracy = {t: tf.cast(rank < t, tf.float32) for t in _TOPK}
  accuracy_queue = ({t: tf.cast(rank_queue < t, tf.float32) for t in _TOPK} if syn is not None
                    else accuracy)
  return ObjectiveOutput(loss=loss, l_pos=l_pos, l_neg=negatives, accuracy=accuracy,
                         removed_same_class=removed_same_class, synthesis=syn,
                         accuracy_queue=accuracy_queue, l_neg_queue=l_neg)
