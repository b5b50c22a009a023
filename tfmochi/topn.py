"""Each query's top-N: the indices of the N largest queue logits per row, exact or approximate.

MoCHi (`tfmochi.mixing`) mixes each query's N hardest negatives, the N queue entries with the
largest q·n. `hardest_indices` finds them for a [B, K] block of logits:

  "top_k"    `tf.math.top_k`, any device, inside XLA too;
  "chunked"  an exact selection by thresholds for CPU hosts, several times faster than `top_k`
             at MoCHi's sizes (K = 65536, N = 1024) and returning exactly the same indices;
  "auto"     "chunked" where it applies and pays off, else "top_k";
  "approx"   `tf.math.approx_max_k` (the TPU's approximate top-k, recall about `recall_target`).

Every method returns the indices sorted ascending, so that the draws indexing into the set are the
same whatever order a kernel happens to return them in.
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from tfmochi import config as config_lib
from tfmochi import distribute
from tfmochi import losses

# `--mochi_topn` (MochiConfig.top_n): "exact" is "auto" outside XLA and "top_k" inside it.
METHODS = config_lib.TOP_N_METHODS


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
  chunk = _chunk_size(x.shape[-1], num_hard)
  if method == "chunked" and chunk is None:
    raise ValueError(f"method=chunked needs a static K >= 8·N and divisible by a power of 2 >= 2; "
                     f"got K={x.shape[-1]}, N={num_hard}.")
  if method == "auto" and (chunk is None or not _cpu_only_host() or inside_xla()):
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
# selection below only compares, counts and gathers (docs/BENCHMARKS.md has the timings), and it
# is exact: it returns exactly the set
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

_MAX_ITERS = 64  # bisection steps before giving a row up (float32 needs < 40 in practice)


def _chunk_size(k: int | None, n: int) -> int | None:
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
  return not distribute.accelerator_visible()


@functools.cache
def host_xla_available() -> bool:
  """True when this TensorFlow build can compile with XLA for the host CPU.

  tensorflow-tpu's wheel has no XLA:CPU backend: a jit_compile=True function placed on the CPU
  fails there with "could not find registered transfer manager for platform Host". The helpers
  that compile their own pieces (the chunked top-N, the MoCHi synthesis) run as plain
  tf.functions in such a build, so that the objective also runs on a TPU VM's host CPU
  (analysis, evaluation, tests); on the TPU itself they are inside the step's XLA program anyway.
  """
  with tf.init_scope(), tf.device("/CPU:0"):  # eager, even when asked while tracing
    try:
      tf.function(lambda x: x + 1, jit_compile=True)(tf.constant(1.0))
    except (tf.errors.NotFoundError, tf.errors.UnimplementedError, tf.errors.InternalError,
            tf.errors.InvalidArgumentError):
      return False
  return True


def inside_xla() -> bool:
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
    return tf.logical_and(i < _MAX_ITERS, tf.reduce_any(~done & ~stuck))

  def body(i, lo, hi, count_lo, done, stuck):
    mid = lo + (hi - lo) * 0.5
    no_float_between = (mid <= lo) | (mid >= hi)  # lo and hi adjacent: a tie straddles n
    # Counted in float32 (exact below 2^24 entries per row) by `losses.row_sum`, which XLA:CPU
    # fuses with the comparison into one pass (a reduction would first write the 0/1 mask).
    count = tf.cast(losses.row_sum(tf.where(values >= mid[:, None], 1.0, 0.0)), tf.int32)
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

  compile_ = functools.partial(tf.function, jit_compile=host_xla_available(),
                               reduce_retracing=True, autograph=False)
  return tuple(compile_(f) for f in (select_chunks, candidates, exact, indices))


# `_compact_true` compacts this many row blocks with separate `Where` ops: TensorFlow's CPU kernel
# runs on one thread, and in a graph the blocks run on the inter-op threads side by side
# (docs/BENCHMARKS.md, "What limits the head": 4.0 -> 2.1-2.7 ms on [256, 8192], 2 vCPUs).
_COMPACT_PARTS = 2


def _compact_true(mask: tf.Tensor, row_counts: tf.Tensor, width: int) -> tf.Tensor:
  """Row-major flat positions of the True entries of a [B, M] mask, packed left in [B, width]
  (ascending within each row, -1 padding; rows with more than `width` are cut)."""
  rows, cols = tf.shape(mask)[0], tf.shape(mask)[1]
  parts = 1 if tf.executing_eagerly() else _COMPACT_PARTS  # eagerly, ops run one at a time
  bounds = [rows * p // parts for p in range(parts + 1)]
  blocks = []
  for start, stop in zip(bounds[:-1], bounds[1:]):
    flat = tf.where(tf.reshape(mask[start:stop], [-1]))
    flat = tf.cast(tf.reshape(flat, [-1]), tf.int32) + start * cols
    ragged = tf.RaggedTensor.from_row_lengths(flat, row_counts[start:stop], validate=False)
    blocks.append(ragged.to_tensor(-1, shape=[None, width]))
  return tf.concat(blocks, axis=0)


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
