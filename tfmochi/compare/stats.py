"""The statistics of a comparison sweep: each variant against the baseline seed by seed, what the
design can resolve, the multiple-comparison adjustment and the words the report may use.

Seed k of every variant starts from the same initial weights and reads the data in the same
order, so the unit of comparison is the seed: d_k = variant_k - baseline_k, and the interval is
Student's t over the seeds' differences (mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)), not two
independent means. The comparisons of one family of metrics (the report's: the accuracies; the
embedding's geometry) are tested together: Holm's step-down adjustment keeps the family-wise
error at 5%, and a difference counts as resolved only when its Holm-adjusted p is below 5%.

Words (`verdict`): "not seen (the design resolves about X points)" where the difference is not
resolved, X being the half-width of its 95% interval; "reproduces" where it is resolved in the
direction the variant's paper states (the interval, Holm-adjusted, excludes zero on that side);
"contradicted" where it is resolved against it (the interval excludes every effect in the
paper's direction); "higher"/"lower" where the paper states no direction. Seeds whose
differences are all equal (accuracies move in steps of one test image) give no spread and no
interval: "not seen", never a zero-width interval. Needs NumPy and SciPy (a dependency of
scikit-learn), not TensorFlow.
"""

from __future__ import annotations

import math
import re

import numpy as np

LEVEL = 0.95
FAMILY_ALPHA = 0.05
# The direction each variant's paper claims against MoCo v2: "+" = better, "-" = worse, ">=" =
# not worse; absent = no claim (our own probes, e.g. keep_hardest_1). Cai et al. ("Are all
# negatives created equal in contrastive instance discrimination?") find on ImageNet (K = 65,536,
# 1,000 classes) that the hardest 5% of the negatives are necessary (removing them hurts) and
# sufficient (keeping only them does not hurt), and that the very hardest 0.1%, mostly the
# query's own class, are unnecessary (removing them does not hurt). Their 0.1% is about the
# same-class share of a 1,000-class queue, which is about 10% of a 10-class one:
# drop_hardest_10 tests that claim here (configs/compare_digits.variants explains the mapping).
_CLAIMS = (
    (re.compile(r"mochi(_.*)?"), "+", "Kalantidis et al.: MoCHi improves on MoCo v2"),
    (re.compile(r"debiased"), "+", "Chuang et al.: debiasing improves on InfoNCE"),
    (re.compile(r"hard"), "+", "Robinson et al.: hard-negative reweighting improves on InfoNCE"),
    (re.compile(r"drop_hardest_5"), "-",
     "Cai et al.: the hardest 5% are necessary (removing them hurts)"),
    (re.compile(r"keep_hardest_5"), ">=",
     "Cai et al.: the hardest 5% suffice (the easiest 95% are unnecessary)"),
    (re.compile(r"drop_hardest_(10|0\.1)"), ">=",
     "Cai et al.: the hardest 0.1% (mostly same-class; 10% of a 10-class queue) are "
     "unnecessary (removing them does not hurt)"),
    (re.compile(r"oracle"), "+", "removing same-class negatives helps (labels)"),
    (re.compile(r"supcon"), "+", "Khosla et al.: supervised contrastive learning helps (labels)"),
    # Against another variant than MoCo v2 (report.EXTRA_PAIRS): the same labels used as
    # positives (SupCon) rather than only removed (the class oracle).
    (re.compile(r"supcon-oracle"), "+",
     "Khosla et al.: same-class samples as positives help more than removing them"),
)


def paper_claim(variant: str) -> tuple[str | None, str]:
  """(direction "+" | "-" | ">=" | None, the claim in words) of a variant against MoCo v2."""
  for pattern, direction, words in _CLAIMS:
    if pattern.fullmatch(variant):
      return direction, words
  return None, "no paper claim"


def t_quantile(df: int, level: float = LEVEL, two_sided: bool = True) -> float:
  """The quantile of Student's t(df) that a two-sided `level` interval uses (t_{0.975} at 95%),
  or, with two_sided=False, the one-sided `level` quantile (t_{0.80} at 0.80)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (lazy: 1-2 s to import)
  return float(stats.t.ppf(0.5 + level / 2.0 if two_sided else level, df))


def _t_p_value(mean: float, se: float, df: int) -> float:
  """Two-sided p of mean / se under Student's t(df); a zero spread gives 1 (no difference) or 0."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if se == 0.0:
    return 1.0 if mean == 0.0 else 0.0
  return float(2.0 * stats.t.sf(abs(mean / se), df))


def paired(variant_by_seed: dict, baseline_by_seed: dict, level: float = LEVEL) -> dict:
  """The paired comparison of two {seed: value} maps over the seeds both have (None skipped).

  Returns:
    {"seeds", "differences" (variant - baseline, per seed), "n", "mean", "sd" (ddof = 1),
    "se", "t", "half_width", "low", "high" (the `level` interval), "p" (two-sided t test)};
    with n < 2 the spread, interval and p are None.
  """
  seeds = sorted(s for s in variant_by_seed if s in baseline_by_seed
                 and _finite(variant_by_seed[s]) and _finite(baseline_by_seed[s]))
  diffs = [float(variant_by_seed[s]) - float(baseline_by_seed[s]) for s in seeds]
  out = {"seeds": seeds, "differences": diffs, "n": len(diffs), "mean": None, "sd": None,
         "se": None, "t": None, "half_width": None, "low": None, "high": None, "p": None}
  if not diffs:
    return out
  arr = np.asarray(diffs, np.float64)
  out["mean"] = float(arr.mean())
  if len(arr) < 2:
    return out
  sd = float(arr.std(ddof=1))
  out["sd"] = sd
  if sd == 0.0:  # identical differences: no spread to build an interval or a test from
    return out
  se = sd / math.sqrt(len(arr))
  t = t_quantile(len(arr) - 1, level)
  out.update(sd=sd, se=se, t=t, half_width=t * se, low=out["mean"] - t * se,
             high=out["mean"] + t * se, p=_t_p_value(out["mean"], se, len(arr) - 1))
  return out


def _finite(value) -> bool:
  return value is not None and math.isfinite(float(value))


def holm(p_values: list) -> list:
  """Holm's step-down adjusted p-values (None stays None; the family is the non-None ones)."""
  indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
  m = len(indexed)
  adjusted = [None] * len(p_values)
  running = 0.0
  for rank, (p, i) in enumerate(indexed):
    running = max(running, min(1.0, (m - rank) * p))  # monotone: never below an earlier one
    adjusted[i] = running
  return adjusted


def bonferroni(p_values: list) -> list:
  """Bonferroni-adjusted p-values: min(1, m·p) over the m non-None p-values."""
  m = sum(p is not None for p in p_values)
  return [None if p is None else min(1.0, m * p) for p in p_values]


def binomial_se(percent: float, n_test: int) -> float:
  """The standard error, in points, of an accuracy of `percent` % measured on n_test images:
  100 · sqrt(p (1 - p) / n)."""
  p = percent / 100.0
  return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n_test)


def resolution(sds: list, n: int, m: int, level: float = LEVEL) -> dict:
  """What n paired seeds resolve, from the observed spreads of the paired differences.

  Args:
    sds: the sd of each comparison's differences (None skipped); pooled as the root mean square.
    n: seeds per comparison.
    m: comparisons in the family.

  Returns:
    {"pooled_sd", "half_width" (the `level` interval: t · sd / sqrt(n)), "family_half_width"
    (Bonferroni over m: simultaneous `level` coverage), "detectable_80" (the difference a
    two-sided 5% test finds with 80% power: (t_0.975 + t_0.80) · sd / sqrt(n))}, or {} when
    there is no spread to pool or n < 2.
  """
  kept = [s for s in sds if s is not None]
  if not kept or n < 2:
    return {}
  pooled = math.sqrt(float(np.mean(np.square(kept))))
  se = pooled / math.sqrt(n)
  family_level = 1.0 - (1.0 - level) / max(m, 1)
  return {"pooled_sd": pooled, "n": n, "m": m, "half_width": t_quantile(n - 1, level) * se,
          "family_half_width": t_quantile(n - 1, family_level) * se,
          "detectable_80": (t_quantile(n - 1, level) + t_quantile(n - 1, 0.8, two_sided=False)) * se}


def verdict(comparison: dict, direction: str | None, adjusted_p: float | None,
            unit: str = "points") -> str:
  """The report's word for one comparison (see the module docstring); `unit` names the
  metric's unit in "the design resolves about X <unit>" ("" for a unitless metric)."""
  if not comparison.get("n"):
    return "not run (no seed of both)"
  if comparison["n"] < 2:
    return "not seen (one seed: no interval)"
  if comparison.get("half_width") is None:
    return f"not seen (the {comparison['n']} seeds' differences are all equal: no interval)"
  resolved = adjusted_p is not None and adjusted_p < FAMILY_ALPHA
  if not resolved:
    note = "; p < 0.05 before Holm" if comparison["p"] < FAMILY_ALPHA else ""
    amount = f"{comparison['half_width']:.2f}" + (f" {unit}" if unit else "")
    return f"not seen (the design resolves about {amount}{note})"
  higher = comparison["mean"] > 0
  if direction is None:
    return "higher" if higher else "lower"
  return "reproduces" if higher == (direction != "-") else "contradicted"
