"""What the negatives of a trained MoCo / MoCHi model look like, measured on plain arrays.

`negatives_report(q, k, queue, q_labels, queue_labels, temperature, ...)` takes M L2-normalised
queries q, their positive keys k and a queue of K negatives, and measures, per query, with
l_neg = q·n over its negatives (a queue entry with the query's own id is not one of them, as with
`--mask_duplicates`):

* distribution of q·n: per-query percentiles (50, 90, 99, 99.9, max) averaged over queries;
  histograms of all negatives vs each query's hardest 1% vs the positives q·k;
* false negatives: the share of same-class negatives among each query's hardest 0.1%, 1%, 5%
  (⌈p·K/100⌉ entries, at least 1) and overall (= the class prior, i.e. chance);
* gradient share per hardness band (Cai et al.): ∂InfoNCE/∂l_neg_j = p_j / T with p the softmax
  over [l_pos | l_neg] / T, so band b carries Σ_{j∈b} p_j / Σ_j p_j of the negatives' gradient.
  Bands are per-query rank ranges [0, 0.1%), [0.1, 1%), [1, 5%), [5, 20%), [20, 100%];
* MoCHi(N, s, s') via `mixing.synthesize(..., return_features=True)`: q·h and q·h' against q·n of
  the queue and of its top N, the share of synthetic points harder than the hardest real
  negative, and how often they are mixed from same-class (false) negatives;
* alignment (α = 2) of the positive pairs, uniformity (t = 2) of queries and keys (Wang & Isola),
  proxy-task top-1/top-5 of the positive among [positive | queue] and the InfoNCE loss;
* with a class similarity (e.g. WordNet's, `wordnet`): the similarity between a query's class and
  the classes of its hardest (different-class) negatives vs random negatives.

Conventions: shares are fractions in [0, 1]; accuracies are in % (as MoCo logs them). Queries
are processed in chunks, so memory stays at chunk x K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfmochi import losses as losses_lib
from tfmochi import mixing

# Hardness bands in % of each query's negatives, hardest first (Cai et al.'s cut points).
DEFAULT_BANDS = ((0.0, 0.1), (0.1, 1.0), (1.0, 5.0), (5.0, 20.0), (20.0, 100.0))
FALSE_NEGATIVE_PERCENTS = (0.1, 1.0, 5.0)
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
HARDEST_PERCENT = 1.0
# Fine fixed bins (width 0.001) so chunks can be summed; the plots zoom in on the occupied range.
HIST_EDGES = np.linspace(-1.0, 1.0, 2001)
UNIFORMITY_MAX_POINTS = 4096
WORDNET_PAIRS_PER_QUERY = 20

ClassSimilarity = Callable[[int, int], float]


class AnalyzeError(ValueError):
  """The analysis cannot run as asked (unlabelled data, bad setting, unwritable output)."""


# -------------------------------------------------------------------------------------------------
# Per-row helpers on [rows, K] arrays sorted hardest first (masked entries = -inf, at the end)


def pct_key(percent: float) -> str:
  """0.1 -> "0.1pct", 1.0 -> "1pct" (JSON keys)."""
  return f"{percent:g}pct"


def percentile_key(percent: float) -> str:
  return f"p{percent:g}"


def band_label(low: float, high: float) -> str:
  return f"[{low:g}, {high:g}%{']' if high >= 100 else ')'}"


def num_in_top(percent: float, counts: np.ndarray) -> np.ndarray:
  """Per-row size of the hardest `percent`% of `counts` negatives: ⌈p·n/100⌉, in [1, n].

  percent = 0 gives 0 and 100 gives n; this is `losses.num_hardest` row by row, so the bands
  here are the sets that `--drop_hardest` / `--keep_hardest` act on.
  """
  counts = np.asarray(counts, np.int64)
  if percent <= 0:
    return np.zeros_like(counts)
  if percent >= 100:
    return counts
  m = np.ceil(percent * counts / 100.0 - 1e-9).astype(np.int64)
  return np.clip(m, 1, np.maximum(counts, 1))


def row_percentiles(desc: np.ndarray, counts: np.ndarray,
                    percentiles: Sequence[float]) -> np.ndarray:
  """Percentiles of each row's first `counts` values (NumPy's default "linear" method).

  Args:
    desc: [R, X] rows sorted in descending order (the valid entries first).
    counts: [R] number of valid entries per row (>= 1).
    percentiles: P values in [0, 100].

  Returns:
    [R, P] float64.
  """
  desc = np.asarray(desc, np.float64)
  counts = np.asarray(counts, np.int64)
  rows = np.arange(len(desc))
  out = np.empty([len(desc), len(percentiles)], np.float64)
  for i, p in enumerate(percentiles):
    pos = (counts - 1) * (p / 100.0)  # position in the ascending order
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    frac = pos - lo
    # ascending index a <-> descending index n - 1 - a
    v_lo = desc[rows, counts - 1 - lo]
    v_hi = desc[rows, counts - 1 - hi]
    out[:, i] = v_lo + (v_hi - v_lo) * frac
  return out


def sort_hardest_first(l_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(order [R, K], values [R, K] descending, counts [R]) of negatives; -inf entries go last."""
  order = np.argsort(-l_neg, axis=1, kind="stable")
  desc = np.take_along_axis(l_neg, order, axis=1)
  counts = np.isfinite(l_neg).sum(axis=1)
  return order, desc, counts


def band_gradient_shares(desc: np.ndarray, counts: np.ndarray, temperature: float,
                         bands: Sequence[tuple[float, float]] = DEFAULT_BANDS) -> np.ndarray:
  """Share of the InfoNCE gradient on the negatives carried by each hardness band, per query.

  ∂L/∂l_neg_j = p_j / T (p = softmax of [l_pos | l_neg] / T), so the share of band b is
  Σ_{j∈b} e^{l_j/T} / Σ_j e^{l_j/T}; the positive cancels out.

  Args:
    desc: [R, K] negative logits sorted hardest first (-inf = absent, at the end).
    counts: [R] valid negatives per row.
    temperature: T.
    bands: (low%, high%) rank ranges; a band holds ranks [num_in_top(low), num_in_top(high)).

  Returns:
    [R, len(bands)]; rows sum to 1 when the bands tile [0, 100].
  """
  desc = np.asarray(desc, np.float64)
  z = (desc - desc[:, :1]) / temperature  # shift by the row max: no overflow
  w = np.where(np.isfinite(z), np.exp(z), 0.0)
  cum = np.concatenate([np.zeros([len(w), 1]), np.cumsum(w, axis=1)], axis=1)  # [R, K + 1]
  rows = np.arange(len(w))
  total = cum[rows, counts]
  shares = np.empty([len(w), len(bands)])
  for b, (low, high) in enumerate(bands):
    start, end = num_in_top(low, counts), num_in_top(high, counts)
    shares[:, b] = (cum[rows, np.maximum(end, start)] - cum[rows, start]) / total
  return shares


def _mean(values) -> float | None:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else None


def _summary(desc: np.ndarray, counts: np.ndarray,
             percentiles: Sequence[float] = PERCENTILES) -> dict:
  """Mean over rows of each row's mean, percentiles and max (rows with no entry are skipped)."""
  keep = counts > 0
  if not keep.any():
    return {}
  desc, counts = np.asarray(desc, np.float64)[keep], np.asarray(counts)[keep]
  valid = np.arange(desc.shape[1])[None, :] < counts[:, None]
  row_means = np.where(valid, desc, 0.0).sum(1) / counts
  out = {"mean": float(row_means.mean())}
  per = row_percentiles(desc, counts, percentiles)
  for i, p in enumerate(percentiles):
    out[percentile_key(p)] = float(per[:, i].mean())
  out["max"] = float(desc[:, 0].mean())
  return out


# -------------------------------------------------------------------------------------------------
# Accumulators over query chunks


class _Histograms:
  """Pooled histogram counts on fixed cosine bins [-1, 1]."""

  def __init__(self):
    self.counts: dict[str, np.ndarray] = {}

  def add(self, name: str, values) -> None:
    values = np.asarray(values, np.float64).ravel()
    values = np.clip(values[np.isfinite(values)], -1.0, 1.0)
    counts, _ = np.histogram(values, bins=HIST_EDGES)
    self.counts[name] = self.counts.get(name, np.zeros_like(counts)) + counts

  def to_json(self) -> dict:
    return {"edges": [float(e) for e in HIST_EDGES],
            **{name: [int(c) for c in counts] for name, counts in self.counts.items()}}


@dataclasses.dataclass
class _Rows:
  """Per-query values gathered chunk by chunk, concatenated at the end."""
  parts: dict = dataclasses.field(default_factory=dict)

  def add(self, name: str, values) -> None:
    self.parts.setdefault(name, []).append(np.asarray(values))

  def get(self, name: str) -> np.ndarray:
    return np.concatenate(self.parts[name], axis=0)

  def __contains__(self, name: str) -> bool:
    return name in self.parts



# -------------------------------------------------------------------------------------------------
# The report on plain arrays


@dataclasses.dataclass(frozen=True)
class _Measures:
  """What `negatives_report` measures (see its arguments)."""
  temperature: float
  bands: Sequence[tuple[float, float]]
  fn_percents: Sequence[float]
  percentiles: Sequence[float]
  hardest_percent: float


@dataclasses.dataclass
class _Accumulated:
  """What the chunks of queries add up: per-query rows, histograms, class pairs, MoCHi's check."""
  rows: _Rows = dataclasses.field(default_factory=_Rows)
  hist: _Histograms = dataclasses.field(default_factory=_Histograms)
  pairs: dict = dataclasses.field(default_factory=lambda: {"hardest": [], "random": []})
  masked: int = 0  # duplicates masked
  mochi_diff: float = 0.0  # max |q·h - MoCHi's logit of h|


@dataclasses.dataclass
class _Chunk:
  """c queries with their K negatives ranked hardest first (masked negatives: -inf, last)."""
  index: int  # the chunk's number: MoCHi's per-step seed
  q: np.ndarray  # [c, D] float32
  labels: np.ndarray  # [c] int, -1 = unknown
  l_pos: np.ndarray  # [c] float64, q·k
  l_neg: np.ndarray  # [c, K] float64, q·n in queue order
  order: np.ndarray  # [c, K] queue indices, hardest first
  desc: np.ndarray  # [c, K] l_neg in that order
  counts: np.ndarray  # [c] negatives per query
  hardest: np.ndarray  # [c] size of the hardest `hardest_percent`%
  sorted_labels: np.ndarray  # [c, K] queue labels in that order

  def first(self, m: np.ndarray) -> np.ndarray:
    """[c, K] bool: the first m[i] ranks of row i."""
    return np.arange(self.desc.shape[1])[None, :] < m[:, None]


def _rank_chunk(index: int, q: np.ndarray, k: np.ndarray, labels: np.ndarray,
                queue64: np.ndarray, queue_labels: np.ndarray, duplicates: np.ndarray | None,
                hardest_percent: float) -> _Chunk:
  """Ranks the queue for queries q [c, D] (positives k [c, D]); `duplicates` [c, K] are masked."""
  l_neg = q.astype(np.float64) @ queue64.T  # [c, K]
  if duplicates is not None:
    l_neg = np.where(duplicates, -np.inf, l_neg)
  l_pos = np.sum(q.astype(np.float64) * k.astype(np.float64), axis=1)  # [c]
  order, desc, counts = sort_hardest_first(l_neg)
  if (counts == 0).any():
    raise AnalyzeError("A query has no negative left after the duplicate mask (queue of "
                       f"{len(queue64)}); use a larger queue.")
  return _Chunk(index, q, labels, l_pos, l_neg, order, desc, counts,
                num_in_top(hardest_percent, counts), queue_labels[order])


def _similarity_rows(ch: _Chunk, measures: _Measures, rows: _Rows, hist: _Histograms) -> None:
  """q·n and q·k: histograms, per-query percentiles, mean, max and mean of the hardest."""
  valid = ch.first(ch.counts)
  rows.add("counts", ch.counts)
  rows.add("l_pos", ch.l_pos)
  hist.add("positives", ch.l_pos)
  hist.add("negatives_all", ch.desc[valid])
  hist.add(f"negatives_hardest_{pct_key(measures.hardest_percent)}", ch.desc[ch.first(ch.hardest)])
  rows.add("percentiles", row_percentiles(ch.desc, ch.counts, measures.percentiles))
  rows.add("max", ch.desc[:, 0])
  rows.add("mean", np.where(valid, ch.desc, 0.0).sum(1) / ch.counts)
  rows.add("hardest_mean", np.where(ch.first(ch.hardest), ch.desc, 0.0).sum(1) / ch.hardest)


def _false_negative_rows(ch: _Chunk, measures: _Measures, rows: _Rows) -> None:
  """Shares of same (known) class negatives: among the hardest p%, overall, per band."""
  labels, counts = ch.labels, ch.counts
  same = ((ch.sorted_labels == labels[:, None]) & (labels[:, None] >= 0)
          & (ch.sorted_labels >= 0))
  same &= ch.first(counts)
  cum_same = np.concatenate([np.zeros([len(same), 1]), np.cumsum(same, axis=1)], axis=1)
  ridx = np.arange(len(same))
  for p in measures.fn_percents:
    m = num_in_top(p, counts)
    rows.add(f"fn_{pct_key(p)}", cum_same[ridx, m] / m)
  rows.add("fn_overall", cum_same[ridx, counts] / counts)
  band_fn = []
  for low, high in measures.bands:
    a, b = num_in_top(low, counts), num_in_top(high, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
      band_fn.append(np.where(b > a, (cum_same[ridx, np.maximum(b, a)] - cum_same[ridx, a])
                              / np.maximum(b - a, 1), np.nan))
  rows.add("band_fn", np.stack(band_fn, axis=1))


def _gradient_rows(ch: _Chunk, measures: _Measures, rows: _Rows) -> None:
  """Gradient shares by hardness band, InfoNCE, the negatives' softmax mass 1 - p_pos, proxy."""
  temperature = measures.temperature
  rows.add("band_share", band_gradient_shares(ch.desc, ch.counts, temperature, measures.bands))
  rows.add("cum_share_5", band_gradient_shares(ch.desc, ch.counts, temperature,
                                               [(0.0, 5.0)])[:, 0])
  l_neg_tf = tf.constant(ch.l_neg, tf.float32)
  l_pos_tf = tf.constant(ch.l_pos, tf.float32)
  loss = losses_lib.info_nce(l_pos_tf, l_neg_tf, temperature).numpy()
  rows.add("loss", loss)
  rows.add("neg_mass", 1.0 - np.exp(-loss))  # p_pos = exp(-loss) for InfoNCE
  acc = losses_lib.proxy_accuracy(l_pos_tf, l_neg_tf, (1, 5))
  rows.add("acc1", acc[1].numpy())
  rows.add("acc5", acc[5].numpy())


def _add_semantic_pairs(ch: _Chunk, rng: np.random.Generator, pairs: dict) -> None:
  """(query class, negative class) pairs: hardest different-class negatives, and random ones."""
  labels = ch.labels
  for i in range(len(labels)):
    if labels[i] < 0:
      continue
    hard = [int(x) for x in ch.sorted_labels[i, :ch.hardest[i]] if x >= 0 and x != labels[i]]
    hard = hard[:WORDNET_PAIRS_PER_QUERY]
    pool = ch.sorted_labels[i, :ch.counts[i]]
    pool = pool[(pool >= 0) & (pool != labels[i])]
    rand = rng.choice(pool, size=min(len(pool), WORDNET_PAIRS_PER_QUERY), replace=False) \
        if len(pool) else []
    pairs["hardest"] += [(int(labels[i]), x) for x in hard]
    pairs["random"] += [(int(labels[i]), int(x)) for x in rand]


def _mochi_rows(ch: _Chunk, queue_tf: tf.Tensor, queue_labels: np.ndarray,
                mochi: mixing.MochiConfig, seed: int, rows: _Rows, hist: _Histograms) -> float:
  """MoCHi's synthetic negatives from this chunk's hardest; returns max |q·h - logit h|."""
  labels, size = ch.labels, ch.desc.shape[1]
  syn = mixing.synthesize(tf.constant(ch.q), queue_tf, tf.constant(ch.l_neg, tf.float32),
                          mixing.step_seed(seed, ch.index), mochi, return_features=True,
                          jit_compile=False)
  logits = syn.logits.numpy().astype(np.float64)  # [c, s + s']
  from_features = np.einsum("bd,bsd->bs", ch.q.astype(np.float64),
                            syn.features.numpy().astype(np.float64))
  finite = np.isfinite(logits)
  diff = float(np.abs(from_features - logits)[finite].max()) if finite.any() else 0.0
  n_top = np.minimum(ch.counts, mochi.num_hard)
  rows.add("mochi_top_desc", ch.desc[:, :mochi.num_hard])
  rows.add("mochi_top_counts", n_top)
  hist.add("mochi_queue_top_n", ch.desc[np.arange(size)[None, :] < n_top[:, None]])
  hard_labels = queue_labels[syn.hard_indices.numpy()]
  rows.add("mochi_fn_top_n", ((hard_labels == labels[:, None]) & (labels[:, None] >= 0))
           .mean(axis=1))
  s1 = mochi.num_mix
  for name, part, idx in (("type1", logits[:, :s1], syn.mix_indices.numpy()),
                          ("type2", logits[:, s1:], syn.query_mix_indices.numpy())):
    if part.shape[1] == 0:
      continue
    rows.add(f"mochi_{name}_desc", -np.sort(-part, axis=1))
    rows.add(f"mochi_{name}_counts", np.isfinite(part).sum(axis=1))
    hist.add(f"mochi_{name}", part)
    rows.add(f"mochi_{name}_harder", (part > ch.desc[:, :1]).mean(axis=1))
    shaped = labels.reshape([-1] + [1] * (idx.ndim - 1))
    src_same = (queue_labels[idx] == shaped) & (shaped >= 0)
    if name == "type1":  # [c, s, 2]: mixed from one or two same-class negatives
      rows.add("mochi_fn_type1_any", src_same.any(axis=2).mean(axis=1))
      rows.add("mochi_fn_type1_both", src_same.all(axis=2).mean(axis=1))
    else:
      rows.add("mochi_fn_type2", src_same.mean(axis=1))
  return diff


def _summarise(rows: _Rows, measures: _Measures, q: np.ndarray, k: np.ndarray,
               queue: np.ndarray, masked_total: int) -> dict:
  """The report's numbers: the per-query rows averaged, and the whole-set measures."""
  counts, per, l_pos = rows.get("counts"), rows.get("percentiles"), rows.get("l_pos")
  hardest = pct_key(measures.hardest_percent)
  return {
      "num_queries": int(q.shape[0]), "queue_size": int(queue.shape[0]),
      "embedding_dim": int(q.shape[1]), "temperature": float(measures.temperature),
      "duplicates_masked": int(masked_total),
      "negatives_per_query": {"min": int(counts.min()), "max": int(counts.max())},
      "negatives": {"mean": float(rows.get("mean").mean()),
                    **{percentile_key(p): float(per[:, i].mean())
                       for i, p in enumerate(measures.percentiles)},
                    "max": float(rows.get("max").mean()),
                    f"hardest_{hardest}_mean": float(rows.get("hardest_mean").mean())},
      "positives": {"mean": float(l_pos.mean()),
                    **{percentile_key(p): float(np.percentile(l_pos, p))
                       for p in measures.percentiles},
                    "max": float(l_pos.max())},
      "false_negatives": {**{f"hardest_{pct_key(p)}": float(rows.get(f"fn_{pct_key(p)}").mean())
                             for p in measures.fn_percents},
                          "overall": float(rows.get("fn_overall").mean())},
      "gradient_share": {
          "bands": [band_label(lo, hi) for lo, hi in measures.bands],
          "share": [float(x) for x in rows.get("band_share").mean(axis=0)],
          "false_negative_share": [_mean(col) for col in rows.get("band_fn").T],
          f"hardest_{pct_key(5.0)}": float(rows.get("cum_share_5").mean()),
      },
      "negative_probability_mass": float(rows.get("neg_mass").mean()),
      "infonce_loss": float(rows.get("loss").mean()),
      "proxy_top1": float(100.0 * rows.get("acc1").mean()),
      "proxy_top5": float(100.0 * rows.get("acc5").mean()),
      "alignment": float(losses_lib.alignment(q, k, alpha=2.0)),
      "uniformity": float(losses_lib.uniformity(q[:UNIFORMITY_MAX_POINTS], t=2.0)),
      "uniformity_queue": float(losses_lib.uniformity(queue[:UNIFORMITY_MAX_POINTS], t=2.0)),
      "mochi": None,
      "semantic_similarity": None,
  }


def _checked_arrays(q, k, queue, q_labels, queue_labels, temperature: float):
  """(q, k, queue) float32 and (q_labels, queue_labels) int64, or AnalyzeError naming the issue."""
  q = np.asarray(q, np.float32)
  k = np.asarray(k, np.float32)
  queue = np.asarray(queue, np.float32)
  q_labels = np.asarray(q_labels, np.int64).reshape([-1])
  queue_labels = np.asarray(queue_labels, np.int64).reshape([-1])
  m_queries, dim = q.shape
  size = queue.shape[0]
  if k.shape != q.shape or queue.shape[1] != dim or len(q_labels) != m_queries or len(
      queue_labels) != size:
    raise AnalyzeError(f"Shapes disagree: q {q.shape}, k {k.shape}, queue {queue.shape}, "
                       f"q_labels {q_labels.shape}, queue_labels {queue_labels.shape}.")
  if temperature <= 0:
    raise AnalyzeError(f"temperature must be > 0, got {temperature}.")
  return q, k, queue, q_labels, queue_labels


def _fitted_mochi(mochi: mixing.MochiConfig | None, size: int) -> mixing.MochiConfig | None:
  """`mochi` with N capped at the queue size K (validated), or None when it is off."""
  if mochi is None or not mochi.enabled:
    return None
  mochi = dataclasses.replace(mochi, num_hard=min(mochi.num_hard, size))
  mochi.validate(size)
  return mochi


def negatives_report(q, k, queue, q_labels, queue_labels, temperature: float, *,
                     q_ids=None, queue_ids=None, mochi: mixing.MochiConfig | None = None,
                     seed: int = 0, class_similarity: ClassSimilarity | None = None,
                     bands: Sequence[tuple[float, float]] = DEFAULT_BANDS,
                     fn_percents: Sequence[float] = FALSE_NEGATIVE_PERCENTS,
                     percentiles: Sequence[float] = PERCENTILES,
                     hardest_percent: float = HARDEST_PERCENT, chunk: int = 64) -> dict:
  """Everything the analysis measures, on arrays.

  Args:
    q: [M, D] L2-normalised queries.
    k: [M, D] their L2-normalised positive keys (the other view of the same image).
    queue: [K, D] L2-normalised negatives.
    q_labels: [M] int class of each query (-1 = unknown: never a false negative).
    queue_labels: [K] int class of each queue entry (-1 = unknown).
    temperature: T of the InfoNCE softmax (the run's --temperature).
    q_ids, queue_ids: [M], [K] sample ids; a queue entry with the query's id is not one of its
      negatives (the duplicate mask), as in training with --mask_duplicates.
    mochi: MoCHi(N, s, s') to synthesise from each query's hardest negatives (None: skip).
    seed: MoCHi draws and the random WordNet baseline.
    class_similarity: (class_a, class_b) -> similarity, e.g. `wordnet_class_similarity(wnids)`;
      None skips the semantic analysis.
    bands: hardness bands (low%, high%) for the gradient shares.
    fn_percents: hardest p% for the false-negative shares.
    percentiles: of the negative similarities.
    hardest_percent: the "hardest" set of the histograms and the semantic analysis.
    chunk: queries processed at a time (bounds memory at chunk x K).

  Returns:
    A JSON-serialisable dict (see the module docstring; `histograms` holds the pooled counts).

  Raises:
    AnalyzeError: shapes disagree, or a query has no negative left.
  """
  q, k, queue, q_labels, queue_labels = _checked_arrays(q, k, queue, q_labels, queue_labels,
                                                        temperature)
  if q_ids is not None and queue_ids is not None:
    q_ids = np.asarray(q_ids, np.int64).reshape([-1])
    queue_ids = np.asarray(queue_ids, np.int64).reshape([-1])
  else:
    q_ids = queue_ids = None
  mochi = _fitted_mochi(mochi, queue.shape[0])
  measures = _Measures(temperature, bands, fn_percents, percentiles, hardest_percent)
  acc = _Accumulated()
  rng = np.random.default_rng(seed)
  queue64, queue_tf = queue.astype(np.float64), tf.constant(queue)
  for c, start in enumerate(range(0, len(q), chunk)):
    sl = slice(start, min(start + chunk, len(q)))
    dup = q_ids[sl][:, None] == queue_ids[None, :] if q_ids is not None else None
    acc.masked += int(dup.sum()) if dup is not None else 0
    ch = _rank_chunk(c, q[sl], k[sl], q_labels[sl], queue64, queue_labels, dup, hardest_percent)
    _similarity_rows(ch, measures, acc.rows, acc.hist)
    _false_negative_rows(ch, measures, acc.rows)
    _gradient_rows(ch, measures, acc.rows)
    if class_similarity is not None:
      _add_semantic_pairs(ch, rng, acc.pairs)
    if mochi is not None:
      acc.mochi_diff = max(acc.mochi_diff, _mochi_rows(ch, queue_tf, queue_labels, mochi, seed,
                                                       acc.rows, acc.hist))
  return _finish(acc, measures, q, k, queue, mochi, class_similarity)


def _finish(acc: _Accumulated, measures: _Measures, q: np.ndarray, k: np.ndarray,
            queue: np.ndarray, mochi: mixing.MochiConfig | None,
            class_similarity: ClassSimilarity | None) -> dict:
  """The report of the accumulated chunks (see `negatives_report`)."""
  rows = acc.rows
  report = _summarise(rows, measures, q, k, queue, acc.masked)
  # The class prior the hardest shares are compared with (chance level).
  report["false_negatives"]["chance"] = report["false_negatives"]["overall"]
  if mochi is not None:
    report["mochi"] = _mochi_section(rows, mochi, acc.mochi_diff)
  if class_similarity is not None:
    report["semantic_similarity"] = _semantic_section(acc.pairs, class_similarity,
                                                      measures.hardest_percent)
  report["histograms"] = acc.hist.to_json()
  return report


def _mochi_section(rows: _Rows, config: mixing.MochiConfig, max_diff: float) -> dict:
  similarity = {"queue_top_n": _summary(rows.get("mochi_top_desc"),
                                        rows.get("mochi_top_counts"), (50.0, 90.0))}
  harder, fn = {}, {"top_n": float(rows.get("mochi_fn_top_n").mean())}
  for name in ("type1", "type2"):
    if f"mochi_{name}_desc" in rows:
      similarity[name] = _summary(rows.get(f"mochi_{name}_desc"),
                                  rows.get(f"mochi_{name}_counts"), (50.0, 90.0))
      harder[name] = float(rows.get(f"mochi_{name}_harder").mean())
    else:
      similarity[name], harder[name] = None, None
  fn["type1_any_source"] = (float(rows.get("mochi_fn_type1_any").mean())
                            if "mochi_fn_type1_any" in rows else None)
  fn["type1_both_sources"] = (float(rows.get("mochi_fn_type1_both").mean())
                              if "mochi_fn_type1_both" in rows else None)
  fn["type2"] = float(rows.get("mochi_fn_type2").mean()) if "mochi_fn_type2" in rows else None
  weights = [(config.num_mix, harder["type1"]), (config.num_query_mix, harder["type2"])]
  total = sum(n for n, h in weights if h is not None)
  harder["all"] = (sum(n * h for n, h in weights if h is not None) / total) if total else None
  return {"num_hard": config.num_hard, "num_mix": config.num_mix,
          "num_query_mix": config.num_query_mix, "beta_max": config.beta_max,
          "similarity": similarity, "harder_than_hardest_real": harder,
          "false_negatives": fn, "logit_vs_feature_max_abs_diff": float(max_diff)}


def _semantic_section(pairs: dict, similarity: ClassSimilarity, hardest_percent: float) -> dict:
  cache: dict[tuple[int, int], float] = {}

  def sim(a: int, b: int) -> float:
    key = (a, b) if a <= b else (b, a)
    if key not in cache:
      value = similarity(*key)
      cache[key] = float("nan") if value is None else float(value)
    return cache[key]

  out = {"available": True, "measure": getattr(similarity, "measure", "custom"),
         "pairs_per_query": WORDNET_PAIRS_PER_QUERY}
  for name in ("hardest", "random"):
    values = [sim(a, b) for a, b in pairs[name]]
    key = f"hardest_{pct_key(hardest_percent)}" if name == "hardest" else "random"
    out[key] = _mean(values)
    out[f"{key}_pairs"] = len(values)
  return out

