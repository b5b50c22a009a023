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
import math
from typing import NamedTuple

import tensorflow as tf

_NEG_INF = float("-inf")
# One explicit RNG algorithm: "auto_select" picks different generators with and without XLA, so the
# same seed would draw different negatives in eager and compiled code.
_ALG = tf.random.Algorithm.PHILOX
# How each query's top-N is found (MochiConfig.top_n); see `hardest_indices`.
TOP_N_METHODS = ("exact", "approx")


@dataclasses.dataclass(frozen=True)
class MochiConfig:
  """MoCHi(N, s, s') hyper-parameters.

  Attributes:
    num_hard: N, how many hardest queue negatives each query mixes from. 0 disables MoCHi.
    num_mix: s, synthetic negatives mixed from pairs of hard negatives (type 1).
    num_query_mix: s', synthetic negatives mixed from the query and a hard negative (type 2).
    beta_max: upper bound of β ~ U(0, β_max) for type 2; in (0, 0.5] so the query's share stays
      below the negative's.
    top_n: "exact" (the N hardest, exactly) or "approx" (`tf.math.approx_max_k`, for TPUs: each
      true top-N entry is found with probability about `top_n_recall`; the entries it misses are
      replaced by the next hardest ones, so a few synthetic points mix slightly easier negatives.
      On CPUs and GPUs TensorFlow computes the exact set instead; see `hardest_indices`).
    top_n_recall: the recall target of "approx", in (0, 1].
  """
  num_hard: int = 1024
  num_mix: int = 1024
  num_query_mix: int = 512
  beta_max: float = 0.5
  top_n: str = "exact"
  top_n_recall: float = 0.95

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
    if self.top_n not in TOP_N_METHODS:
      raise ValueError(f"mochi_topn must be one of {', '.join(TOP_N_METHODS)}, got "
                       f"{self.top_n!r}.")
    if not (isinstance(self.top_n_recall, (int, float)) and 0.0 < self.top_n_recall <= 1.0):
      raise ValueError(f"mochi_topn_recall must be in (0, 1], got {self.top_n_recall!r}.")
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


def hardest_indices(l_neg: tf.Tensor, num_hard: int, method: str = "auto",
                    recall_target: float = 0.95) -> tf.Tensor:
  """Queue indices of each row's N largest logits, in ascending index order: [B, K] -> [B, N].

  The set is what MoCHi needs; sorting it by index makes the draws that index into it identical
  whatever order a top-k kernel (TF's, XLA's) happens to return. The exact methods return exactly
  the same indices (int32), ties included (the lower index wins, as with `tf.math.top_k`).

  Args:
    l_neg: [B, K] logits (K static; -inf entries rank last).
    num_hard: N, 1 <= N <= K.
    method: "top_k" (`tf.math.top_k` + sort: any device, inside XLA too), "chunked" (a faster
      exact selection for CPUs, see `_chunked_top_n`; needs K >= 8·N and cannot run inside an
      XLA-compiled function) or "auto" ("chunked" when it applies, the host has no GPU/TPU and
      the caller is not being compiled by XLA; else "top_k"), or "approx": N distinct indices
      from `tf.math.approx_max_k(recall_target)`. On a TPU that is a partial reduction (no
      sort) whose expected recall of the true top-N is about `recall_target`: it keeps the
      largest logit of each of its bins, so a missed entry's place goes to a lower-ranked one,
      i.e. an easier negative for the synthetic points mixed from it. On CPUs and GPUs
      TensorFlow has no approximate kernel: its op and XLA:CPU both compute the exact top-N
      (XLA:CPU by sorting each whole row, slower than "top_k"; docs/BENCHMARKS.md).
    recall_target: for "approx", in (0, 1].
  """
  x = tf.stop_gradient(tf.cast(l_neg, tf.float32))
  if method not in ("auto", "top_k", "chunked", "approx"):
    raise ValueError(f"method must be auto, top_k, chunked or approx; got {method!r}.")
  if method == "approx":
    found = tf.math.approx_max_k(x, num_hard, recall_target=recall_target).indices
    return tf.sort(found, axis=-1)
  chunk = _topn_chunk_size(x.shape[-1], num_hard)
  if method == "chunked" and chunk is None:
    raise ValueError(f"method=chunked needs a static K >= 8·N and divisible by a power of 2 >= 2; "
                     f"got K={x.shape[-1]}, N={num_hard}.")
  if method == "auto" and (chunk is None or not _cpu_only_host() or _inside_xla()):
    method = "top_k"
  if method == "top_k":
    return _top_k_indices(x, num_hard)
  return _chunked_top_n(x, num_hard, chunk)


def _top_k_indices(x: tf.Tensor, n: int) -> tf.Tensor:
  """[B, K] -> [B, N] int32: `tf.math.top_k`'s indices, sorted ascending."""
  return tf.sort(tf.math.top_k(x, k=n, sorted=False).indices, axis=-1)


# ------------------------------------------------------------------------------------------------
# Exact top-N for CPUs.
#
# Why: on a CPU, `tf.math.top_k(k=1024)` over [256, 65536] logits costs about as much as the whole
# MoCo head (its kernel pushes every element through a heap comparison, a few ns each), and XLA's
# TopK is slower still. A fused compare-and-count pass costs a fraction of a ns per element, so the
# selection below only compares, counts and gathers (4-5x faster at that size), and it is exact:
# it returns exactly the set
# {x >= t} for a threshold t with count(x >= t) == N, which *is* the top-N set. Whenever it cannot
# certify such a t (ties at the N-th value, fewer than N finite logits, non-finite values, an
# unusually spread candidate set), it falls back to `_top_k_indices`, so the result never differs.
#
#   1. Chunk maxima: cm = max of each chunk of c consecutive logits, [B, K/c] (one pass over x).
#      A threshold t1 with N <= count(cm >= t1) <= N + slack is found by bisection on the value
#      (each step is one fused compare-and-count pass over cm, in XLA). Every logit >= t1 lies in a
#      chunk with max >= t1, so the selected chunks hold all of them, and since each selected chunk
#      holds at least one logit >= t1, count(x >= t1) >= N: the top-N lie among the selected chunks.
#   2. The selected chunk ids, ascending (tf.where), padded to N + slack.
#   3. The candidates: the logits of the selected chunks that are >= t1 (about 1.05-1.2·N per row
#      for c ~ sqrt(K/N)), compacted (tf.where) to [B, cap ~ 1.5·N] in ascending index order.
#   4. An exact threshold t2 >= t1 with count(candidates >= t2) == N, by bisection on [B, cap].
#      All logits >= t2 are candidates, so exactly N logits of the row are >= t2.
#   5. The indices of those N candidates, already in ascending order (no sort needed).

_TOPN_MAX_ITERS = 64  # bisection steps before giving a row up (float32 needs < 40 in practice)


def _topn_chunk_size(k: int | None, n: int) -> int | None:
  """The chunk size c of the chunked top-N (a power of 2 near sqrt(K/N) dividing K), or None when
  K is unknown or too small for it to pay off (K < 8·N)."""
  if k is None or n < 1 or k < 8 * n:
    return None
  c = 1 << (math.isqrt(k // n).bit_length() - 1)  # largest power of 2 <= sqrt(K/N)
  while c > 1 and k % c:
    c //= 2
  # Counts are summed in float32, exact up to 2^24 per row.
  return c if c >= 2 and k // c < 2**24 else None


@functools.lru_cache(maxsize=None)
def _cpu_only_host() -> bool:
  """True when TensorFlow sees no GPU and no TPU (where `top_k` is fast, or must stay in XLA)."""
  return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def _inside_xla() -> bool:
  """True while tracing code that XLA will compile (a jit_compile=True function, TPU), where the
  dynamic shapes of tf.where are not allowed."""
  try:
    from tensorflow.python.framework import ops  # pylint: disable=g-import-not-at-top
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  except ImportError:  # internal modules moved: assume plain TensorFlow
    return False
  return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _threshold_for_count(values: tf.Tensor, n: int, lo: tf.Tensor, count_lo: tf.Tensor,
                         slack: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Per row, a threshold t with n <= count(values >= t) <= n + slack, by bisection on the value.

  Args:
    values: [B, M] float32.
    n: the target count.
    lo: [B] a threshold with count_lo = count(values >= lo) >= n (the caller guarantees it).
    count_lo: [B] int32.
    slack: how far above n the count may be.

  Returns:
    (t [B], count(values >= t) [B], ok [B]); ok is False for a row whose target could not be
    reached (a tie spanning it, or no finite bracket), and t is then meaningless.
  """
  inf = tf.constant(float("inf"))
  hi = tf.math.nextafter(tf.reduce_max(values, axis=1), inf)  # count(values >= hi) == 0 < n
  done = count_lo <= n + slack
  stuck = tf.logical_not(tf.math.is_finite(hi))

  def cond(i, lo, hi, count_lo, done, stuck):
    del lo, hi, count_lo
    return tf.logical_and(i < _TOPN_MAX_ITERS, tf.reduce_any(~done & ~stuck))

  def body(i, lo, hi, count_lo, done, stuck):
    mid = lo + (hi - lo) * 0.5
    no_float_between = (mid <= lo) | (mid >= hi)  # lo and hi adjacent: a tie straddles n
    # Counted in float32 (exact below 2^24 entries per row): XLA's CPU reduction of a float
    # select runs ~30% faster than of an int cast.
    count = tf.cast(tf.reduce_sum(tf.where(values >= mid[:, None], 1.0, 0.0), axis=1), tf.int32)
    active = ~(done | stuck | no_float_between)
    up = active & (count >= n)
    return (i + 1, tf.where(up, mid, lo), tf.where(active & (count < n), mid, hi),
            tf.where(up, count, count_lo), done | (up & (count <= n + slack)),
            stuck | (~done & no_float_between))

  _, lo, _, count_lo, done, _ = tf.while_loop(cond, body, (0, lo, hi, count_lo, done, stuck))
  return lo, count_lo, done


@functools.lru_cache(maxsize=None)
def _chunked_stages(k: int, n: int, c: int, slack: int, cap: int):
  """The XLA-compiled stages of `_chunked_top_n` for static (K, N, c, slack, cap).

  Between stages, TensorFlow compacts boolean masks (`_compact_true`), which XLA cannot do
  cheaply; every tensor crossing into XLA has a static shape, so nothing is recompiled.
  """
  g = k // c  # chunks per row
  m = n + slack  # chunk slots per row

  def select_chunks(x):  # [B, K] -> chunk mask [B, G], t1 [B], its count [B], ok []
    b = tf.shape(x)[0]
    cm = tf.reduce_max(tf.reshape(x, [b, g, c]), axis=-1)
    lo = tf.reduce_min(tf.where(tf.math.is_finite(cm), cm, float("inf")), axis=1)
    count_lo = tf.reduce_sum(tf.cast(cm >= lo[:, None], tf.int32), axis=1)  # finite chunks
    t1, count, ok = _threshold_for_count(cm, n, lo, count_lo, slack)
    ok = ok & (count_lo >= n) & tf.math.is_finite(t1)
    return cm >= t1[:, None], t1, count, tf.reduce_all(ok)

  def candidates(x, chunk_flat, t1):  # the chosen chunks' logits, and which are >= t1
    b = tf.shape(x)[0]
    real = chunk_flat >= 0  # [B, m]; padding is -1
    chunk_ids = chunk_flat % g  # chunk_flat indexes the [B·G, c] chunks of x
    cand = tf.gather(tf.reshape(x, [-1, c]), tf.reshape(tf.maximum(chunk_flat, 0), [-1]))
    cand = tf.reshape(tf.where(tf.reshape(real, [-1, 1]), cand, float("-inf")), [b, m * c])
    mask = cand >= t1[:, None]
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    return cand, mask, count, chunk_ids, tf.reduce_all(count <= cap)

  def exact(cand, cand_flat, t1, count):  # [B, cap] compacted candidates -> exactly n chosen
    real = cand_flat >= 0
    values = tf.where(real, tf.gather(tf.reshape(cand, [-1]), tf.maximum(cand_flat, 0)),
                      float("-inf"))
    t2, _, ok = _threshold_for_count(values, n, t1, count, 0)
    chosen = values >= t2[:, None]
    return chosen, tf.reduce_sum(tf.cast(chosen, tf.int32), axis=1), tf.reduce_all(ok)

  def indices(chosen_flat, cand_flat, chunk_ids):  # slots [B, n] -> queue indices [B, n]
    b = tf.shape(chunk_ids)[0]
    pos = tf.gather(tf.reshape(cand_flat, [-1]), tf.maximum(chosen_flat, 0)) % (m * c)
    chunk = tf.gather(tf.reshape(chunk_ids, [-1]), tf.range(b)[:, None] * m + pos // c)
    return chunk * c + pos % c

  compile_ = functools.partial(tf.function, jit_compile=True, reduce_retracing=True)
  return tuple(compile_(f) for f in (select_chunks, candidates, exact, indices))


def _compact_true(mask: tf.Tensor, row_counts: tf.Tensor, width: int) -> tf.Tensor:
  """Row-major flat positions of the True entries of a [B, M] mask, packed left in [B, width]
  (ascending within each row, -1 padding; rows with more than `width` are cut)."""
  flat = tf.cast(tf.reshape(tf.where(tf.reshape(mask, [-1])), [-1]), tf.int32)
  ragged = tf.RaggedTensor.from_row_lengths(flat, row_counts, validate=False)
  return ragged.to_tensor(-1, shape=[None, width])


def _chunked_top_n(x: tf.Tensor, n: int, c: int) -> tf.Tensor:
  """`_top_k_indices(x, n)`, computed by the exact chunked selection above (CPU, not in XLA)."""
  k = x.shape[1]
  slack = max(1, min(64, n // 16))  # stage 1's count window: fewer bisection steps
  cap = n + n // 2 + slack  # stage 3 expects ~1.05-1.2·N candidates per row for c ~ sqrt(K/N)
  select_chunks, candidates, exact, indices = _chunked_stages(k, n, c, slack, cap)
  chunk_mask, t1, count1, ok1 = select_chunks(x)
  chunk_flat = _compact_true(chunk_mask, count1, n + slack)
  cand, mask, count, chunk_ids, ok3 = candidates(x, chunk_flat, t1)
  cand_flat = _compact_true(mask, count, cap)
  chosen, count4, ok4 = exact(cand, cand_flat, t1, count)
  result = indices(_compact_true(chosen, count4, n), cand_flat, chunk_ids)
  # Every stage above has well-defined shapes even when a check fails (the compactions cut or
  # pad), so a single cond decides at the end; the fallback runs only when it is needed.
  return tf.cond(ok1 & ok3 & ok4, lambda: result, lambda: _top_k_indices(x, n))


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
                enabled: tf.Tensor, row_offset: tf.Tensor, hard: tf.Tensor, num_hard: int,
                num_mix: int, num_query_mix: int, beta_max: float, global_rows: int | None,
                return_features: bool) -> Synthesis:
  """The computation behind `synthesize` (see there); static ints, pure tensors.

  `hard` [B, N] int32 is `hardest_indices(l_neg, N)`, computed by the caller: outside the XLA
  function on CPUs, where a faster exact selection than XLA's TopK exists.
  """
  q = tf.cast(q, tf.float32)
  queue = tf.stop_gradient(tf.cast(queue, tf.float32))
  l_neg = tf.cast(l_neg, tf.float32)
  batch = tf.shape(q)[0]
  seed_pairs, seed_alpha, seed_query, seed_beta = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4, alg=_ALG))

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

  # The logits of each query's top-N, gathered once ([B, N], carry gradient): the s + s' draws
  # below index this small array instead of the [B, K] logits (same values; fewer cache misses,
  # and the backward pass scatters N instead of 2s + s' values per query into the [B, K] gradient).
  z_hard = take(l_neg, hard)

  # ---- type 1: h = normalize(α n_i + (1−α) n_j), i, j uniform over this query's top-N
  pos_ij = draw([num_mix, 2], seed_pairs, randint)
  ij = take(hard, tf.reshape(pos_ij, [batch, num_mix * 2]))
  ij = tf.reshape(ij, [batch, num_mix, 2])  # [B, s, 2] queue indices
  alpha = draw([num_mix], seed_alpha, _unit_uniform)
  z_i, z_j = take(z_hard, pos_ij[..., 0]), take(z_hard, pos_ij[..., 1])  # [B, s]
  n_i, n_j = tf.gather(queue, ij[..., 0]), tf.gather(queue, ij[..., 1])  # [B, s, D], fused by XLA
  n_ij = tf.reduce_sum(n_i * n_j, axis=-1)  # [B, s]
  ok1 = tf.logical_and(present(z_i), present(z_j))
  zero = tf.zeros_like(z_i)
  mix1 = mix_pair_logits(tf.where(ok1, z_i, zero), tf.where(ok1, z_j, zero), n_ij, alpha)

  # ---- type 2: h' = normalize(β sg(q) + (1−β) n_j), β ~ U(0, β_max)
  pos_j = draw([num_query_mix], seed_query, randint)
  j2 = take(hard, pos_j)  # [B, s']
  beta = beta_max * draw([num_query_mix], seed_beta, _unit_uniform)
  z2 = take(z_hard, pos_j)  # [B, s']
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
  def fn(*args):
    out = _synthesize(*args, num_hard=num_hard, num_mix=num_mix, num_query_mix=num_query_mix,
                      beta_max=beta_max, global_rows=global_rows,
                      return_features=return_features)
    # `hard` is an input: returning it would make XLA copy it (the caller already has it).
    return out._replace(hard_indices=None)

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
      (None). Inside a function XLA already compiles (`--jit_compile`, TPU) the plain function
      is always used: it becomes part of that computation.

  Returns:
    A `Synthesis` (logits [B, s + s'] plus the indices and coefficients that were drawn).
  """
  if not config.enabled:
    raise ValueError("synthesize() needs an enabled MochiConfig (N > 0 and s + s' > 0).")
  k = queue.shape[0]
  config.validate(queue_size=k)
  enabled = tf.convert_to_tensor(enabled, tf.bool)
  row_offset = tf.convert_to_tensor(row_offset, tf.int32)
  approx = config.top_n == "approx"
  # Inside a function that XLA already compiles (--jit_compile, TPU) the plain function joins that
  # computation: a nested jit_compile function there is compiled with its arguments as
  # compile-time constants, i.e. recompiled at every step.
  if jit_compile is None or _inside_xla():
    hard = hardest_indices(l_neg, config.num_hard, method="approx" if approx else "top_k",
                           recall_target=config.top_n_recall)  # XLA-safe
    return _synthesize(q, queue, l_neg, seed, enabled, row_offset, hard, config.num_hard,
                       config.num_mix, config.num_query_mix, float(config.beta_max), global_rows,
                       return_features)
  # The top-N runs before (outside) the compiled function: on a CPU host it uses the exact chunked
  # selection, several times faster than a TopK kernel; elsewhere TF's top_k (identical indices).
  hard = hardest_indices(l_neg, config.num_hard, method="approx" if approx else "auto",
                         recall_target=config.top_n_recall)
  fn = _compiled(config.num_hard, config.num_mix, config.num_query_mix, float(config.beta_max),
                 global_rows, bool(return_features), bool(jit_compile))
  return fn(q, queue, l_neg, seed, enabled, row_offset, hard)._replace(hard_indices=hard)
