"""MoCHi: hard negative mixing at the feature level (Kalantidis et al., NeurIPS 2020).

For each query q (L2-normalised, [D]) and the queue Q = {n_1..n_K} (L2-normalised, [K, D]):

  1. Q̃^N = the N queue entries with the largest q·n (that query's hardest negatives; found by
     `tfmochi.topn`).
  2. s synthetic negatives  h_k  = normalize(α·n_i + (1−α)·n_j),  α ~ U(0, 1),
     with i, j drawn uniformly (independently, with replacement) from *that query's* Q̃^N.
  3. s' synthetic negatives h'_k = normalize(β·q + (1−β)·n_j),     β ~ U(0, β_max), β_max <= 0.5,
     with j drawn uniformly from Q̃^N and q detached (stop_gradient).
  4. The logits q·h/T and q·h'/T are appended to the K queue logits. The synthetic points are
     constants (no gradient reaches them or the queue) and never enter the queue.

Logit-space synthesis (why this is fast). Nothing here materialises the [B, s, D] synthetic
features during training. With z_j = q·n_j the queue logits already computed for the loss:

  q·h  = (α z_i + (1−α) z_j) / ‖α n_i + (1−α) n_j‖,
         ‖·‖² = α² + (1−α)² + 2α(1−α)·n_i·n_j
  q·h' = (β q·q + (1−β) z_j) / ‖β q + (1−β) n_j‖,
         ‖·‖² = β²‖q‖² + (1−β)² + 2β(1−β)·z_j

so only the s row-wise dot products n_i·n_j are new work (gathers that XLA fuses into a reduction),
instead of s + s' new D-dimensional features and a [B, s+s', D] batched matmul. The gradient is
the same as with detached features: ∂(q·h)/∂q = h because the norms are constants, and the
gradient of z reaches q through the queue matmul. `return_features=True` additionally builds the
explicit h, h' (for tests and analysis); both paths agree to float32 precision.

Randomness is stateless: a `seed` tensor of shape [2] (derive it with `step_seed(seed, step,
replica)`) fully determines i, j, α and β, so runs are reproducible and resumable, and a replica's
draws differ from another replica's. All shapes are static, so the warm-up period (no synthesis)
is a boolean tensor that masks the synthetic logits to -inf and never retraces.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import tensorflow as tf

from tfmochi import config as config_lib
from tfmochi import losses
from tfmochi import topn

_NEG_INF = float("-inf")
# One explicit RNG algorithm: "auto_select" picks different generators with and without XLA, so the
# same seed would draw different negatives in eager and compiled code.
_ALG = tf.random.Algorithm.PHILOX
# How each query's top-N is found (MochiConfig.top_n); see `tfmochi.topn`.
TOP_N_METHODS = topn.METHODS
# MoCHi(N, s, s') is the branch `config.TrainConfig.moco.objective.mochi` (fields documented
# there, checked when built).
MochiConfig = config_lib.MochiConfig


class Synthesis(NamedTuple):
  """What `synthesize` returns.

  Attributes:
    logits: [B, s + s'] cosine logits q·h (first s) and q·h' (last s'); -inf where disabled or
      where a source negative was absent (-inf in l_neg).
    hard_indices: [B, N] queue indices of each query's N hardest negatives (unsorted).
    mix_indices: [B, s, 2] queue indices (i, j) of each type-1 point.
    alpha: [B, s] α of each type-1 point.
    query_mix_indices: [B, s'] queue index j of each type-2 point.
    beta: [B, s'] β of each type-2 point.
    features: [B, s + s', D] the synthetic points h, h' (only with return_features=True, else None).
  """
  logits: tf.Tensor
  hard_indices: tf.Tensor
  mix_indices: tf.Tensor
  alpha: tf.Tensor
  query_mix_indices: tf.Tensor
  beta: tf.Tensor
  features: tf.Tensor | None = None


def step_seed(seed: int | tf.Tensor, step: tf.Tensor, replica_id: int | tf.Tensor = 0) -> tf.Tensor:
  """A stateless RNG seed [2] int64 for one (run seed, step, replica)."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(replica_id, tf.int64), alg=_ALG)


def mix_pair_logits(z_i: tf.Tensor, z_j: tf.Tensor, n_ij: tf.Tensor,
                    alpha: tf.Tensor) -> tf.Tensor:
  """q·h for h = normalize(α n_i + (1−α) n_j), from z_i = q·n_i, z_j = q·n_j and n_i·n_j.

  All arguments broadcast together (e.g. [B, s]); the norm is a constant for the gradient.
  """
  norm = tf.sqrt(tf.maximum(alpha * alpha + (1 - alpha) ** 2 + 2 * alpha * (1 - alpha) * n_ij,
                            1e-12))
  return (alpha * z_i + (1 - alpha) * z_j) / tf.stop_gradient(norm)


def mix_query_logits(qq: tf.Tensor, z_j: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
  """q·h' for h' = normalize(β·sg(q) + (1−β) n_j), from qq = q·sg(q) and z_j = q·n_j.

  qq carries the gradient sg(q) with the value ‖q‖²; the norm uses sg(z_j) and sg(qq), so the
  gradient w.r.t. q is exactly h' as for a detached feature.
  """
  qq_c, z_c = tf.stop_gradient(qq), tf.stop_gradient(z_j)
  norm = tf.sqrt(tf.maximum(beta * beta * qq_c + (1 - beta) ** 2 + 2 * beta * (1 - beta) * z_c,
                            1e-12))
  return (beta * qq + (1 - beta) * z_j) / norm


def _unit_uniform(shape, seed: tf.Tensor) -> tf.Tensor:
  """U[0, 1) float32 from 24 random bits.

  XLA converts random bits to floats differently from the TF kernels, so a float
  `stateless_uniform` draws other numbers under jit_compile; integer draws agree bit for bit.
  """
  bits = tf.random.stateless_uniform(shape, seed, 0, 1 << 24, tf.int32, alg=_ALG)
  return tf.cast(bits, tf.float32) * (1.0 / (1 << 24))


class _Rows(NamedTuple):
  """Where this replica's queries sit in the global batch, for draws that do not depend on R.

  The draws are made for the whole global batch and this replica keeps its rows, so that the same
  global batch gets the same synthetic negatives on 1 or R replicas.
  """
  batch: tf.Tensor  # B, this replica's queries
  offset: tf.Tensor  # index of its first query in the global batch
  global_rows: int | None  # the global batch (static); None: draw B rows

  def draw(self, fn, shape: list, seed: tf.Tensor) -> tf.Tensor:
    """fn([rows] + shape, seed) -> this replica's [B] + shape."""
    if self.global_rows is None:
      return fn([self.batch] + shape, seed)
    rows = fn([self.global_rows] + shape, seed)
    return tf.slice(rows, [self.offset] + [0] * len(shape), [self.batch] + shape)


def _take(values: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
  """Per-query gather: [B, X], [B, Y] -> [B, Y]."""
  return tf.gather(values, positions, batch_dims=1)


def _randint(maxval: int):
  return lambda shape, seed: tf.random.stateless_uniform(shape, seed, 0, maxval, tf.int32,
                                                         alg=_ALG)


def _pair_mixes(queue: tf.Tensor, hard: tf.Tensor, z_hard: tf.Tensor, seeds: tuple, rows: _Rows,
                num_hard: int, num_mix: int):
  """Type 1, h = normalize(α n_i + (1−α) n_j) with i, j uniform over each query's top-N.

  Returns:
    (logits [B, s] with 0 where a source is absent, present [B, s] bool, (i, j) queue indices
    [B, s, 2], α [B, s], (n_i, n_j) [B, s, D]).
  """
  batch = rows.batch
  pos_ij = rows.draw(_randint(num_hard), [num_mix, 2], seeds[0])  # positions in the top-N
  ij = tf.reshape(_take(hard, tf.reshape(pos_ij, [batch, num_mix * 2])), [batch, num_mix, 2])
  alpha = rows.draw(_unit_uniform, [num_mix], seeds[1])
  z_i, z_j = _take(z_hard, pos_ij[..., 0]), _take(z_hard, pos_ij[..., 1])  # [B, s]
  n_i, n_j = tf.gather(queue, ij[..., 0]), tf.gather(queue, ij[..., 1])  # [B, s, D]
  # [B, s]: the only new dot products. As `row_sum`'s matrix-vector product, XLA gathers the
  # rows inside its loop; tf.reduce_sum there wrote the [B, s, D] products to memory first.
  n_ij = losses.row_sum(n_i * n_j)
  present = tf.logical_and(tf.math.is_finite(z_i), tf.math.is_finite(z_j))
  zero = tf.zeros_like(z_i)
  logits = mix_pair_logits(tf.where(present, z_i, zero), tf.where(present, z_j, zero), n_ij, alpha)
  return logits, present, ij, alpha, (n_i, n_j)


def _query_mixes(q: tf.Tensor, hard: tf.Tensor, z_hard: tf.Tensor, seeds: tuple, rows: _Rows,
                 num_hard: int, num_query_mix: int, beta_max: float):
  """Type 2, h' = normalize(β sg(q) + (1−β) n_j) with β ~ U(0, β_max), j uniform over the top-N.

  Returns:
    (logits [B, s'] with 0 where n_j is absent, present [B, s'] bool, j [B, s'], β [B, s']).
  """
  pos_j = rows.draw(_randint(num_hard), [num_query_mix], seeds[0])
  j = _take(hard, pos_j)  # [B, s'] queue indices
  beta = beta_max * rows.draw(_unit_uniform, [num_query_mix], seeds[1])
  z_j = _take(z_hard, pos_j)  # [B, s']
  present = tf.math.is_finite(z_j)
  z_j = tf.where(present, z_j, tf.zeros_like(z_j))
  qq = tf.reduce_sum(q * tf.stop_gradient(q), axis=-1, keepdims=True)  # value ‖q‖², gradient sg(q)
  return mix_query_logits(qq, z_j, beta), present, j, beta


def _explicit_features(q: tf.Tensor, queue: tf.Tensor, n_pair: tuple, alpha: tf.Tensor,
                       j: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
  """The synthetic points themselves, [B, s + s', D] (analysis and tests; not needed to train)."""
  n_i, n_j = n_pair
  h = tf.math.l2_normalize(alpha[..., None] * n_i + (1 - alpha[..., None]) * n_j, axis=-1)
  q_const = tf.stop_gradient(q)[:, None, :]
  h2 = tf.math.l2_normalize(beta[..., None] * q_const + (1 - beta[..., None])
                            * tf.gather(queue, j), axis=-1)
  return tf.stop_gradient(tf.concat([h, h2], axis=1))


def _synthesize(q: tf.Tensor, queue: tf.Tensor, l_neg: tf.Tensor, seed: tf.Tensor,
                enabled: tf.Tensor, row_offset: tf.Tensor, hard: tf.Tensor, num_hard: int,
                num_mix: int, num_query_mix: int, beta_max: float, global_rows: int | None,
                return_features: bool, z_hard: tf.Tensor | None = None) -> Synthesis:
  """The computation behind `synthesize` (see there); static ints, pure tensors.

  `hard` [B, N] int32 is `topn.hardest_indices(l_neg, N)`, computed by the caller: outside the XLA
  function on CPUs, where a faster exact selection than XLA's TopK exists. `z_hard` [B, N], if
  given, is `tf.gather(l_neg, hard, batch_dims=1)` computed by the caller (see
  `synthesize_from_hardest`).
  """
  q = tf.cast(q, tf.float32)
  queue = tf.stop_gradient(tf.cast(queue, tf.float32))
  rows = _Rows(tf.shape(q)[0], row_offset, global_rows)
  seed_pairs, seed_alpha, seed_query, seed_beta = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4, alg=_ALG))
  # The logits of each query's top-N, gathered once ([B, N], carry gradient): the s + s' draws
  # index this small array instead of the [B, K] logits (same values; fewer cache misses, and
  # the backward pass scatters N instead of 2s + s' values per query into the [B, K] gradient).
  z_hard = _take(tf.cast(l_neg, tf.float32), hard) if z_hard is None else z_hard
  mix1, ok1, ij, alpha, n_pair = _pair_mixes(queue, hard, z_hard, (seed_pairs, seed_alpha), rows,
                                             num_hard, num_mix)
  mix2, ok2, j2, beta = _query_mixes(q, hard, z_hard, (seed_query, seed_beta), rows, num_hard,
                                     num_query_mix, beta_max)
  ok = tf.logical_and(tf.concat([ok1, ok2], axis=1), tf.reshape(enabled, []))
  logits = tf.where(ok, tf.concat([mix1, mix2], axis=1), tf.constant(_NEG_INF, tf.float32))
  features = (_explicit_features(q, queue, n_pair, alpha, j2, beta) if return_features
              else None)
  return Synthesis(logits=logits, hard_indices=hard, mix_indices=ij, alpha=alpha,
                   query_mix_indices=j2, beta=beta, features=features)


@functools.lru_cache(maxsize=None)
def _compiled(num_hard: int, num_mix: int, num_query_mix: int, beta_max: float,
              global_rows: int | None, return_features: bool, jit_compile: bool):
  def fn(*args):
    out = _synthesize(*args, num_hard=num_hard, num_mix=num_mix, num_query_mix=num_query_mix,
                      beta_max=beta_max, global_rows=global_rows,
                      return_features=return_features)
    # `hard` is an input: returning it would make XLA copy it (the caller already has it).
    return out._replace(hard_indices=None)

  return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True, autograph=False)


def synthesize(q: tf.Tensor, queue: tf.Tensor, l_neg: tf.Tensor, seed: tf.Tensor,
               config: MochiConfig, *, enabled: bool | tf.Tensor = True,
               row_offset: int | tf.Tensor = 0, global_rows: int | None = None,
               return_features: bool = False, jit_compile: bool | None = True) -> Synthesis:
  """MoCHi's synthetic negatives for a batch of queries, as logits (and optionally features).

  Args:
    q: [B, D] L2-normalised queries (float32; gradients flow to q only).
    queue: [K, D] L2-normalised queue (a tensor, e.g. `tf.identity(queue_variable)`; never a
      variable: XLA must not touch distributed resources). Treated as a constant.
    l_neg: [B, K] queue cosine logits q·n computed by the caller (with gradient); -inf entries are
      absent (e.g. masked duplicates) and synthetic points built from them are absent too.
    seed: [2] int stateless seed, e.g. `step_seed(run_seed, step, replica_id)`.
    config: MoCHi(N, s, s'); must be enabled (N > 0, s + s' > 0) and N <= K.
    enabled: scalar bool (tensor or Python); False masks every synthetic logit to -inf (warm-up)
      without changing shapes or retracing.
    row_offset: under tf.distribute, the index of this replica's first query in the global batch.
    global_rows: the global batch size (static). With it, the random draws are made for the
      whole global batch from `seed` and this replica keeps rows [row_offset, row_offset + B):
      a run draws the same synthetic negatives on 1 or R replicas. None draws B rows.
    return_features: also build the explicit h, h' features ([B, s + s', D]).
    jit_compile: compile with XLA (True), never (False), or call the plain Python function
      (None). Inside a function XLA already compiles (`--jit_compile`, TPU) the plain function
      is always used: it becomes part of that computation. In a TensorFlow build without XLA
      for the CPU (tensorflow-tpu's wheel) True means a plain tf.function on the host.

  Returns:
    A `Synthesis` (logits [B, s + s'] plus the indices and coefficients that were drawn).
  """
  _check(config, queue)
  enabled = tf.convert_to_tensor(enabled, tf.bool)
  row_offset = tf.convert_to_tensor(row_offset, tf.int32)
  # Inside a function that XLA already compiles (--jit_compile, TPU) the plain function joins that
  # computation: a nested jit_compile function there is compiled with its arguments as
  # compile-time constants, i.e. recompiled at every step.
  plain = jit_compile is None or topn.inside_xla()
  hard = hardest_indices(l_neg, config, inside_xla=plain)
  if plain:
    return synthesize_from_hardest(q, queue, l_neg, hard, seed, config, enabled=enabled,
                                   row_offset=row_offset, global_rows=global_rows,
                                   return_features=return_features)
  fn = _compiled(config.num_hard, config.num_mix, config.num_query_mix, float(config.beta_max),
                 global_rows, bool(return_features),
                 bool(jit_compile) and topn.host_xla_available())
  return fn(q, queue, l_neg, seed, enabled, row_offset, hard)._replace(hard_indices=hard)


def synthesize_from_hardest(q: tf.Tensor, queue: tf.Tensor, l_neg: tf.Tensor, hard: tf.Tensor,
                            seed: tf.Tensor, config: MochiConfig, *,
                            enabled: bool | tf.Tensor = True, row_offset: int | tf.Tensor = 0,
                            global_rows: int | None = None,
                            return_features: bool = False,
                            z_hard: tf.Tensor | None = None) -> Synthesis:
  """`synthesize` from each query's top-N found by the caller, as plain ops.

  For callers that compile a larger function themselves (`objective.contrastive_objective`
  compiles the synthesis together with the loss): `hard` [B, N] int32 is
  `hardest_indices(l_neg, config, ...)`; the other arguments and the result are `synthesize`'s.
  `z_hard` [B, N] float32: the caller's `tf.gather(l_neg, hard, batch_dims=1)`, through which
  the synthetic logits' gradient reaches the queue logits (a caller that wants that gradient
  as [B, N] rather than scattered into [B, K] passes it; None: gathered here).
  """
  _check(config, queue)
  return _synthesize(q, queue, l_neg, seed, tf.convert_to_tensor(enabled, tf.bool),
                     tf.convert_to_tensor(row_offset, tf.int32), hard, config.num_hard,
                     config.num_mix, config.num_query_mix, float(config.beta_max), global_rows,
                     return_features, z_hard)


def _check(config: MochiConfig, queue: tf.Tensor) -> None:
  if not config.enabled:
    raise ValueError("synthesize() needs an enabled MochiConfig (N > 0 and s + s' > 0).")
  config.validate(queue_size=queue.shape[0])


def hardest_indices(l_neg: tf.Tensor, config: MochiConfig, inside_xla: bool) -> tf.Tensor:
  """Each query's top-N, [B, K] -> [B, N] int32, by the method `config.top_n` asks for.

  `inside_xla`: True where the caller's code is compiled by XLA (only TopK can run there).

  Outside XLA the top-N runs before the compiled synthesis: on a CPU host "auto" takes the exact
  chunked selection, several times faster than a TopK kernel (elsewhere TF's top_k, identical
  indices). Inside XLA only "top_k" (or "approx") can run.
  """
  if config.top_n == "approx":
    method = "approx"
  else:
    method = "top_k" if inside_xla else "auto"
  return topn.hardest_indices(l_neg, config.num_hard, method=method,
                              recall_target=config.top_n_recall)
