"""MoCo v2 (+ MoCHi): the two encoders, the queue and one training step as a replica function.

`MoCo` owns the query encoder f_q, the momentum (key) encoder f_k and the queue of negatives, and
`MoCo.train_step` is one step of Algorithm 1 of the MoCo paper, written to run inside
`strategy.run` on any tf.distribute strategy (or plainly, without one):

  1. θk ← m·θk + (1−m)·θq                       (before the keys, as MoCo's forward does)
  2. k = normalize(f_k(x_k))                     with shuffle BN across replicas / split BN
  3. q = normalize(f_q(x_q))                     under the gradient tape
  4. loss = objective(q, k, queue snapshot)      InfoNCE / debiased / hard, Cai masks, MoCHi
  5. θq ← SGD(θq, ∇loss + wd·θq)                 PyTorch's SGD momentum and coupled L2
  6. enqueue(all_gather(k))                      after the logits: the step never sees its own keys

The per-replica loss is divided by the *global* batch size (not the local one): the gradients
are summed across replicas, so the sum of per-replica losses must be the global mean. The step
all-reduces the gradients itself and takes one decision for all replicas from the global
gradients (finite or not, float16 overflow or not); a step that is not applied leaves the query
encoder, its momentum buffers and the queue as they were (and, when asked, the BN statistics and
the key encoder too).

Everything random (MoCHi's draws, the shuffle-BN permutation) is a stateless function of
(seed, step), so a step is reproducible and identical on 1 or R replicas for the same global batch,
and with or without XLA (`distribute.replica_step_function`, `--jit_compile`): the step has static
shapes and only ops XLA compiles. Its sorts, scatters and collectives see no 64-bit integer (a TPU
emulates those, and XLA's rewriting of them fails there): the permutation sorts int32 draws, the
queue's ids, labels and pointer are int32, and the key views cross the replicas as uint8.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from tfmochi import augment
from tfmochi import config as config_lib
from tfmochi import distribute
from tfmochi import mixing
from tfmochi import models
from tfmochi import momentum as momentum_lib
from tfmochi import objective as objective_lib
from tfmochi import optimizer as optimizer_lib
from tfmochi import queue as queue_lib

# The config MoCo takes is the branch of the training config (`config.TrainConfig.moco`), checked
# field by field when it is built; its fields are documented there.
MoCoConfig = config_lib.MoCoConfig
BN_MODES = config_lib.BN_MODES
MOMENTUM_SCHEDULES = config_lib.MOMENTUM_SCHEDULES


class MoCo(tf.Module):
  """Query encoder, momentum encoder and queue. Build it inside `strategy.scope()`.

  Args:
    query_encoder: a built Keras model mapping views [b, H, W, 3] to embeddings [b, D].
    key_encoder: the same architecture (built); its weights are overwritten with the query
      encoder's and it is updated by momentum only.
    config: the MoCo configuration (`config.TrainConfig.moco`, its run fields set).
    global_batch_size: the global batch size (all replicas), for the loss scaling; K must be a
      multiple of it (checked here: it is this argument's constraint, not the config's).
  """

  def __init__(self, query_encoder: keras.Model, key_encoder: keras.Model, config: MoCoConfig,
               global_batch_size: int, name: str = "moco"):
    super().__init__(name=name)
    self.config = config.validate(global_batch_size)
    self.global_batch_size = global_batch_size
    self.query_encoder = query_encoder
    self.key_encoder = key_encoder
    models.copy_weights(query_encoder, key_encoder)  # an exact copy, not a fresh init
    # The key encoder is *not* marked trainable=False: in Keras that also freezes its BatchNorm
    # into inference mode, while MoCo's key encoder normalises with batch statistics. It never gets
    # gradients because it runs outside the tape and is not in the optimizer's variable list.
    self.pairs = momentum_lib.weight_pairs(query_encoder, key_encoder)
    self.queue = queue_lib.NegativeQueue(config.queue_size, config.embedding_dim,
                                         seed=config.seed)

  # ----------------------------------------------------------------------------------------------
  def view_input(self, images: tf.Tensor, step: tf.Tensor, stream: int,
                 rows: tf.Tensor | None = None) -> tf.Tensor:
    """The encoders' input from views [n, H, W, 3]: `augment.to_model_input`, or with
    `config.device_augment` the recipe's photometric ops first (`augment.device_view_input`),
    drawn per image from (seed, step, stream: 0 queries / 1 keys, its global batch row). `rows`
    [n] are those rows (default: this replica's own, replica_id·n + i)."""
    if self.config.device_augment is None:
      return augment.to_model_input(images)
    if rows is None:
      n = images.shape[0]
      rows = tf.cast(distribute.replica_context_info()[1], tf.int32) * n + tf.range(n)
    return augment.device_view_input(images, rows, recipe=self.config.device_augment,
                                     seed=self.config.seed, step=step, stream=stream,
                                     num_rows=self.global_batch_size)

  def momentum_at(self, step: tf.Tensor) -> tf.Tensor:
    """m for this step (constant, or the cosine schedule towards 1)."""
    if self.config.momentum_schedule == "cosine":
      return momentum_lib.cosine_momentum(step, self.config.total_steps, self.config.momentum)
    return tf.constant(self.config.momentum, tf.float32)

  def mochi_enabled_at(self, step: tf.Tensor) -> tf.Tensor:
    """False during MoCHi's warm-up (a tensor: no retracing when it flips)."""
    return tf.cast(step, tf.int64) >= self.config.mochi_warmup_steps

  def encode_keys(self, images: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """k = normalize(f_k(x_k)) with MoCo's shuffle BN: [b, H, W, 3] -> [b, D] float32, detached.

    `images` are the key views as the input pipeline sends them, uint8 (normalised here, after
    the shuffle's gather and the selection of this replica's rows: the replicas exchange a quarter
    of the bytes of float32 images), or floats already normalised (`augment.to_model_input`).

    With R > 1 replicas and bn_mode "shuffle"/"split", the key images of the whole global batch are
    all-gathered, permuted with a permutation shared by every replica (a stateless function of
    (seed, step), so no broadcast is needed), each replica encodes its slice of the permuted
    batch, and the keys are all-gathered again and un-permuted (only two gathers per step, as in
    MoCo). On one device, "split" permutes the batch before the split-BN encoder so that the BN
    groups of the keys differ from those of the queries; "shuffle" on one device is a no-op. The
    indices come from `shuffle_bn_indices`, whose shapes are static under XLA.
    """
    num_replicas, replica_id = distribute.replica_context_info()
    shuffle = self.config.bn_mode in ("shuffle", "split") and (
        num_replicas > 1 or self.config.bn_mode == "split")
    if not shuffle:
      k = self.key_encoder(self.view_input(images, step, 1), training=True)
      return tf.stop_gradient(tf.math.l2_normalize(tf.cast(k, tf.float32), axis=-1))
    b = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
    mine, back = shuffle_bn_indices(self.config.seed, step, replica_id, num_replicas, b)
    all_images = distribute.all_gather(images)  # [R·b, H, W, 3], uint8 as it came
    k = self.key_encoder(self.view_input(tf.gather(all_images, mine), step, 1, rows=mine),
                         training=True)
    k = tf.math.l2_normalize(tf.cast(k, tf.float32), axis=-1)
    all_k = distribute.all_gather(k)  # [R·b, D] in permuted order
    return tf.stop_gradient(tf.gather(all_k, back))

  # ----------------------------------------------------------------------------------------------
  def train_step(self, batch: dict, optimizer: optimizer_lib.SGD, step: tf.Tensor,
                 skip_nonfinite: bool = False,
                 loss_scale: optimizer_lib.DynamicLossScale | None = None) -> dict:
    """One MoCo/MoCHi step for this replica's batch. Call inside `strategy.run` (or plainly).

    The gradients are all-reduced here, once, and every decision is taken from the global
    gradients and loss, so all replicas apply the same update (or all skip it). A step whose
    global loss or gradient is non-finite never updates the query encoder or its momentum buffers
    and never writes the queue; whether training goes on is the caller's choice (`finite`).

    Args:
      batch: {"view1": [b, H, W, 3] query views (uint8, normalised here, or already normalised
        floats), "view2": key views, optional "id" [b] and "label" [b] (-1 unknown): int32, as
        the trainer's input pipeline sends them (`queue.device_ids`; wider ints are folded into
        int32 in the step)}.
      optimizer: a `tfmochi.optimizer.SGD` built on `query_encoder.trainable_variables` (inside
        the strategy scope); its learning rate is taken at `step`.
      step: the global step (scalar int tensor) *before* this update. It drives the learning
        rate, the momentum schedule, MoCHi's warm-up and the random draws; a skipped step still
        counts (the caller advances it whatever happens).
      skip_nonfinite: make a step that is not applied an exact no-op: the BatchNorm statistics
        of both encoders and the key encoder's weights (moved by the momentum update at the start
        of the step) are put back as they were. Costs a copy of those variables per step.
      loss_scale: float16 dynamic loss scaling (implies the restoring of `skip_nonfinite`): the
        loss is scaled, the all-reduced gradients unscaled; a finite loss with non-finite
        gradients is an overflow of the scale (skipped, counted in "loss_scale_skip", the scale
        halves), not a non-finite step.

    Returns:
      Per-replica metrics, see `_metrics`.
    """
    # uint8 views from the input pipeline are normalised on the device: the queries here, the keys
    # in `encode_keys` after shuffle BN's gather (which moves them as uint8).
    batch = dict(batch, view1=self.view_input(batch["view1"], step, 0))
    # Read before the forward passes and the momentum update, to undo them on a skipped step.
    saved = self._save_moving_state() if (skip_nonfinite or loss_scale is not None) else None
    m = self.momentum_at(step)
    # 1. momentum update before the keys are computed (MoCo's order).
    with tf.control_dependencies([momentum_lib.momentum_update(self.pairs, m)]):
      k = self.encode_keys(batch["view2"], step)
    # 2. the queue as it was before this step (the enqueue below is ordered after this read).
    queue_keys, queue_ids, queue_labels = self.queue.snapshot()
    variables = self.query_encoder.trainable_variables
    with tf.GradientTape() as tape:
      out, loss = self._objective(batch, k, (queue_keys, queue_ids, queue_labels), step)
      scaled = loss * loss_scale.scale if loss_scale is not None else loss
    grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
             for g, v in zip(tape.gradient(scaled, variables), variables)]
    grads, decision = self._global_decision(grads, loss, loss_scale)
    lr = self._apply_gradients(grads, variables, optimizer, step, decision, loss_scale)
    if saved is not None:
      self._restore_unless(decision.applied, saved)
    # 3. enqueue after the logits (ordered after the snapshot by automatic control deps).
    self.queue.enqueue(k, batch.get("id"), batch.get("label"), enabled=decision.applied)
    return self._metrics(out, loss, decision, lr, m)

  def _objective(self, batch: dict, k: tf.Tensor, queue: tuple, step: tf.Tensor):
    """(ObjectiveOutput, this replica's share of the global-batch mean loss), under the tape."""
    replica_id = distribute.replica_context_info()[1]
    queue_keys, queue_ids, queue_labels = queue
    b = tf.shape(batch["view1"])[0]
    q = self.query_encoder(batch["view1"], training=True)
    q = tf.math.l2_normalize(tf.cast(q, tf.float32), axis=-1)
    out = objective_lib.contrastive_objective(
        q, k, queue_keys, self.config.objective, seed=mixing.step_seed(self.config.seed, step),
        mochi_enabled=self.mochi_enabled_at(step), query_ids=batch.get("id"),
        queue_ids=queue_ids, query_labels=batch.get("label"), queue_labels=queue_labels,
        row_offset=tf.cast(replica_id, tf.int32) * b, global_rows=self.global_batch_size)
    # Divided by the global batch: the gradients are summed over replicas.
    return out, tf.reduce_sum(out.loss) / self.global_batch_size

  def _global_decision(self, grads: list, loss: tf.Tensor,
                       loss_scale: optimizer_lib.DynamicLossScale | None):
    """All-reduces (grads, loss) once and decides from the global values: the same on every
    replica. Returns (global unscaled grads, `_Decision`)."""
    ctx = tf.distribute.get_replica_context()
    global_loss = loss
    if ctx is not None and distribute.replica_context_info()[0] > 1:
      grads, global_loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, (grads, loss))
    if loss_scale is not None:
      scale = tf.convert_to_tensor(loss_scale.scale)
      grads = [g / tf.cast(scale, g.dtype) for g in grads]  # (1/2^127 would be subnormal)
    finite_loss = tf.math.is_finite(global_loss)
    finite_grads = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    applied = tf.logical_and(finite_loss, finite_grads)
    overflow = tf.constant(False)
    if loss_scale is not None:
      overflow = tf.logical_and(tf.logical_and(finite_loss, tf.logical_not(finite_grads)),
                                loss_scale.can_overflow())
    return grads, _Decision(applied, finite_loss, finite_grads, overflow)

  def _apply_gradients(self, grads: list, variables: list, optimizer: optimizer_lib.SGD,
                       step: tf.Tensor, decision: "_Decision",
                       loss_scale: optimizer_lib.DynamicLossScale | None) -> tf.Tensor:
    """θq ← SGD(θq, ∇ + wd·θq) when the step is applied; updates the loss scale. Returns lr."""
    if self.config.weight_decay:
      # Coupled L2 (PyTorch SGD's weight_decay) on the global, unscaled gradient: ∇ += wd·θ.
      grads = [g + tf.cast(self.config.weight_decay, g.dtype) * tf.convert_to_tensor(v)
               for g, v in zip(grads, variables)]
    lr = optimizer.learning_rate_at(step)
    optimizer.apply(grads, variables, lr, enabled=decision.applied)
    if loss_scale is not None:
      loss_scale.update(decision.finite_grads, enabled=decision.finite_loss)
    return lr

  def _save_moving_state(self) -> tuple[list, list]:
    """(variables, their values now): the BN statistics of both encoders and θk, which the
    forward passes and the momentum update move before the step knows whether it applies."""
    variables = (self.query_encoder.non_trainable_variables
                 + self.key_encoder.non_trainable_variables + [k_var for k_var, _ in self.pairs])
    return variables, [tf.identity(v) for v in variables]

  @staticmethod
  def _restore_unless(applied: tf.Tensor, saved: tuple[list, list]) -> None:
    """Puts the `_save_moving_state` variables back when the step is not applied."""
    def put_back():
      for var, old in zip(*saved):
        var.assign(old)
      return tf.constant(False)

    tf.cond(applied, lambda: tf.constant(True), put_back)

  def _metrics(self, out: objective_lib.ObjectiveOutput, loss: tf.Tensor, decision: "_Decision",
               lr: tf.Tensor, m: tf.Tensor) -> dict:
    """Per-replica metrics, divided so that a SUM across replicas gives the global value.

    "loss", "acc1", "acc5" (over the whole row the loss sees, synthetic negatives included),
    "acc1_queue", "hardest_negative", "synthetic_logit" (with MoCHi), "removed_same_class",
    "finite" (1 unless the global loss or gradient is non-finite; a loss-scale overflow is not),
    "finite_loss", "loss_scale_skip", "lr", "momentum".
    """
    num_replicas = distribute.replica_context_info()[0]
    gb = float(self.global_batch_size)
    finite = tf.logical_or(decision.applied, decision.overflow)
    metrics = {
        "loss": loss,
        "acc1": tf.reduce_sum(out.accuracy[1]) / gb,
        "acc5": tf.reduce_sum(out.accuracy[5]) / gb,
        "acc1_queue": tf.reduce_sum(out.accuracy_queue[1]) / gb,
        # Hardness of the negatives: the hardest queue negative per query, averaged.
        "hardest_negative": tf.reduce_sum(_row_max(out.l_neg_queue)) / gb,
        "removed_same_class": tf.reduce_sum(out.removed_same_class) / gb,
        # Global decisions (the same on every replica): 1.0 after the SUM over replicas.
        "finite": tf.cast(finite, tf.float32) / num_replicas,
        "finite_loss": tf.cast(decision.finite_loss, tf.float32) / num_replicas,
        "loss_scale_skip": tf.cast(decision.overflow, tf.float32) / num_replicas,
        "lr": lr / num_replicas,
        "momentum": m / num_replicas,
    }
    if out.synthesis is not None:
      syn = out.synthesis.logits
      present = tf.math.is_finite(syn)
      mean_syn = tf.math.divide_no_nan(
          tf.reduce_sum(tf.where(present, syn, 0.0)), tf.reduce_sum(tf.cast(present, tf.float32)))
      metrics["synthetic_logit"] = mean_syn / num_replicas
    return metrics


class _Decision(NamedTuple):
  """What a step decides from the global loss and gradients (the same on every replica)."""
  applied: tf.Tensor  # bool: loss and gradients finite, the update is applied
  finite_loss: tf.Tensor  # bool
  finite_grads: tf.Tensor  # bool
  overflow: tf.Tensor  # bool: a float16 loss-scale overflow (skipped, not a non-finite step)


def shuffle_bn_indices(seed: int | tf.Tensor, step: tf.Tensor, replica_id: int | tf.Tensor,
                       num_replicas: int | tf.Tensor, per_replica: int | tf.Tensor
                       ) -> tuple[tf.Tensor, tf.Tensor]:
  """Shuffle BN's gather indices for one replica: (mine [b], back [b]) int32.

  A permutation π of the R·b rows of the global batch, a stateless function of (seed, step) and so
  the same on every replica without a broadcast. Replica r encodes the global rows
  `mine = π[r·b:(r+1)·b]`, and after all-gathering every replica's keys (in permuted order) takes
  its own rows back at `back = π⁻¹[r·b:(r+1)·b]`.

  Both slices are rows r of π and π⁻¹ reshaped to [R, b] (a gather, not a slice at an offset
  computed from the replica id), so under XLA every shape is static: R and b are compile-time
  constants and only the replica id is data. The permutation sorts random *integers* (with a
  stable sort): TF's kernels and XLA turn random bits into floats differently, but draw the same
  integers, so the compiled and the plain step shuffle alike. They are int32: a TPU emulates
  64-bit integers and XLA cannot rewrite a 64-bit sort (ties, about (R·b)²/2^33 of them per step,
  keep the order of their rows: the sort is stable on both sides).

  Args:
    seed: the run seed.
    step: the global step (scalar int tensor).
    replica_id: r in [0, R).
    num_replicas: R (static under XLA).
    per_replica: b, the per-replica batch (static under XLA).
  """
  pair = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
  pair = tf.random.experimental.stateless_fold_in(pair, 0x5B, alg="philox")
  n = num_replicas * per_replica
  draws = tf.random.stateless_uniform([n], pair, minval=None, maxval=None, dtype=tf.int32,
                                      alg="philox")
  perm = tf.argsort(draws, stable=True)  # [R·b] int32
  inverse = tf.argsort(perm, stable=True)
  shape = tf.stack([num_replicas, per_replica])
  r = tf.cast(replica_id, tf.int32)
  mine = tf.gather(tf.reshape(perm, shape), r)
  back = tf.gather(tf.reshape(inverse, shape), r)
  return mine, back


def _row_max(x: tf.Tensor) -> tf.Tensor:
  """Max over the last axis, 0 for a row with no finite entry: [B, M] -> [B]."""
  m = tf.reduce_max(x, axis=-1)
  return tf.where(tf.math.is_finite(m), m, tf.zeros_like(m))
