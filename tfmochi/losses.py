"""The contrastive loss family, in float32 and log space.

Every loss here takes the *cosine* logits of a query against its positive and its negatives,
before division by the temperature T:

  l_pos: [B]     q·k+ for each query (the positive key).
  l_neg: [B, M]  q·n for each query and each negative: the K queue entries, optionally followed by
                 MoCHi's s + s' synthetic negatives. An entry equal to -inf is *absent*: it does not
                 count as a negative, and the negative count N used by the debiased/hard estimators
                 counts only finite entries. Masking by -inf is how warm-up (no synthesis yet),
                 duplicate-instance masking, class-oracle masking and Cai et al.'s removal of the
                 hardest negatives all reach the losses without changing a single shape.

and returns the per-example loss [B] (average it yourself; under tf.distribute divide the sum by
the *global* batch size). Everything is computed in float32 with log-sum-exp, never by summing
exponentials: with T = 0.07 and K = 65536 a probability-space implementation (as in the DCL/HCL
reference code) overflows float16 and loses precision in float32.

Losses (paper notation, t = temperature, τ+ = class prior, β = hardness concentration):
  * InfoNCE (MoCo):  −log( e^{l+/t} / (e^{l+/t} + Σ_j e^{l_j/t}) ).
  * Debiased (Chuang et al. 2020, M = 1):  Ng = max( (Σ_j e^{l_j/t} − τ+·N·e^{l+/t}) / (1 − τ+),
    N·e^{−1/t} ),  loss = −log( e^{l+/t} / (e^{l+/t} + Ng) ).
  * Hard (Robinson et al. 2021): as debiased, with Σ_j e^{l_j/t} replaced by the importance-weighted
    Σ_j w_j e^{l_j/t} / mean_j(w_j), w_j = e^{β l_j/t} (weights not detached, as in the authors' code).
  * Cai et al. 2020: drop the hardest p% of the queue negatives of each query, or keep only the
    hardest p% (`hardest_negatives_mask`); combines with any of the above.
  * SupCon (Khosla et al. 2020, L_out): `supcon_from_logits` (several positives per anchor) and the
    batch form `supcon_batch` of the reference code.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from tfmochi import config as config_lib
from tfmochi import distribute

LOSSES = config_lib.LOSSES

_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# Argument checks of the functions below, for callers that pass their own values (a config's
# values were checked when the config was built: `config.ObjectiveConfig`)


def check_temperature(temperature: float, name: str = "temperature") -> float:
  """Returns T if T > 0, else raises ValueError naming the argument (`name`) and its range."""
  if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
    raise ValueError(f"{name} (T) must be a finite number > 0, got {temperature!r}.")
  return float(temperature)


def check_tau_plus(tau_plus: float, name: str = "tau_plus") -> float:
  """Returns τ+ if it lies in [0, 1), else raises ValueError."""
  if not (isinstance(tau_plus, (int, float)) and 0.0 <= tau_plus < 1.0):
    raise ValueError(f"{name} (τ+, the class prior) must be in [0, 1), got {tau_plus!r}.")
  return float(tau_plus)


def check_percent(name: str, percent: float) -> float:
  """Returns p if it lies in the open interval (0, 100), else raises ValueError."""
  if not (isinstance(percent, (int, float)) and 0.0 < percent < 100.0):
    raise ValueError(f"{name} is a percentage of the queue and must be in (0, 100), got {percent!r}.")
  return float(percent)


def check_hard_beta(beta: float, name: str = "hard_beta") -> float:
  """Returns β if β >= 0, else raises ValueError."""
  if not (isinstance(beta, (int, float)) and beta >= 0 and math.isfinite(beta)):
    raise ValueError(f"{name} (β, the hardness concentration) must be >= 0, got {beta!r}.")
  return float(beta)


def check_loss_name(loss: str, name: str = "loss") -> str:
  """Returns the loss name if it is one of LOSSES, else raises ValueError."""
  if loss not in LOSSES:
    raise ValueError(f"{name} must be one of {', '.join(LOSSES)}; got {loss!r}.")
  return loss


# ------------------------------------------------------------------------------------------------
# Helpers


# `row_sum` sums pieces of at most this many elements per matrix-vector product: XLA:CPU fuses
# the producer into a product only when the vector is small (under 16 KB of float32).
_ROW_SUM_PIECE = 2048


def row_sum(x: tf.Tensor) -> tf.Tensor:
  """Σ over the last axis, [..., M] -> [...], as matrix-vector products with a vector of ones.

  Why not `tf.reduce_sum`: XLA:CPU runs a reduction as a kernel of its own over a materialised
  input, so `reduce_sum(f(x))` over the [B, K] queue logits writes f(x) to memory (64 MB at
  B = 256, K = 65,536) and reads it back, while it emits a matrix-vector product with a short
  vector as one loop that computes f(x) on the fly (docs/BENCHMARKS.md, "Fewer passes over
  [B, K]").
  Rows longer than `_ROW_SUM_PIECE` are summed in pieces of a divisor of M, then the pieces. The
  value is the same sum up to the order of the additions. An M unknown when tracing is summed
  by `tf.reduce_sum`, and so is everything where TensorFlow sees a GPU or a TPU: a TPU multiplies
  float32 in bfloat16 passes and a recent GPU in TensorFloat-32 by default, which would round
  every summand, and their compilers fuse reductions with their producers anyway.
  """
  x = tf.convert_to_tensor(x)
  width = x.shape[-1]
  if width is None or distribute.accelerator_visible():
    return tf.reduce_sum(x, axis=-1)
  piece = next(p for p in range(min(width, _ROW_SUM_PIECE), 0, -1) if width % p == 0)
  if piece < 64:  # e.g. a prime M: one product over the whole row (correct, not fused)
    piece = width
  flat = tf.reshape(x, [-1, piece])
  sums = tf.linalg.matvec(flat, tf.ones([piece], flat.dtype))
  sums = tf.reshape(sums, tf.concat([tf.shape(x)[:-1], [width // piece]], axis=0))
  return sums[..., 0] if piece == width else tf.reduce_sum(sums, axis=-1)


def as_blocks(l_neg) -> tuple:
  """A [B, M] tensor, or a sequence of [B, M_i] blocks meaning their concatenation along the
  last axis, as a tuple of blocks. The losses below take either: MoCHi's synthetic logits are a
  second block beside the K queue logits, so no [B, K + s + s'] copy is made."""
  return tuple(l_neg) if isinstance(l_neg, (tuple, list)) else (l_neg,)


def count_negatives(l_neg) -> tf.Tensor:
  """Number of present (finite) negatives per query: [B, M] (or blocks) -> [B] float32."""
  return tf.add_n([row_sum(tf.cast(tf.math.is_finite(b), tf.float32)) for b in as_blocks(l_neg)])


def _log_sum_exp(blocks, temperature: float = 1.0, factor: float = 1.0) -> tf.Tensor:
  """log Σ exp(factor·x/temperature) over the last axis of the blocks [B, M_i] together, [B];
  -inf for a row that is -inf everywhere, with finite gradients (0 on such a row).

  factor and temperature are > 0, so the row max is taken of the raw logits and scaled after
  (the same float: scaling by a positive number preserves order). The gradient, the softmax
  exp(z − LSE), is computed afresh from the logits rather than from the forward pass's exp(z):
  with `row_sum`, XLA then reads each block for the max and for the sum, and writes only the
  gradient, never an exponentiated copy of the [B, K] logits.
  """
  blocks = tuple(tf.cast(b, tf.float32) for b in as_blocks(blocks))
  scale = factor / temperature

  def z(b):  # the scaled logits, as in the forward pass
    return factor * (b / temperature)

  @tf.custom_gradient
  def lse(*blocks):
    m = tf.reduce_max(tf.stack([tf.reduce_max(b, axis=-1) for b in blocks], axis=-1), axis=-1)
    # tf.reduce_logsumexp gives NaN (inf - inf) on an all -inf row; shift by a finite max.
    m = tf.where(tf.math.is_finite(m), factor * (m / temperature), 0.0)
    value = tf.math.log(tf.add_n([row_sum(tf.exp(z(b) - m[:, None])) for b in blocks])) + m

    def grad(dy):
      shift = tf.where(tf.math.is_finite(value), value, 0.0)[:, None]
      return tuple(dy[:, None] * scale * tf.exp(z(b) - shift) for b in blocks)

    return value, grad

  return lse(*blocks)


def _debiased_from_log_sum(pos: tf.Tensor, log_sum_neg: tf.Tensor, n: tf.Tensor,
                           temperature: float, tau_plus: float) -> tf.Tensor:
  """−log(e^pos / (e^pos + Ng)) with Ng the clamped debiased estimate, all in log space.

  Args:
    pos: [B] l+/t.
    log_sum_neg: [B] log of the (possibly reweighted) sum of e^{l_j/t} over the negatives.
    n: [B] the number of negatives N.
    temperature: t.
    tau_plus: τ+ in [0, 1).

  Returns:
    [B] per-example losses.
  """
  log_n = tf.math.log(tf.maximum(n, 1.0))
  log_floor = log_n - 1.0 / temperature  # log(N·e^{−1/t}): e^{cos/t} >= e^{−1/t}.
  if tau_plus > 0.0:
    # log Ng_raw = A + log(1 − τ+·N·e^pos / e^A) − log(1 − τ+), valid while the bracket is > 0.
    r = math.log(tau_plus) + log_n + pos - log_sum_neg  # [B], the bracket is 1 − e^r
    valid = r < 0.0
    r_safe = tf.where(valid, r, -tf.ones_like(r))  # keep log1p away from log(0) in the dead branch
    log_raw = log_sum_neg + tf.math.log1p(-tf.exp(r_safe)) - math.log1p(-tau_plus)
    log_ng = tf.where(valid, tf.maximum(log_raw, log_floor), log_floor)
  else:
    log_ng = tf.maximum(log_sum_neg, log_floor)
  # −log(e^pos / (e^pos + e^log_ng)) = softplus(log_ng − pos)
  return tf.nn.softplus(log_ng - pos)


# ------------------------------------------------------------------------------------------------
# The loss family


def info_nce(l_pos: tf.Tensor, l_neg: tf.Tensor, temperature: float) -> tf.Tensor:
  """MoCo's InfoNCE: cross-entropy of [l+ | l_neg] / T with target 0.

  Args:
    l_pos: [B] positive cosine logits.
    l_neg: [B, M] negative cosine logits (-inf = absent), or blocks of them (`as_blocks`).
    temperature: T > 0.

  Returns:
    [B] float32 per-example losses.
  """
  pos = tf.cast(l_pos, tf.float32)
  return _log_sum_exp((pos[:, None],) + as_blocks(l_neg), temperature) - pos / temperature


def debiased(l_pos: tf.Tensor, l_neg: tf.Tensor, temperature: float,
             tau_plus: float) -> tf.Tensor:
  """Debiased contrastive loss (Chuang et al. 2020) with one positive (M = 1).

  Args:
    l_pos: [B] positive cosine logits.
    l_neg: [B, M] negative cosine logits (-inf = absent; N counts the finite ones), or blocks
      of them (`as_blocks`).
    temperature: t > 0.
    tau_plus: τ+ in [0, 1); τ+ = 0 gives InfoNCE (up to the e^{−1/t} floor, which never binds).

  Returns:
    [B] float32 per-example losses.
  """
  pos = tf.cast(l_pos, tf.float32) / temperature
  return _debiased_from_log_sum(pos, _log_sum_exp(l_neg, temperature), count_negatives(l_neg),
                                temperature, tau_plus)


def hard(l_pos: tf.Tensor, l_neg: tf.Tensor, temperature: float, tau_plus: float,
         beta: float) -> tf.Tensor:
  """Hard-negative reweighting (Robinson et al. 2021), debiased with τ+.

  The reweighted sum Σ_j w_j e^{l_j/t} / mean_j(w_j), w_j = e^{β l_j/t}, is
  exp(LSE((1+β)·l/t) − LSE(β·l/t) + log N) in log space. β = 0 gives the debiased loss.

  Args:
    l_pos: [B] positive cosine logits.
    l_neg: [B, M] negative cosine logits (-inf = absent), or blocks of them (`as_blocks`).
    temperature: t > 0.
    tau_plus: τ+ in [0, 1).
    beta: β >= 0.

  Returns:
    [B] float32 per-example losses.
  """
  if beta == 0:
    # w_j = 1: exactly the debiased loss (β·(-inf) would be NaN for an absent negative).
    return debiased(l_pos, l_neg, temperature, tau_plus)
  pos = tf.cast(l_pos, tf.float32) / temperature
  n = count_negatives(l_neg)
  log_reweighted = (_log_sum_exp(l_neg, temperature, 1.0 + beta)
                    - _log_sum_exp(l_neg, temperature, beta) + tf.math.log(tf.maximum(n, 1.0)))
  return _debiased_from_log_sum(pos, log_reweighted, n, temperature, tau_plus)


def contrastive_loss(l_pos: tf.Tensor, l_neg: tf.Tensor, *, loss: str = "infonce",
                     temperature: float = 0.2, tau_plus: float = 0.1,
                     hard_beta: float = 1.0) -> tf.Tensor:
  """Dispatches to one loss of the family by name ("infonce" | "debiased" | "hard").

  Args:
    l_pos: [B] positive cosine logits.
    l_neg: [B, M] negative cosine logits (-inf = absent), or blocks of them (`as_blocks`).
    loss: the loss name.
    temperature: T > 0.
    tau_plus: τ+ for "debiased" and "hard".
    hard_beta: β for "hard".

  Returns:
    [B] float32 per-example losses.
  """
  check_loss_name(loss)
  check_temperature(temperature)
  if loss == "infonce":
    return info_nce(l_pos, l_neg, temperature)
  check_tau_plus(tau_plus)
  if loss == "debiased":
    return debiased(l_pos, l_neg, temperature, tau_plus)
  return hard(l_pos, l_neg, temperature, tau_plus, check_hard_beta(hard_beta))


# ------------------------------------------------------------------------------------------------
# Cai et al.: remove the hardest negatives, or keep only them


def num_hardest(percent: float, num_negatives: int) -> int:
  """⌈p·K/100⌉, at least 1: how many negatives p% of a queue of K is."""
  return max(1, int(math.ceil(percent * num_negatives / 100.0 - 1e-9)))


def hardest_negatives_mask(l_neg: tf.Tensor, *, drop_hardest: float | None = None,
                           keep_hardest: float | None = None) -> tf.Tensor:
  """Which queue negatives to remove for Cai et al.'s ablations.

  For each query, the negatives are ranked by q·n. `drop_hardest=p` removes the top ⌈p·K/100⌉;
  `keep_hardest=p` removes everything outside the top ⌈p·K/100⌉. Exactly that many entries are
  removed/kept per row (ties broken by top_k's order), so the negative count N stays exact.

  Args:
    l_neg: [B, K] queue cosine logits (already-absent entries may be -inf).
    drop_hardest: p in (0, 100) or None.
    keep_hardest: p in (0, 100) or None. At most one of the two may be given.

  Returns:
    [B, K] bool, True where the negative must be removed (set to -inf).
  """
  if drop_hardest is not None and keep_hardest is not None:
    raise ValueError("drop_hardest and keep_hardest are exclusive: give at most one.")
  shape = tf.shape(l_neg)
  if drop_hardest is None and keep_hardest is None:
    return tf.zeros(shape, tf.bool)
  percent = check_percent("drop_hardest" if drop_hardest is not None else "keep_hardest",
                          drop_hardest if drop_hardest is not None else keep_hardest)
  k_static = l_neg.shape[-1]
  if k_static is None:
    raise ValueError("hardest_negatives_mask needs a static number of negatives K.")
  m = num_hardest(percent, k_static)
  _, idx = tf.math.top_k(tf.stop_gradient(l_neg), k=m, sorted=False)  # [B, m]
  rows = tf.broadcast_to(tf.range(shape[0])[:, None], tf.shape(idx))
  scatter_idx = tf.stack([rows, idx], axis=-1)  # [B, m, 2]
  in_top = tf.scatter_nd(scatter_idx, tf.ones(tf.shape(idx), tf.bool), shape)  # [B, K]
  return in_top if drop_hardest is not None else tf.logical_not(in_top)


def apply_mask(l_neg: tf.Tensor, remove: tf.Tensor) -> tf.Tensor:
  """Sets removed negatives to -inf: [B, M], [B, M] bool -> [B, M]."""
  return tf.where(remove, tf.constant(_NEG_INF, l_neg.dtype), l_neg)


# ------------------------------------------------------------------------------------------------
# Supervised contrastive (Khosla et al.)


def supcon_from_logits(logits: tf.Tensor, positive_mask: tf.Tensor, temperature: float,
                       base_temperature: float | None = None) -> tf.Tensor:
  """SupCon L_out for one anchor per row, over any set of candidates.

  L_i = −(1/|P(i)|) Σ_{p∈P(i)} [ l_p/t − log Σ_{a∈A(i)} e^{l_a/t} ], A(i) = every present entry of
  the row. With a single positive per row this is exactly InfoNCE. Rows without a positive give 0
  (as the reference code since its "nan" fix).

  Args:
    logits: [B, M] cosine logits of each anchor against its candidates (-inf = absent).
    positive_mask: [B, M] bool, True for the anchor's positives (must be present entries).
    temperature: t > 0.
    base_temperature: if given, the loss is scaled by t / base_temperature as in the reference code.

  Returns:
    [B] float32 per-anchor losses.
  """
  z = tf.cast(logits, tf.float32) / temperature
  log_denominator = _log_sum_exp(z)  # [B]
  pos = tf.cast(positive_mask, tf.float32)
  num_pos = tf.reduce_sum(pos, axis=-1)
  z_pos = tf.where(positive_mask, z, tf.zeros_like(z))  # avoid 0 * -inf
  mean_log_prob = (tf.reduce_sum(z_pos, -1) - num_pos * log_denominator) / tf.maximum(num_pos, 1.0)
  loss = -mean_log_prob
  if base_temperature is not None:
    loss = loss * (temperature / base_temperature)
  return tf.where(num_pos > 0, loss, tf.zeros_like(loss))


def supcon_batch(features: tf.Tensor, labels: tf.Tensor | None, temperature: float = 0.07,
                 base_temperature: float = 0.07) -> tf.Tensor:
  """The batch SupCon loss of the reference code (`contrast_mode='all'`), mean over anchors.

  Args:
    features: [bsz, n_views, d] L2-normalised features.
    labels: [bsz] int labels, or None for SimCLR (each sample's other views are its positives).
    temperature: t.
    base_temperature: the reference code scales the loss by t / base_temperature.

  Returns:
    Scalar loss.
  """
  features = tf.cast(features, tf.float32)
  bsz, n_views = tf.shape(features)[0], tf.shape(features)[1]
  # View-major concatenation, as the reference code: [v0 of all samples, v1 of all samples, ...].
  flat = tf.reshape(tf.transpose(features, [1, 0, 2]), [bsz * n_views, -1])
  if labels is None:
    labels = tf.range(bsz)
  labels = tf.tile(tf.reshape(labels, [-1]), [n_views])
  logits = tf.matmul(flat, flat, transpose_b=True)
  n = tf.shape(flat)[0]
  self_mask = tf.eye(n, dtype=tf.bool)
  logits = tf.where(self_mask, tf.constant(_NEG_INF, logits.dtype), logits)
  positives = tf.logical_and(tf.equal(labels[:, None], labels[None, :]),
                             tf.logical_not(self_mask))
  return tf.reduce_mean(supcon_from_logits(logits, positives, temperature, base_temperature))


# ------------------------------------------------------------------------------------------------
# Alignment and uniformity (Wang & Isola 2020)


def alignment(x: tf.Tensor, y: tf.Tensor, alpha: float = 2.0) -> tf.Tensor:
  """L_align = mean_i ‖x_i − y_i‖^α for positive pairs: [B, D], [B, D] -> scalar."""
  return tf.reduce_mean(tf.pow(tf.norm(tf.cast(x, tf.float32) - tf.cast(y, tf.float32), axis=-1),
                               alpha))


def uniformity(x: tf.Tensor, t: float = 2.0) -> tf.Tensor:
  """L_uniform = log mean_{i<j} exp(−t‖x_i − x_j‖²): [B, D] -> scalar (diagonal excluded)."""
  x = tf.cast(x, tf.float32)
  sq = tf.reduce_sum(x * x, -1)
  d2 = tf.maximum(sq[:, None] + sq[None, :] - 2.0 * tf.matmul(x, x, transpose_b=True), 0.0)
  n = tf.shape(x)[0]
  upper = tf.linalg.band_part(tf.ones([n, n], tf.bool), 0, -1)
  upper = tf.logical_and(upper, tf.logical_not(tf.eye(n, dtype=tf.bool)))  # i < j
  vals = tf.boolean_mask(-t * d2, upper)
  return tf.reduce_logsumexp(vals) - tf.math.log(tf.cast(tf.size(vals), tf.float32))


# ------------------------------------------------------------------------------------------------
# Proxy task accuracy


def proxy_accuracy(l_pos: tf.Tensor, l_neg: tf.Tensor,
                   topk: Sequence[int] = (1, 5)) -> dict[int, tf.Tensor]:
  """(1 + M)-way instance-discrimination accuracy, MoCo's logged Acc@1/Acc@5.

  A query is right at k when fewer than k negatives score strictly above its positive.

  Args:
    l_pos: [B] positive logits.
    l_neg: [B, M] negative logits (-inf = absent).
    topk: the k values.

  Returns:
    {k: [B] float32 in {0, 1}}.
  """
  rank = proxy_rank(l_pos, l_neg)
  return {k: tf.cast(rank < k, tf.float32) for k in topk}


def proxy_rank(l_pos: tf.Tensor, l_neg: tf.Tensor) -> tf.Tensor:
  """[B], [B, M] -> [B] int32: how many negatives score strictly above each positive (the query
  is right at k when this is below k; ranks over parts of a row add up)."""
  # Counted in float32 by `row_sum` (exact below 2^24 negatives): no [B, M] int copy under XLA.
  return tf.cast(tf.add_n([row_sum(tf.cast(b > l_pos[:, None], tf.float32))
                           for b in as_blocks(l_neg)]), tf.int32)
