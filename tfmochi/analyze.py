"""What the negatives of a trained MoCo / MoCHi model look like (the papers' analyses).

`python -m tfmochi.analyze --model_dir=RUN --output_dir=OUT` restores a run's checkpoint, embeds
a labelled data set and writes OUT/report.json, PNG plots and OUT/index.html showing them (OUT
may be gs://). report.json is written last: an analysis is complete once it exists (a rerun into
the same OUT deletes it before writing anything, see tfmochi.rundir rule 2).

Set-up (as in training): N images give the queue, keys = L2-normalised projections of one
augmented view by the momentum (key) encoder (the query encoder if the checkpoint has none); M
queries = the query encoder's projections of the *other* view. Queries are other images than the
queue's when the data set has K + M images; otherwise they are queue images and each query's own
key is removed from its negatives (the duplicate mask of `--mask_duplicates`). Both encoders run
in inference mode. Then, per query, with l_neg = q·n over its negatives (docs/ALGORITHMS.md §5, §7):

* distribution of q·n: per-query percentiles (50, 90, 99, 99.9, max) averaged over queries;
  histograms of all negatives vs each query's hardest 1% vs the positives q·k;
* false negatives: the share of same-class negatives among each query's hardest 0.1%, 1%, 5%
  (⌈p·K/100⌉ entries, at least 1) and overall (= the class prior, i.e. chance);
* gradient share per hardness band (Cai et al.): ∂InfoNCE/∂l_neg_j = p_j / T with p the softmax
  over [l_pos | l_neg] / T, so band b carries Σ_{j∈b} p_j / Σ_j p_j of the negatives' gradient.
  Bands are per-query rank ranges [0, 0.1%), [0.1, 1%), [1, 5%), [5, 20%), [20, 100%];
* MoCHi: the run's MoCHi(N, s, s') (or MoCHi(min(1024, K/8), 1024, 512) when the run had it off)
  via `mixing.synthesize(..., return_features=True)`: q·h and q·h' against q·n of the queue and of
  its top N, the share of synthetic points harder than the hardest real negative, and how often
  they are mixed from same-class (false) negatives;
* alignment (α = 2) of the positive pairs, uniformity (t = 2) of queries and keys (Wang & Isola),
  proxy-task top-1/top-5 of the positive among [positive | queue] and the InfoNCE loss;
* ImageNet labels (imagenet2012, imagenet100): the WordNet Wu-Palmer similarity between a query's
  class and the classes of its hardest (different-class) negatives vs random negatives, when nltk
  and its wordnet corpus are installed; otherwise the report says how to install them.

Conventions: shares are fractions in [0, 1]; accuracies are in % (as MoCo logs them).

`negatives_report(q, k, queue, q_labels, queue_labels, temperature, ...)` computes all of this on
plain arrays (no checkpoint, no data set); `analyze_run` is the whole command as a function.
Errors (no checkpoint, unlabelled data, unwritable output) end the command line with one message
and exit status 2.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmochi import augment  # noqa: E402
from tfmochi import checkpoints as ckpt_lib  # noqa: E402
from tfmochi import data as data_lib  # noqa: E402
from tfmochi import losses as losses_lib  # noqa: E402
from tfmochi import mixing  # noqa: E402
from tfmochi import rundir  # noqa: E402

# Hardness bands in % of each query's negatives, hardest first (Cai et al.'s cut points).
DEFAULT_BANDS = ((0.0, 0.1), (0.1, 1.0), (1.0, 5.0), (5.0, 20.0), (20.0, 100.0))
FALSE_NEGATIVE_PERCENTS = (0.1, 1.0, 5.0)
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
HARDEST_PERCENT = 1.0
# Fine fixed bins (width 0.001) so chunks can be summed; the plots zoom in on the occupied range.
HIST_EDGES = np.linspace(-1.0, 1.0, 2001)
PLOT_BINS = 80
UNIFORMITY_MAX_POINTS = 4096
WORDNET_PAIRS_PER_QUERY = 20
IMAGENET_DATASETS = ("imagenet2012", "imagenet100")
WORDNET_MISSING = ("WordNet data not available: pip install nltk && python -m nltk.downloader "
                   "wordnet")
REPORT_FILE = "report.json"
HTML_FILE = "index.html"

ClassSimilarity = Callable[[int, int], float]
Progress = Callable[[str], None]


class AnalyzeError(ValueError):
  """The analysis cannot run as asked (unlabelled data, bad setting, unwritable output)."""


class WordNetUnavailable(RuntimeError):
  """nltk or its wordnet corpus is missing; the message says how to install them."""


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
  mask_ids = q_ids is not None and queue_ids is not None
  if mask_ids:
    q_ids = np.asarray(q_ids, np.int64).reshape([-1])
    queue_ids = np.asarray(queue_ids, np.int64).reshape([-1])
  if mochi is not None and mochi.enabled:
    mochi = dataclasses.replace(mochi, num_hard=min(mochi.num_hard, size))
    mochi.validate(size)
  else:
    mochi = None
  rng = np.random.default_rng(seed)
  queue64 = queue.astype(np.float64)
  queue_tf = tf.constant(queue)
  hist = _Histograms()
  rows = _Rows()
  sem_pairs = {"hardest": [], "random": []}
  masked_total = 0
  mochi_diff = 0.0

  for c, start in enumerate(range(0, m_queries, chunk)):
    sl = slice(start, min(start + chunk, m_queries))
    qc, labels = q[sl], q_labels[sl]
    l_neg = qc.astype(np.float64) @ queue64.T  # [c, K]
    if mask_ids:
      dup = q_ids[sl][:, None] == queue_ids[None, :]
      masked_total += int(dup.sum())
      l_neg = np.where(dup, -np.inf, l_neg)
    l_pos = np.sum(qc.astype(np.float64) * k[sl].astype(np.float64), axis=1)  # [c]
    order, desc, counts = sort_hardest_first(l_neg)
    if (counts == 0).any():
      raise AnalyzeError("A query has no negative left after the duplicate mask (queue of "
                         f"{size}); use a larger queue.")
    rows.add("counts", counts)
    rows.add("l_pos", l_pos)
    hist.add("positives", l_pos)
    valid = np.arange(size)[None, :] < counts[:, None]
    hist.add("negatives_all", desc[valid])
    m_hard = num_in_top(hardest_percent, counts)
    hist.add(f"negatives_hardest_{pct_key(hardest_percent)}",
             desc[np.arange(size)[None, :] < m_hard[:, None]])
    rows.add("percentiles", row_percentiles(desc, counts, percentiles))
    rows.add("max", desc[:, 0])
    rows.add("mean", np.where(valid, desc, 0.0).sum(1) / counts)
    rows.add("hardest_mean",
             np.where(np.arange(size)[None, :] < m_hard[:, None], desc, 0.0).sum(1) / m_hard)

    # False negatives: same (known) class, by rank.
    sorted_labels = queue_labels[order]  # [c, K]
    same = (sorted_labels == labels[:, None]) & (labels[:, None] >= 0) & (sorted_labels >= 0)
    same &= valid
    cum_same = np.concatenate([np.zeros([len(same), 1]), np.cumsum(same, axis=1)], axis=1)
    ridx = np.arange(len(same))
    for p in fn_percents:
      m = num_in_top(p, counts)
      rows.add(f"fn_{pct_key(p)}", cum_same[ridx, m] / m)
    rows.add("fn_overall", cum_same[ridx, counts] / counts)
    band_fn = []
    for low, high in bands:
      a, b = num_in_top(low, counts), num_in_top(high, counts)
      with np.errstate(invalid="ignore", divide="ignore"):
        band_fn.append(np.where(b > a, (cum_same[ridx, np.maximum(b, a)] - cum_same[ridx, a])
                                / np.maximum(b - a, 1), np.nan))
    rows.add("band_fn", np.stack(band_fn, axis=1))

    # Gradient shares by hardness band, and the negatives' total softmax mass 1 - p_pos.
    rows.add("band_share", band_gradient_shares(desc, counts, temperature, bands))
    rows.add("cum_share_5", band_gradient_shares(desc, counts, temperature, [(0.0, 5.0)])[:, 0])
    l_neg_tf = tf.constant(l_neg, tf.float32)
    l_pos_tf = tf.constant(l_pos, tf.float32)
    loss = losses_lib.info_nce(l_pos_tf, l_neg_tf, temperature).numpy()
    rows.add("loss", loss)
    rows.add("neg_mass", 1.0 - np.exp(-loss))  # p_pos = exp(-loss) for InfoNCE
    acc = losses_lib.proxy_accuracy(l_pos_tf, l_neg_tf, (1, 5))
    rows.add("acc1", acc[1].numpy())
    rows.add("acc5", acc[5].numpy())

    # Semantic similarity of the hardest (different-class) negatives vs random ones.
    if class_similarity is not None:
      for i in range(len(labels)):
        if labels[i] < 0:
          continue
        hard = [int(x) for x in sorted_labels[i, :m_hard[i]] if x >= 0 and x != labels[i]]
        hard = hard[:WORDNET_PAIRS_PER_QUERY]
        pool = sorted_labels[i, :counts[i]]
        pool = pool[(pool >= 0) & (pool != labels[i])]
        rand = rng.choice(pool, size=min(len(pool), WORDNET_PAIRS_PER_QUERY), replace=False) \
            if len(pool) else []
        sem_pairs["hardest"] += [(int(labels[i]), x) for x in hard]
        sem_pairs["random"] += [(int(labels[i]), int(x)) for x in rand]

    # MoCHi's synthetic negatives from this chunk's hardest negatives.
    if mochi is not None:
      syn = mixing.synthesize(tf.constant(qc), queue_tf, l_neg_tf,
                              mixing.step_seed(seed, c), mochi, return_features=True,
                              jit_compile=False)
      logits = syn.logits.numpy().astype(np.float64)  # [c, s + s']
      feats = syn.features.numpy().astype(np.float64)
      from_features = np.einsum("bd,bsd->bs", qc.astype(np.float64), feats)
      finite = np.isfinite(logits)
      if finite.any():
        mochi_diff = max(mochi_diff, float(np.abs(from_features - logits)[finite].max()))
      s1 = mochi.num_mix
      hardest_real = desc[:, :1]
      n_top = np.minimum(counts, mochi.num_hard)
      rows.add("mochi_top_desc", desc[:, :mochi.num_hard])
      rows.add("mochi_top_counts", n_top)
      hist.add("mochi_queue_top_n", desc[np.arange(size)[None, :] < n_top[:, None]])
      hard_labels = queue_labels[syn.hard_indices.numpy()]
      rows.add("mochi_fn_top_n", ((hard_labels == labels[:, None]) & (labels[:, None] >= 0))
               .mean(axis=1))
      for name, part, idx in (("type1", logits[:, :s1], syn.mix_indices.numpy()),
                              ("type2", logits[:, s1:], syn.query_mix_indices.numpy())):
        if part.shape[1] == 0:
          continue
        p_desc = -np.sort(-part, axis=1)
        rows.add(f"mochi_{name}_desc", p_desc)
        rows.add(f"mochi_{name}_counts", np.isfinite(part).sum(axis=1))
        hist.add(f"mochi_{name}", part)
        rows.add(f"mochi_{name}_harder", (part > hardest_real).mean(axis=1))
        src_same = (queue_labels[idx] == labels.reshape([-1] + [1] * (idx.ndim - 1))) & (
            labels.reshape([-1] + [1] * (idx.ndim - 1)) >= 0)
        if name == "type1":  # [c, s, 2]: mixed from one or two same-class negatives
          rows.add("mochi_fn_type1_any", src_same.any(axis=2).mean(axis=1))
          rows.add("mochi_fn_type1_both", src_same.all(axis=2).mean(axis=1))
        else:
          rows.add("mochi_fn_type2", src_same.mean(axis=1))

  counts = rows.get("counts")
  per = rows.get("percentiles")
  report = {
      "num_queries": int(m_queries), "queue_size": int(size), "embedding_dim": int(dim),
      "temperature": float(temperature), "duplicates_masked": int(masked_total),
      "negatives_per_query": {"min": int(counts.min()), "max": int(counts.max())},
      "negatives": {"mean": float(rows.get("mean").mean()),
                    **{percentile_key(p): float(per[:, i].mean())
                       for i, p in enumerate(percentiles)},
                    "max": float(rows.get("max").mean()),
                    f"hardest_{pct_key(hardest_percent)}_mean": float(
                        rows.get("hardest_mean").mean())},
      "positives": {"mean": float(rows.get("l_pos").mean()),
                    **{percentile_key(p): float(np.percentile(rows.get("l_pos"), p))
                       for p in percentiles},
                    "max": float(rows.get("l_pos").max())},
      "false_negatives": {**{f"hardest_{pct_key(p)}": float(rows.get(f"fn_{pct_key(p)}").mean())
                             for p in fn_percents},
                          "overall": float(rows.get("fn_overall").mean())},
      "gradient_share": {
          "bands": [band_label(lo, hi) for lo, hi in bands],
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
  # The class prior the hardest shares are compared with (chance level).
  report["false_negatives"]["chance"] = report["false_negatives"]["overall"]
  if mochi is not None:
    report["mochi"] = _mochi_section(rows, mochi, mochi_diff)
  if class_similarity is not None:
    report["semantic_similarity"] = _semantic_section(sem_pairs, class_similarity,
                                                      hardest_percent)
  report["histograms"] = hist.to_json()
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


# -------------------------------------------------------------------------------------------------
# WordNet


def wordnet_class_similarity(wnids: Sequence[str]) -> ClassSimilarity:
  """Wu-Palmer similarity between classes given by WordNet ids ("n01440764"), via nltk.

  Raises:
    WordNetUnavailable: nltk or its wordnet corpus is not installed (with the install command).
  """
  try:
    from nltk.corpus import wordnet as wn  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WordNetUnavailable(f"{WORDNET_MISSING} (nltk is not installed).") from None
  try:
    synsets = [wn.synset_from_pos_and_offset(w[0], int(w[1:])) for w in wnids]
  except LookupError:
    raise WordNetUnavailable(f"{WORDNET_MISSING} (nltk's wordnet corpus is missing).") from None
  except (ValueError, IndexError) as e:
    raise WordNetUnavailable(f"Some class ids are not WordNet ids ({e}).") from None

  def similarity(a: int, b: int) -> float:
    return synsets[a].wup_similarity(synsets[b])

  similarity.measure = "wup"
  return similarity


def class_wnids(dataset: str, data_dir: str | None = None) -> list[str] | None:
  """The WordNet id of each class index of an ImageNet data set (None for other data sets)."""
  if dataset == "imagenet100":
    return sorted(data_lib.imagenet100_wnids())  # data.load relabels in sorted-wnid order
  if dataset == "imagenet2012":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return list(tfds.builder("imagenet2012", data_dir=data_dir).info.features["label"].names)
  return None


def semantic_similarity_fn(dataset: str, data_dir: str | None = None
                           ) -> tuple[ClassSimilarity | None, str | None]:
  """(similarity function, None), or (None, the reason it is not available)."""
  if dataset not in IMAGENET_DATASETS:
    return None, (f"WordNet similarity applies to ImageNet labels ({', '.join(IMAGENET_DATASETS)})"
                  f"; the data set is {dataset}.")
  try:
    return wordnet_class_similarity(class_wnids(dataset, data_dir)), None
  except WordNetUnavailable as e:
    return None, str(e)
  except Exception as e:  # pylint: disable=broad-except  (optional part: never fail the report)
    return None, f"WordNet similarity skipped: cannot read the {dataset} class ids ({e})."


# -------------------------------------------------------------------------------------------------
# Plots and HTML


def _save_figure(fig, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  rundir.write_bytes(path, buffer.getvalue())


def _hist_axes(ax, hists: dict, names: Sequence[tuple[str, str]], title: str) -> None:
  """Density step plots of pooled histograms, zoomed on the occupied range (~PLOT_BINS bins)."""
  edges = np.asarray(hists["edges"])
  series = [(np.asarray(hists.get(key, []), np.float64), label) for key, label in names]
  series = [(c, label) for c, label in series if c.size and c.sum() > 0]
  if series:
    occupied = np.flatnonzero(np.sum([c for c, _ in series], axis=0))
    lo, hi = int(occupied[0]), int(occupied[-1]) + 1
    group = max(1, math.ceil((hi - lo) / PLOT_BINS))
    pad = 2 * group
    lo, hi = max(0, lo - pad), min(len(edges) - 1, hi + pad)
    hi = lo + ((hi - lo) // group) * group
    coarse = edges[lo:hi + 1:group]
    for counts, label in series:
      summed = counts[lo:hi].reshape([-1, group]).sum(axis=1)
      ax.stairs(summed / (counts.sum() * np.diff(coarse)), coarse, label=label)
    ax.legend()
  ax.set_xlabel("cosine similarity to the query")
  ax.set_ylabel("density")
  ax.set_title(title)


def write_plots(report: dict, output_dir: str) -> list[str]:
  """Writes the PNG plots of a report into output_dir; returns their file names."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (Agg, no pyplot)

  hists = report["histograms"]
  hard = f"negatives_hardest_{pct_key(HARDEST_PERCENT)}"
  written = []

  fig = Figure(figsize=(7, 4))
  _hist_axes(fig.subplots(), hists, [("negatives_all", "all negatives q·n"),
                                     (hard, f"hardest {HARDEST_PERCENT:g}% per query"),
                                     ("positives", "positives q·k")],
             "Similarity of negatives and positives")
  _save_figure(fig, os.path.join(output_dir, "similarities.png"))
  written.append("similarities.png")

  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  fn = report["false_negatives"]
  names = [k for k in fn if k.startswith("hardest_")] + ["overall"]
  values = [100.0 * fn[k] for k in names]
  ax.bar([n.replace("hardest_", "hardest ").replace("pct", "%") for n in names], values,
         color=["C3"] * (len(names) - 1) + ["C7"])
  ax.axhline(100.0 * fn["chance"], color="k", linestyle="--", label="chance (class prior)")
  ax.set_ylabel("same-class negatives (%)")
  ax.set_title("False negatives among the hardest negatives")
  ax.legend()
  _save_figure(fig, os.path.join(output_dir, "false_negatives.png"))
  written.append("false_negatives.png")

  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  grad = report["gradient_share"]
  bars = ax.bar(grad["bands"], [100.0 * s for s in grad["share"]], color="C0")
  ax.bar_label(bars, fmt="%.1f%%")
  ax.set_xlabel("hardness band (per-query rank of q·n)")
  ax.set_ylabel("share of the negatives' InfoNCE gradient (%)")
  ax.set_title("Which negatives carry the gradient (Cai et al.)")
  _save_figure(fig, os.path.join(output_dir, "gradient_share.png"))
  written.append("gradient_share.png")

  if report.get("mochi"):
    fig = Figure(figsize=(7, 4))
    mo = report["mochi"]
    _hist_axes(fig.subplots(), hists,
               [("negatives_all", "queue q·n"), ("mochi_queue_top_n",
                                                 f"queue top-{mo['num_hard']} q·n"),
                ("mochi_type1", f"MoCHi h (s={mo['num_mix']})"),
                ("mochi_type2", f"MoCHi h' (s'={mo['num_query_mix']})")],
               "MoCHi synthetic negatives vs real ones")
    _save_figure(fig, os.path.join(output_dir, "mochi.png"))
    written.append("mochi.png")

  sem = report.get("semantic_similarity")
  if sem and sem.get("available"):
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    key = f"hardest_{pct_key(HARDEST_PERCENT)}"
    values = [sem.get(key) or 0.0, sem.get("random") or 0.0]
    ax.bar([f"hardest {HARDEST_PERCENT:g}%", "random"], values, color=["C3", "C7"])
    ax.set_ylabel(f"class similarity ({sem.get('measure')})")
    ax.set_title("Semantic similarity to the query's class")
    _save_figure(fig, os.path.join(output_dir, "semantic_similarity.png"))
    written.append("semantic_similarity.png")
  return written


def _fmt(value, percent: bool = False) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{100.0 * value:.2f}%" if percent else f"{value:.4f}"
  return html.escape(str(value))


def _table(rows: Sequence[tuple[str, str]]) -> str:
  body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
  return f"<table>{body}</table>"


def write_html(report: dict, output_dir: str, plots: Sequence[str]) -> str:
  """Writes index.html (the numbers and the plots) and returns its path."""
  run = report.get("run", {})
  parts = [
      "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tfmochi negatives analysis"
      "</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
      "table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;"
      "text-align:left}img{max-width:100%}.note{color:#a33}</style></head><body>",
      "<h1>Negatives analysis</h1>",
      _table([(k, _fmt(v)) for k, v in run.items()] + [
          ("queue size K", _fmt(report["queue_size"])),
          ("queries M", _fmt(report["num_queries"])),
          ("temperature T", _fmt(report["temperature"])),
          ("duplicates masked", _fmt(report["duplicates_masked"]))]),
      "<h2>Similarity of negatives</h2>",
      _table([(k, _fmt(v)) for k, v in report["negatives"].items()]
             + [(f"positives {k}", _fmt(v)) for k, v in report["positives"].items()]),
  ]

  def image(name):
    if name in plots:
      parts.append(f"<p><img src='{html.escape(name)}' alt='{html.escape(name)}'></p>")

  image("similarities.png")
  parts.append("<h2>False negatives (same class)</h2>")
  parts.append(_table([(k, _fmt(v, percent=True)) for k, v in report["false_negatives"].items()]))
  image("false_negatives.png")
  grad = report["gradient_share"]
  parts.append("<h2>Gradient share by hardness band</h2>")
  parts.append(_table([(band, f"{_fmt(s, True)} (false negatives {_fmt(fn, True)})")
                       for band, s, fn in zip(grad["bands"], grad["share"],
                                              grad["false_negative_share"])]
                      + [("hardest 5% (cumulative)", _fmt(grad["hardest_5pct"], True)),
                         ("negatives' softmax mass 1 − p_pos",
                          _fmt(report["negative_probability_mass"], True))]))
  image("gradient_share.png")
  parts.append("<h2>Alignment, uniformity, proxy task</h2>")
  parts.append(_table([(k, _fmt(report[k])) for k in (
      "alignment", "uniformity", "uniformity_queue", "infonce_loss")]
                      + [(f"{k} (%)", f"{report[k]:.2f}") for k in ("proxy_top1", "proxy_top5")]))
  mo = report.get("mochi")
  parts.append("<h2>MoCHi synthetic negatives</h2>")
  if mo:
    parts.append(f"<p>MoCHi(N={mo['num_hard']}, s={mo['num_mix']}, s'={mo['num_query_mix']})"
                 f" {html.escape(str(mo.get('source', '')))}</p>")
    sim_rows = [(name, ", ".join(f"{k} {_fmt(v)}" for k, v in (vals or {}).items()))
                for name, vals in mo["similarity"].items()]
    parts.append(_table(sim_rows
                        + [(f"harder than the hardest real ({k})", _fmt(v, True))
                           for k, v in mo["harder_than_hardest_real"].items()]
                        + [(f"false-negative sources ({k})", _fmt(v, True))
                           for k, v in mo["false_negatives"].items()]))
    image("mochi.png")
  else:
    parts.append("<p>Not computed.</p>")
  parts.append("<h2>Semantic similarity (WordNet)</h2>")
  sem = report.get("semantic_similarity")
  if sem and sem.get("available"):
    parts.append(_table([(k, _fmt(v)) for k, v in sem.items()]))
    image("semantic_similarity.png")
  else:
    message = (sem or {}).get("message", "Not computed.")
    parts.append(f"<p class='note'>{html.escape(message)}</p>")
  parts.append("<p>Raw numbers: <a href='report.json'>report.json</a></p></body></html>")
  path = os.path.join(output_dir, HTML_FILE)
  rundir.write_text(path, "\n".join(parts) + "\n")
  return path


# -------------------------------------------------------------------------------------------------
# A run


def check_output_dir(output_dir: str) -> None:
  """Creates output_dir and proves it is writable; raises AnalyzeError otherwise."""
  try:
    rundir.check_writable(output_dir, "--output_dir")
  except rundir.RunDirError as e:
    raise AnalyzeError(str(e)) from None


def _restore_key_encoder(config, checkpoint_path: str):
  """The run's momentum encoder from a checkpoint, or None when it has none."""
  encoder = ckpt_lib.build_run_encoder(config, "key_encoder")
  try:
    tf.train.Checkpoint(key_encoder=encoder).read(checkpoint_path).expect_partial() \
        .assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError):
    return None
  return encoder


def mochi_for_analysis(config, queue_size: int) -> tuple[mixing.MochiConfig, str]:
  """The run's MoCHi(N, s, s'), or MoCHi(min(1024, K/8), 1024, 512) when it had MoCHi off.

  N is capped at K (the analysis queue may be smaller than the run's). Returns (config, a note
  saying which it is).
  """
  mochi = mixing.MochiConfig(config.mochi_num_hard, config.mochi_num_mix,
                             config.mochi_num_query_mix, config.mochi_beta_max)
  note = "(the run's)"
  if not mochi.enabled:
    mochi = mixing.MochiConfig(max(1, min(1024, queue_size // 8)), 1024, 512)
    note = "(defaults: the run had MoCHi off)"
  return dataclasses.replace(mochi, num_hard=min(mochi.num_hard, queue_size)), note


def _embed(query_encoder, key_encoder, source: data_lib.DataSource, *, total: int,
           query_range: tuple[int, int], image_size: int, recipe: str,
           crop_scale: tuple[float, float], seed: int, batch_size: int) -> dict[str, np.ndarray]:
  """Keys of `total` seeded-random images, queries for the images in query_range.

  Returns:
    {"k": [total, D], "q": [M, D] (L2-normalised), "label": [total], "id": [total]}.
  """
  records = source.records()
  buffer = source.num_examples if records is not None else min(source.num_examples, 10_000)
  key = tf.constant([seed, 7], tf.int64)

  def views(ex):
    example = source.decode(ex)
    view_q, view_k = augment.two_views(
        example["image"], image_size,
        tf.random.experimental.stateless_fold_in(key, example["id"]), recipe, crop_scale)
    return {"view_q": view_q, "view_k": view_k, "label": example["label"], "id": example["id"]}

  ds = source.raw().shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=False)
  ds = ds.take(total).map(views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]
  embed_q = tf.function(lambda x: tf.math.l2_normalize(query_encoder(x, training=False), -1),
                        input_signature=spec)
  embed_k = tf.function(lambda x: tf.math.l2_normalize(key_encoder(x, training=False), -1),
                        input_signature=spec)
  out = {"k": [], "q": [], "label": [], "id": []}
  q_start, q_end = query_range
  position = 0
  for batch in ds:
    n = int(batch["id"].shape[0])
    out["k"].append(embed_k(batch["view_k"]).numpy())
    lo, hi = max(position, q_start), min(position + n, q_end)
    if lo < hi:
      out["q"].append(embed_q(batch["view_q"][lo - position:hi - position]).numpy())
    out["label"].append(batch["label"].numpy())
    out["id"].append(batch["id"].numpy())
    position += n
  if position < total:
    raise AnalyzeError(f"{source.name}/{source.split} yielded only {position} of the {total} "
                       "images the analysis needs.")
  return {name: np.concatenate(parts) for name, parts in out.items()}


def analyze_run(model_dir: str, output_dir: str, *, checkpoint_path: str | None = None,
                num_queries: int = 512, queue_size: int | None = None, seed: int | None = None,
                split: str = "train", batch_size: int = 128, dataset: str | None = None,
                data_dir: str | None = None, source: data_lib.DataSource | None = None,
                class_similarity: ClassSimilarity | None = None,
                progress: Progress | None = None) -> dict:
  """The whole analysis of a run's checkpoint: report.json, the PNGs and index.html.

  Args:
    model_dir: the training run.
    output_dir: where to write (created; may be gs://).
    checkpoint_path: a checkpoint prefix (default: the newest readable one).
    num_queries: M (capped by the data set).
    queue_size: K (default: the run's --queue_size); capped by the data set.
    seed: image selection, views and MoCHi draws (default: the run's seed).
    split: data split to embed.
    batch_size: images per forward pass.
    dataset, data_dir: another data set / location than the run's.
    source: a DataSource to use instead of loading one.
    class_similarity: (class_a, class_b) -> similarity, for the semantic analysis (default:
      WordNet Wu-Palmer for ImageNet data sets when available).
    progress: progress lines (default: absl logging).

  Returns:
    The report (also in output_dir/report.json).

  Raises:
    AnalyzeError, checkpoints.CheckpointError, data.DataError.
  """
  from tfmochi import evaluate  # pylint: disable=g-import-not-at-top  (shares the restore)

  say = progress or (lambda message: logging.info("%s", message))
  if num_queries < 1 or (queue_size is not None and queue_size < 2) or batch_size < 1:
    raise AnalyzeError(f"--num_queries must be >= 1, --queue_size >= 2 and --batch_size >= 1; got "
                       f"{num_queries}, {queue_size}, {batch_size}.")
  check_output_dir(output_dir)
  start = time.time()
  # Cheap checks first (config, a checkpoint exists, labelled data), then the model.
  config = ckpt_lib.load_run_config(model_dir)
  if checkpoint_path is None and not ckpt_lib.list_checkpoints(model_dir):
    ckpt_lib.restore_encoder(model_dir)  # raises its clear "no checkpoint yet" message
  dataset = dataset or config.dataset
  data_dir = config.data_dir if data_dir is None else data_dir
  if source is None:
    source = data_lib.load(dataset, split, data_dir=data_dir, seed=config.seed,
                           tfrecord_label_offset=config.tfrecord_label_offset)
  if not source.has_labels:
    raise AnalyzeError(f"{source.name}/{source.split} has no labels; the analysis needs them "
                       "(false negatives are same-class negatives). Use a labelled data set.")
  query_encoder, config, step, path = evaluate.restore_checkpoint(model_dir, checkpoint_path)
  key_encoder = _restore_key_encoder(config, path)
  key_source = "momentum (key) encoder"
  if key_encoder is None:
    key_encoder, key_source = query_encoder, "query encoder (the checkpoint has no key encoder)"
  seed = config.seed if seed is None else seed
  n = source.num_examples
  size = min(queue_size or config.queue_size, n)
  if size < 2:
    raise AnalyzeError(f"{source.name}/{source.split} has {n} images; the analysis needs >= 2.")
  m = min(num_queries, n)
  disjoint = size + m <= n
  total = size + m if disjoint else max(size, m)
  q_range = (size, size + m) if disjoint else (0, m)
  say(f"Embedding {total} images of {source.name}/{source.split} (queue K={size}, queries "
      f"M={m}, {'disjoint images' if disjoint else 'same images, own key masked'}) with the "
      f"checkpoint of step {step}...")
  emb = _embed(query_encoder, key_encoder, source, total=total, query_range=q_range,
               image_size=config.image_size, recipe=config.augmentation,
               crop_scale=(getattr(config, "crop_min_scale", 0.2), 1.0), seed=seed,
               batch_size=batch_size)
  queue, queue_labels, queue_ids = emb["k"][:size], emb["label"][:size], emb["id"][:size]
  qs = slice(*q_range)
  run_mochi, mochi_source = mochi_for_analysis(config, size)

  sem_message = None
  if class_similarity is None:
    class_similarity, sem_message = semantic_similarity_fn(source.name, data_dir)
  say("Measuring the negatives...")
  report = negatives_report(emb["q"], emb["k"][qs], queue, emb["label"][qs], queue_labels,
                            config.temperature, q_ids=emb["id"][qs], queue_ids=queue_ids,
                            mochi=run_mochi, seed=seed, class_similarity=class_similarity)
  report["mochi"]["source"] = mochi_source
  if report["semantic_similarity"] is None:
    report["semantic_similarity"] = {"available": False, "message": sem_message}
  report["run"] = {"model_dir": model_dir, "checkpoint": path, "checkpoint_step": int(step),
                   "dataset": source.name, "split": source.split, "arch": config.arch,
                   "image_size": int(config.image_size), "augmentation": config.augmentation,
                   "keys": key_source, "queries_disjoint_from_queue": bool(disjoint),
                   "seed": int(seed)}
  report["checkpoint_step"] = int(step)
  report["seconds"] = float(time.time() - start)
  rundir.begin_directory(output_dir, REPORT_FILE)  # an earlier analysis there: now incomplete
  plots = write_plots(report, output_dir)
  report["plots"] = plots
  report["html"] = HTML_FILE
  write_html(report, output_dir, plots)
  rundir.write_json(os.path.join(output_dir, REPORT_FILE), report)  # the marker, last
  return report


# -------------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("model_dir", None, "The training run (holds config.json, checkpoints/).")
  flags.DEFINE_string("output_dir", None, "Where report.json, the PNGs and index.html go "
                      "(default: <model_dir>/analysis).")
  flags.DEFINE_string("checkpoint", None, "A checkpoint prefix (default: the newest readable).")
  flags.DEFINE_integer("num_queries", 512, "M, the queries (capped by the data set).")
  flags.DEFINE_integer("queue_size", None, "K, the queue (default: the run's --queue_size, "
                       "capped by the data set).")
  flags.DEFINE_integer("seed", None, "Seed of the image selection, views and MoCHi draws "
                       "(default: the run's).")
  flags.DEFINE_string("split", "train", "Data split to embed.")
  flags.DEFINE_integer("batch_size", 128, "Images per forward pass.")
  flags.DEFINE_string("dataset", None, "Analyse on this data set (default: the run's).")
  flags.DEFINE_string("data_dir", None, "Data directory (default: the run's).")


def _error(message: str) -> int:
  logging.flush()
  print(f"tfmochi.analyze: error: {message}", file=sys.stderr, flush=True)
  return 2


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  if len(argv) > 1:
    return _error(f"unexpected arguments {' '.join(argv[1:])} (flags start with --).")
  if not flag_values.model_dir:
    return _error("--model_dir is required (the training run to analyse).")
  logging.set_verbosity(logging.WARNING)  # progress goes to stdout; keep INFO chatter out
  tf.get_logger().setLevel("ERROR")
  output_dir = flag_values.output_dir or os.path.join(flag_values.model_dir, "analysis")
  try:
    report = analyze_run(flag_values.model_dir, output_dir, checkpoint_path=flag_values.checkpoint,
                         num_queries=flag_values.num_queries, queue_size=flag_values.queue_size,
                         seed=flag_values.seed, split=flag_values.split,
                         batch_size=flag_values.batch_size, dataset=flag_values.dataset,
                         data_dir=flag_values.data_dir, progress=print)
  except (AnalyzeError, ckpt_lib.CheckpointError, data_lib.DataError) as e:
    return _error(str(e))
  fn = report["false_negatives"]
  print(f"Hardest 1% of negatives: {100 * fn['hardest_1pct']:.2f}% same class (chance "
        f"{100 * fn['chance']:.2f}%); hardest 5% carry "
        f"{100 * report['gradient_share']['hardest_5pct']:.1f}% of the gradient; proxy top-1 "
        f"{report['proxy_top1']:.2f}% ({report['seconds']:.1f} s).")
  print(f"Report: {os.path.join(output_dir, HTML_FILE)}", flush=True)
  return 0


def _parse_flags(argv):
  """absl flag parsing whose errors also exit with status 2, without a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"tfmochi.analyze: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def run():
  """Entry point of `python -m tfmochi.analyze`."""
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
