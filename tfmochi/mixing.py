"""MoCHi: hard negative mixing at the feature level (Kalantidis et al., NeurIPS 2020).

For each query q (L2-normalised, [D]) and the queue Q = {n_1..n_K} (L2-normalised, [K, D]):

  1. Q̃^N = the N queue entries with the largest q·n (that query's hardest negatives).
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

import dataclasses
import functools
from typing import NamedTuple

import tensorflow as tf

_NEG_INF = float("-inf")
# One explicit RNG algorithm: "auto_select" picks different generators with and without XLA, so the
# same seed would draw different negatives in eager and compiled code.
_ALG = tf.random.Algorithm.PHILOX


@dataclasses.dataclass(frozen=True)
class MochiConfig:
  """MoCHi(N, s, s') hyper-parameters.

  Attributes:
    num_hard: N, how many hardest queue negatives each query mixes from. 0 disables MoCHi.
    num_mix: s, synthetic negatives mixed from pairs of hard negatives (type 1).
    num_query_mix: s', synthetic negatives mixed from the query and a hard negative (type 2).
    beta_max: upper bound of β ~ U(0, β_max) for type 2; in (0, 0.5] so the query's share stays
      below the negative's.
  """
  num_hard: int = 1024
  num_mix: int = 1024
  num_query_mix: int = 512
  beta_max: float = 0.5

  @property
  def enabled(self) -> bool:
    return self.num_hard > 0 and (self.num_mix + self.num_query_mix) > 0

  @property
  def num_synthetic(self) -> int:
    """s + s' when enabled, else 0."""
    return self.num_mix + self.num_query_mix if self.enabled else 0

  def validate(self, queue_size: int | None = None) -> "MochiConfig":
    """Raises ValueError naming the argument and its allowed range; returns self."""
    for name, value in (("mochi_num_hard (N)", self.num_hard),
                        ("mochi_num_mix (s)", self.num_mix),
                        ("mochi_num_query_mix (s')", self.num_query_mix)):
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    if not (isinstance(self.beta_max, (int, float)) and 0.0 < self.beta_max <= 0.5):
      raise ValueError(f"mochi_beta_max (β_max) must be in (0, 0.5], got {self.beta_max!r}.")
    if queue_size is not None and self.num_hard > queue_size:
      raise ValueError(f"mochi_num_hard (N) must be in [0, K] = [0, {queue_size}] (it picks the N "
                       f"hardest of the K queue entries), got {self.num_hard}.")
    if self.num_hard == 0 and (self.num_mix or self.num_query_mix):
      raise ValueError("mochi_num_mix (s) and mochi_num_query_mix (s') need mochi_num_hard (N) > 0 "
                       "to have hard negatives to mix; set N > 0 or s = s' = 0.")
    return self


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


def hardest_indices(l_neg: tf.Tensor, num_hard: int) -> tf.Tensor:
  """Queue indices of each row's N largest logits, in ascending index order: [B, K] -> [B, N].

  The set is what MoCHi needs; sorting it by index makes the draws that index into it identical
  whatever order a top-k kernel (TF's, XLA's) happens to return.
  """
  idx = tf.math.top_k(tf.stop_gradient(l_neg), k=num_hard, sorted=False).indices
  return tf.sort(idx, axis=-1)


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


def _synthesize(q: tf.Tensor, queue: tf.Tensor, l_neg: tf.Tensor, seed: tf.Tensor,
                enabled: tf.Tensor, row_offset: tf.Tensor, num_hard: int, num_mix: int,
                num_query_mix: int, beta_max: float, global_rows: int | None,
                return_features: bool) -> Synthesis:
  """The computation behind `synthesize` (see there); static ints, pure tensors."""
  q = tf.cast(q, tf.float32)
  queue = tf.stop_gradient(tf.cast(queue, tf.float32))
  l_neg = tf.cast(l_neg, tf.float32)
  batch = tf.shape(q)[0]
  seed_pairs, seed_alpha, seed_query, seed_beta = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4, alg=_ALG))

  hard = hardest_indices(l_neg, num_hard)  # [B, N]

  def draw(shape, rng_seed, fn):
    """Draws for the whole global batch and keeps this replica's rows, so that the same global
    batch gets the same synthetic negatives on 1 or R replicas."""
    if global_rows is None:
      return fn([batch] + shape, rng_seed)
    rows = fn([global_rows] + shape, rng_seed)
    return tf.slice(rows, [row_offset] + [0] * len(shape), [batch] + shape)

  def randint(shape, rng_seed):
    return tf.random.stateless_uniform(shape, rng_seed, 0, num_hard, tf.int32, alg=_ALG)

  def take(values, positions):  # per-query gather: [B, X], [B, Y] -> [B, Y]
    return tf.gather(values, positions, batch_dims=1)

  def present(z):
    return tf.math.is_finite(z)

  # ---- type 1: h = normalize(α n_i + (1−α) n_j), i, j uniform over this query's top-N
  pos_ij = draw([num_mix, 2], seed_pairs, randint)
  ij = take(hard, tf.reshape(pos_ij, [batch, num_mix * 2]))
  ij = tf.reshape(ij, [batch, num_mix, 2])  # [B, s, 2] queue indices
  alpha = draw([num_mix], seed_alpha, _unit_uniform)
  z_i, z_j = take(l_neg, ij[..., 0]), take(l_neg, ij[..., 1])  # [B, s], carry gradient
  n_i, n_j = tf.gather(queue, ij[..., 0]), tf.gather(queue, ij[..., 1])  # [B, s, D], fused by XLA
  n_ij = tf.reduce_sum(n_i * n_j, axis=-1)  # [B, s]
  ok1 = tf.logical_and(present(z_i), present(z_j))
  zero = tf.zeros_like(z_i)
  mix1 = mix_pair_logits(tf.where(ok1, z_i, zero), tf.where(ok1, z_j, zero), n_ij, alpha)

  # ---- type 2: h' = normalize(β sg(q) + (1−β) n_j), β ~ U(0, β_max)
  pos_j = draw([num_query_mix], seed_query, randint)
  j2 = take(hard, pos_j)  # [B, s']
  beta = beta_max * draw([num_query_mix], seed_beta, _unit_uniform)
  z2 = take(l_neg, j2)  # [B, s'], carries gradient
  ok2 = present(z2)
  z2 = tf.where(ok2, z2, tf.zeros_like(z2))
  q_const = tf.stop_gradient(q)
  qq = tf.reduce_sum(q * q_const, axis=-1, keepdims=True)  # [B, 1]: value ‖q‖², gradient sg(q)
  mix2 = mix_query_logits(qq, z2, beta)

  ok = tf.logical_and(tf.concat([ok1, ok2], axis=1), tf.reshape(enabled, []))
  logits = tf.concat([mix1, mix2], axis=1)  # [B, s + s']
  logits = tf.where(ok, logits, tf.constant(_NEG_INF, tf.float32))

  features = None
  if return_features:
    h = tf.math.l2_normalize(alpha[..., None] * n_i + (1 - alpha[..., None]) * n_j, axis=-1)
    n2 = tf.gather(queue, j2)
    h2 = tf.math.l2_normalize(beta[..., None] * q_const[:, None, :] + (1 - beta[..., None]) * n2,
                              axis=-1)
    features = tf.stop_gradient(tf.concat([h, h2], axis=1))
  return Synthesis(logits=logits, hard_indices=hard, mix_indices=ij, alpha=alpha,
                   query_mix_indices=j2, beta=beta, features=features)


@functools.lru_cache(maxsize=None)
def _compiled(num_hard: int, num_mix: int, num_query_mix: int, beta_max: float,
              global_rows: int | None, return_features: bool, jit_compile: bool):
  fn = functools.partial(_synthesize, num_hard=num_hard, num_mix=num_mix,
                         num_query_mix=num_query_mix, beta_max=beta_max, global_rows=global_rows,
                         return_features=return_features)
  return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)


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
      (None; e.g. when already inside an XLA cluster).

  Returns:
    A `Synthesis` (logits [B, s + s'] plus the indices and coefficients that were drawn).
  """
  if not config.enabled:
    raise ValueError("synthesize() needs an enabled MochiConfig (N > 0 and s + s' > 0).")
  k = queue.shape[0]
  config.validate(queue_size=k)
  enabled = tf.convert_to_tensor(enabled, tf.bool)
  row_offset = tf.convert_to_tensor(row_offset, tf.int32)
  if jit_compile is None:
    return _synthesize(q, queue, l_neg, seed, enabled, row_offset, config.num_hard,
                       config.num_mix, config.num_query_mix, float(config.beta_max), global_rows,
                       return_features)
  fn = _compiled(config.num_hard, config.num_mix, config.num_query_mix, float(config.beta_max),
                 global_rows, bool(return_features), bool(jit_compile))
  return fn(q, queue, l_neg, seed, enabled, row_offset)
