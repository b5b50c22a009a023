"""The results of a comparison sweep: per-run metrics read from the runs' own files, mean ± std
over seeds per variant, each variant against the baseline variant seed by seed (`stats`), what
the design resolves, results.json, the per-run table results_runs.csv, the Markdown report
results.md and the plots.

Every number comes from a file the evaluation wrote into the run (`METRICS`, `BASELINES`), so the
table can be checked against `eval_knn.json`, `eval_linear.json` and `analysis/report.json`. The
spread is the sample standard deviation over seeds (ddof = 1; none with one seed).
Needs no TensorFlow: run files are read through `tfmochi.runfiles`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np

from tfmochi import runfiles
from tfmochi.compare import stats

# The share of the last logged training steps that train_top1 averages over.
TAIL = 0.1
# (key, column title, file in the run directory, JSON path, scale, decimals)
METRICS = (
    ("knn_top1", "kNN top-1 (%)", "eval_knn.json", ("top1",), 1.0, 2),
    ("linear_top1", "linear top-1 (%)", "eval_linear.json", ("top1",), 1.0, 2),
    ("alignment", "alignment (lower: positives closer)", "analysis/report.json",
     ("alignment",), 1.0, 3),
    ("uniformity", "uniformity (lower: more uniform)", "analysis/report.json",
     ("uniformity",), 1.0, 3),
    ("same_class_hardest_1pct", "same class among hardest 1% (%)", "analysis/report.json",
     ("false_negatives", "hardest_1pct"), 100.0, 1),
    ("proxy_top1", "proxy top-1 vs queue (%)", "analysis/report.json", ("proxy_top1",), 1.0, 1),
    # The proxy task as trained: MoCHi's synthetic negatives are among the logits here (they are
    # not in proxy_top1, which scores the final model against the real queue only).
    ("train_top1", f"training top-1, last {TAIL:.0%} of steps (%)", runfiles.METRICS_FILE,
     ("acc1",), 100.0, 1),
    # The same training log against the real (masked) queue only: the trainer logs acc1_queue
    # when MoCHi is on; without MoCHi the row holds no synthetic negatives and acc1 is it.
    ("train_top1_queue", f"training top-1 vs real queue, last {TAIL:.0%} (%)",
     runfiles.METRICS_FILE, ("acc1_queue", "acc1"), 100.0, 1),
)
# The metrics the paired table compares with the baseline variant, seed by seed, in families:
# Holm's adjustment runs over each family's comparisons (the accuracies are the question; the
# geometry of the embedding is a second, separate one), and the unit of each metric.
PAIRED_FAMILIES = (("accuracy", ("knn_top1", "linear_top1")),
                   ("geometry", ("alignment", "uniformity")))
PAIRED_METRICS = tuple(key for _, keys in PAIRED_FAMILIES for key in keys)
_UNITS = {"knn_top1": "points", "linear_top1": "points", "alignment": "", "uniformity": ""}
# The variant every other one is compared with.
BASELINE_VARIANT = "moco_v2"
# Further (variant, reference) pairs compared when both ran: SupCon against the class oracle,
# which uses the same labels to remove same-class negatives instead of making them positives.
EXTRA_PAIRS = (("supcon", "oracle"),)
# What `tfmochi.compare.eval` writes into a run besides the evaluations' own files: its summary
# (the kNN monitor's history, the seconds) and the linear probe on raw pixels.
COMPARE_EVAL_FILE = "compare_eval.json"
RAW_PIXELS_LINEAR_FILE = "eval_linear_raw_pixels.json"
# The negatives analysis' same-class shares of the network at random initialisation and of the
# raw pixels, on the analysis' own queue and queries (`tfmochi.compare.eval`).
ANALYSIS_BASELINES_FILE = "analysis_baselines.json"
# The sweep's outputs in its output directory.
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
RUNS_CSV_FILE = "results_runs.csv"
# Where the sweep accumulates the wall and CPU seconds it spent on a run (training and
# evaluation, over every invocation that worked on it), so a rerun that skips it keeps its cost.
COST_FILE = "compare_cost.json"
# The same split's baselines, recorded by the evaluations of every run.
BASELINES = (
    ("knn_random_init", "random init", "knn_top1", "eval_knn.json", ("random_init_top1",)),
    ("knn_raw_pixels", "raw pixels", "knn_top1", "eval_knn.json", ("raw_pixels_top1",)),
    ("linear_random_init", "random init", "linear_top1", "eval_linear_random_init.json",
     ("top1",)),
    ("linear_raw_pixels", "raw pixels", "linear_top1", RAW_PIXELS_LINEAR_FILE, ("top1",)),
    ("same_class_random_init", "random init", "same_class_hardest_1pct",
     ANALYSIS_BASELINES_FILE, ("random_init", "hardest_1pct")),
    ("same_class_raw_pixels", "raw pixels", "same_class_hardest_1pct", ANALYSIS_BASELINES_FILE,
     ("raw_pixels", "hardest_1pct")),
    ("same_class_chance", "chance", "same_class_hardest_1pct", "analysis/report.json",
     ("false_negatives", "chance")),
)
_SCALE = {key: scale for key, _, _, _, scale, _ in METRICS}
_DECIMALS = {key: decimals for key, _, _, _, _, decimals in METRICS}
_TITLES = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1", "alignment": "alignment",
           "uniformity": "uniformity"}


def tail_mean(path: str, key: str, tail: float = TAIL) -> float | None:
  """Mean of `key` over the training log rows (metrics.jsonl) of the last `tail` of the logged
  steps; None when the file or the key is absent. Rows without the key (evaluations) are skipped."""
  text = runfiles.read_text(path)
  if text is None:
    return None
  rows = []
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except ValueError:  # a line cut by a kill
      continue
    if isinstance(row, dict) and row.get(key) is not None and row.get("step") is not None:
      rows.append((float(row["step"]), float(row[key])))
  if not rows:
    return None
  last = max(step for step, _ in rows)
  kept = [value for step, value in rows if step >= (1.0 - tail) * last]
  return float(np.mean(kept))


def _lookup(obj, keys):
  for key in keys:
    if not isinstance(obj, dict) or obj.get(key) is None:
      return None
    obj = obj[key]
  return float(obj)


def read_run_metrics(run_dir: str) -> dict:
  """{"metrics": {key: value}, "baselines": {key: value}, "train_seconds", "knn_history"} of a run
  (values None where a file or field is missing). Same-class shares are in %."""
  cache = {}

  def value(filename, keys, scale=1.0):
    if filename.endswith(".jsonl"):  # keys: the log's names to try, in order
      found = next((v for v in (tail_mean(os.path.join(run_dir, filename), k) for k in keys)
                    if v is not None), None)
      return None if found is None else found * scale
    if filename not in cache:
      cache[filename] = runfiles.read_json(os.path.join(run_dir, filename))
    found = _lookup(cache[filename], keys)
    return None if found is None else found * scale

  metrics = {key: value(f, keys, scale) for key, _, f, keys, scale, _ in METRICS}
  baselines = {key: value(f, keys, _SCALE[metric]) for key, _, metric, f, keys in BASELINES}
  summary = runfiles.read_json(os.path.join(run_dir, runfiles.SUMMARY_FILE)) or {}
  extra = runfiles.read_json(os.path.join(run_dir, COMPARE_EVAL_FILE)) or {}
  cost = runfiles.read_json(os.path.join(run_dir, COST_FILE)) or {}
  knn = cache.get("eval_knn.json") or {}
  return {"metrics": metrics, "baselines": baselines, "num_test": knn.get("num_test"),
          "train_seconds": summary.get("wall_seconds"), "global_step": summary.get("global_step"),
          "knn_history": extra.get("knn_history", []), "eval_seconds": extra.get("seconds", {}),
          "sweep_wall_seconds": cost.get("wall_seconds"),
          "sweep_cpu_seconds": cost.get("cpu_seconds")}


def mean_std(values) -> dict:
  """{"mean", "std" (sample, ddof=1; None for one value), "n", "values"} of the non-None values."""
  kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not kept:
    return {"mean": None, "std": None, "n": 0, "values": []}
  arr = np.asarray(kept, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
          "n": len(arr), "values": kept}


def aggregate(runs: list[dict]) -> tuple[dict, dict]:
  """(per variant {metric: mean_std}, baselines {key: mean_std}) over the finished runs.

  A baseline belongs to a seed (its split and its random init), not to a variant: each seed's
  value is the mean over the runs of that seed (equal up to float rounding), then mean ± std is
  taken over seeds."""
  per_variant = {}
  for run in runs:
    if run["status"] == "ok":
      per_variant.setdefault(run["variant"], []).append(run)
  summary = {variant: {key: mean_std([r["metrics"][key] for r in rs]) for key, *_ in METRICS}
             for variant, rs in per_variant.items()}
  baselines = {}
  for key, *_ in BASELINES:
    by_seed = {}
    for run in runs:
      if run["status"] == "ok" and run["baselines"].get(key) is not None:
        by_seed.setdefault(run["seed"], []).append(run["baselines"][key])
    baselines[key] = mean_std([float(np.mean(v)) for _, v in sorted(by_seed.items())])
  return summary, baselines


# ------------------------------------------------------------------------------------------------
# The per-run table (results_runs.csv): every run's figures, seed and cost, one row per run


_RUN_FIELDS = ("variant", "seed", "status", "global_step", "num_test", "train_seconds",
               "sweep_wall_seconds", "sweep_cpu_seconds")


def runs_table(runs: list[dict]) -> tuple[list[str], list[list]]:
  """(header, rows) of the per-run table: the run's fields, then every metric and baseline key
  (metrics in the table's units: %, points; empty = not measured)."""
  header = [*_RUN_FIELDS, *(key for key, *_ in METRICS), *(key for key, *_ in BASELINES)]
  rows = []
  for run in runs:
    row = [run.get(field) for field in _RUN_FIELDS]
    row += [run.get("metrics", {}).get(key) for key, *_ in METRICS]
    row += [run.get("baselines", {}).get(key) for key, *_ in BASELINES]
    rows.append(row)
  return header, rows


def runs_csv(runs: list[dict]) -> str:
  """The per-run table as CSV text (floats with repr precision: the round trip is exact)."""
  header, rows = runs_table(runs)
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([["" if v is None else repr(v) if isinstance(v, float) else v for v in row]
                    for row in rows])
  return buffer.getvalue()


def read_runs_csv(text: str) -> list[dict]:
  """The runs of a results_runs.csv text, as results.json holds them (variant, seed, status,
  metrics, baselines, costs): enough to redo `aggregate` and `compare_to_baseline`."""
  metric_keys = {key for key, *_ in METRICS}
  baseline_keys = {key for key, *_ in BASELINES}
  runs = []
  for row in csv.DictReader(io.StringIO(text)):
    def number(text):
      return None if text in ("", None) else float(text)
    run = {"variant": row["variant"], "seed": int(row["seed"]), "status": row["status"],
           "metrics": {k: number(row.get(k)) for k in metric_keys},
           "baselines": {k: number(row.get(k)) for k in baseline_keys}}
    for field in _RUN_FIELDS[3:]:
      value = number(row.get(field))
      run[field] = int(value) if field in ("global_step", "num_test") and value is not None \
          else value
    runs.append(run)
  return runs


# ------------------------------------------------------------------------------------------------
# Paired comparisons with the baseline variant, and what the design resolves


def _by_seed(runs: list[dict], variant: str, key: str) -> dict:
  return {r["seed"]: r["metrics"].get(key) for r in runs
          if r["variant"] == variant and r["status"] == "ok"}


def compare_to_baseline(runs: list[dict], variants: list[str],
                        baseline: str = BASELINE_VARIANT,
                        families: tuple = PAIRED_FAMILIES) -> list[dict]:
  """Every variant but `baseline` against it, seed by seed, for each metric of each family, and
  the EXTRA_PAIRS whose two variants ran; Holm and Bonferroni within each family.

  Returns:
    [{"variant", "reference", "family", "metric", "claim", "claim_words", stats.paired(...)
    fields, "p_holm", "p_bonferroni", "verdict"}], in the table's order; [] when the baseline
    did not run.
  """
  if baseline not in variants:
    return []
  pairs = [(variant, baseline, variant) for variant in variants if variant != baseline]
  pairs += [(variant, reference, f"{variant}-{reference}") for variant, reference in EXTRA_PAIRS
            if variant in variants and reference in variants]
  rows = []
  for family, keys in families:
    family_rows = []
    for key in keys:
      for variant, reference, claim_name in pairs:
        direction, words = stats.paper_claim(claim_name)
        if family != "accuracy":  # the papers' claims are about accuracy
          direction, words = None, "no claimed direction"
        family_rows.append({"variant": variant, "reference": reference, "family": family,
                            "metric": key, "claim": direction, "claim_words": words,
                            **stats.paired(_by_seed(runs, variant, key),
                                           _by_seed(runs, reference, key))})
    for adjusted, name in ((stats.holm, "p_holm"), (stats.bonferroni, "p_bonferroni")):
      for row, p in zip(family_rows, adjusted([row["p"] for row in family_rows])):
        row[name] = p
    for row in family_rows:
      row["verdict"] = stats.verdict(row, row["claim"], row["p_holm"], _UNITS.get(row["metric"],
                                                                                  ""))
    rows += family_rows
  return rows


def design_resolution(runs: list[dict], comparisons: list[dict], summary: dict,
                      baseline: str = BASELINE_VARIANT) -> dict:
  """Per paired metric, what the design resolves: {"n_test", "one_image" (points),
  "binomial_se" (at the baseline's mean), and `stats.resolution` of the observed paired
  spreads}."""
  n_tests = [r.get("num_test") for r in runs if r["status"] == "ok" and r.get("num_test")]
  n_test = int(np.median(n_tests)) if n_tests else None
  out = {}
  for key in PAIRED_METRICS:
    rows = [c for c in comparisons if c["metric"] == key]
    seeds = max((c["n"] for c in rows), default=0)
    family = [c for c in comparisons if rows and c["family"] == rows[0]["family"]]
    entry = stats.resolution([c["sd"] for c in rows], seeds, len(family))
    mean = (summary.get(baseline, {}).get(key) or {}).get("mean")
    entry["n_test"] = n_test
    if n_test and _UNITS.get(key) == "points":  # accuracies: counted in test images
      entry["one_image"] = 100.0 / n_test
      entry["binomial_se"] = None if mean is None else stats.binomial_se(mean, n_test)
    out[key] = entry
  return out


def format_mean_std(stat: dict, decimals: int) -> str:
  """'95.00 ± 0.42 (3)', '95.00 (1)' for one seed, '-' for none."""
  if not stat or stat["mean"] is None:
    return "-"
  text = f"{stat['mean']:.{decimals}f}"
  if stat["std"] is not None:
    text += f" ± {stat['std']:.{decimals}f}"
  return f"{text} ({stat['n']})"


def _tables(results: dict) -> list[str]:
  """The variants' table (mean ± std over seeds) and the baselines' table."""
  head = "| variant | " + " | ".join(title for _, title, *_ in METRICS) + " |"
  lines = [head, "|" + "---|" * (len(METRICS) + 1)]
  for variant in results["variants"]:
    stats_ = results["summary"].get(variant["name"])
    cells = [format_mean_std(stats_.get(key) if stats_ else None, _DECIMALS[key])
             for key, *_ in METRICS]
    lines.append(f"| {variant['name']} | " + " | ".join(cells) + " |")
  lines += ["", "Baselines on the same split (the same network at random initialisation, the "
            "raw eval views' pixels; chance = the same-class share of all negatives):", "",
            "| baseline | " + " | ".join(title for _, title, *_ in METRICS) + " |",
            "|" + "---|" * (len(METRICS) + 1)]
  for label in ("random init", "raw pixels", "chance"):
    cells = []
    for key, *_ in METRICS:
      found = [b for b, lab, metric, *_ in BASELINES if lab == label and metric == key]
      cells.append(format_mean_std(results["baselines"].get(found[0]), _DECIMALS[key])
                   if found else "")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def _resolution_lines(results: dict) -> list[str]:
  """What the design resolves, per paired metric: to read before the tables."""
  resolution, lines = results.get("resolution") or {}, []
  for key in PAIRED_METRICS:
    entry, title = resolution.get(key) or {}, _TITLES[key]
    if entry.get("one_image") is not None:
      se = entry.get("binomial_se")
      lines.append(f"- {title}: {entry['n_test']} test images, one image = "
                   f"{entry['one_image']:.2f} points"
                   + (f"; binomial standard error at the baseline's mean "
                      f"sqrt(p(1-p)/n) = {se:.2f} points" if se is not None else "") + ".")
    if entry.get("half_width") is not None:
      unit = f" {_UNITS[key]}" if _UNITS.get(key) else ""
      f = (lambda x: f"{x:.2f}{unit}") if unit else (lambda x: f"{x:.3f}")
      lines.append(
          f"- {title}, paired over {entry['n']} seeds (sd of the differences "
          f"{f(entry['pooled_sd'])}, pooled over the variants): 95% interval "
          f"± {f(entry['half_width'])}; ± {f(entry['family_half_width'])} "
          f"simultaneous over the {entry['m']} comparisons of its family (Bonferroni); a true "
          f"difference of {f(entry['detectable_80'])} is found with 80% power at 5%.")
  if not lines:
    return []
  return ["## What this design resolves (read before the tables)", "", *lines,
          "- The paired intervals compare variants on one fixed test split, so the split's "
          "binomial error is common to all and not in them; it bounds what one accuracy says "
          "about the data set's population.", ""]


def _format_p(p: float | None) -> str:
  return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _claim_words(direction: str | None) -> str:
  return {"+": "better", "-": "worse", ">=": "not worse"}.get(direction, "-")


def _paired_lines(results: dict) -> list[str]:
  """The paired table: each variant minus its reference, seed by seed, with the family note."""
  rows = results.get("paired") or []
  if not rows:
    return []
  counts = {name: sum(row["family"] == name for row in rows) for name, _ in PAIRED_FAMILIES}
  families = {name: count for name, count in counts.items() if count}
  sizes = "; ".join(f"{name}: {families[name]} ({', '.join(_TITLES[k] for k in keys)})"
                    for name, keys in PAIRED_FAMILIES if name in families)
  expected = 0.05 * len(rows)
  lines = [f"## Each variant against {results.get('baseline_variant', BASELINE_VARIANT)}, "
           "seed by seed", "",
           "Variant minus reference on the same seed (same initial weights and data order), "
           "mean over seeds, 95% t interval over seeds. The table makes "
           f"{len(rows)} comparisons in {len(families)} families ({sizes}): at 5% each, about "
           f"{expected:.1f} would come out significant by chance if nothing differed. Holm's "
           "adjustment within each family keeps the chance of any false one in it at 5%; only "
           "Holm p < 0.05 counts as resolved. Accuracies in points; alignment and uniformity "
           "in their own units (lower is better for both).", "",
           "| variant | against | metric | paper's claim | seeds | difference | 95% interval | "
           "p | Holm p | reading |", "|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    decimals = 2 if _UNITS.get(row["metric"]) else 3
    cells = [row["variant"], row.get("reference", BASELINE_VARIANT), _TITLES[row["metric"]],
             _claim_words(row["claim"]), str(row["n"]),
             "-" if row["mean"] is None else f"{row['mean']:+.{decimals}f}",
             "-" if row["low"] is None else
             f"[{row['low']:+.{decimals}f}, {row['high']:+.{decimals}f}]",
             _format_p(row["p"]), _format_p(row["p_holm"]), row["verdict"]]
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def _status_lines(results: dict) -> list[str]:
  """The failed and unfinished runs, and the cost of the finished ones."""
  lines = []
  failed = [r for r in results["runs"] if r["status"] == "failed"]
  if failed:
    lines += ["", "Failed runs (the rest of the sweep went on):", ""]
    lines += [f"- {r['variant']} seed {r['seed']}: {r['error']}" for r in failed]
  pending = [r for r in results["runs"] if r["status"] == "pending"]
  if pending:
    lines += ["", f"Not finished yet: {len(pending)} run(s) (the sweep is still running, or was "
              "stopped: the same command continues it)."]
  worked = [r for r in results["runs"] if r.get("sweep_wall_seconds") and r["status"] == "ok"]
  if worked:
    wall = [r["sweep_wall_seconds"] for r in worked]
    cpu = [r.get("sweep_cpu_seconds") or 0.0 for r in worked]
    lines += ["", f"Cost of the {len(worked)} finished run(s), training and evaluation summed over "
              "the invocations that worked on them (a killed invocation's share is not "
              f"recorded): {np.mean(wall):.0f} s wall and {np.mean(cpu):.0f} s CPU per "
              f"run (mean); {sum(wall) / 60:.0f} min wall and {sum(cpu) / 60:.0f} min CPU in "
              "all."]
  return lines


def markdown(results: dict) -> str:
  """results.md: what the design resolves, the variants' and baselines' tables, the paired
  comparisons, the failures and costs, the settings."""
  lines = [f"# Comparison: {results['base_flagfile']}", "", *_resolution_lines(results),
           "## Mean ± std over seeds", "", *_tables(results), "", *_paired_lines(results)]
  lines += _status_lines(results)
  lines += ["", f"Every run's figures, seed and cost: {RUNS_CSV_FILE} (one row per run).", "",
            *[f"- {note}" for note in results["notes"]], ""]
  return "\n".join(lines)


def _mean_curve(histories: list[list[list[float]]]):
  """(steps, mean, std) over seeds at the steps every seed logged."""
  common = set.intersection(*[{int(s) for s, _ in h} for h in histories])
  steps = sorted(common)
  values = np.array([[dict((int(s), v) for s, v in h)[step] for step in steps]
                     for h in histories], np.float64)
  return steps, values.mean(0), values.std(0, ddof=1) if len(values) > 1 else 0 * values[0]


# One look per variant: 20 colours (tab20's dark shades first, then its light ones) crossed with
# four line styles and markers, so that 12+ variants on a 10-colour cycle never share a look.
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def variant_style(index: int) -> dict:
  """matplotlib keyword arguments of the index-th variant: colour, line style and marker."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  palette = matplotlib.colormaps["tab20"].colors
  colour = palette[(2 * index) % 20 + (index // 10) % 2]  # dark 0-9, then light 0-9
  return {"color": colour, "linestyle": _LINE_STYLES[index % len(_LINE_STYLES)],
          "marker": _MARKERS[index % len(_MARKERS)]}


def _baseline_lines(ax, results: dict, keys: tuple[str, str]) -> None:
  """The random-init and raw-pixel baselines of `keys` as horizontal lines."""
  for key, label, style in ((keys[0], "random init", ":"), (keys[1], "raw pixels", "--")):
    mean = (results["baselines"].get(key) or {}).get("mean")
    if mean is not None:
      ax.axhline(mean, color="k" if label == "raw pixels" else "0.45", ls=style, lw=1.2,
                 label=label)


def _knn_axes(ax, results: dict, ok: list[dict]) -> None:
  """kNN top-1 over training steps per variant: mean over seeds, ± std shaded; the baselines."""
  for index, variant in enumerate(results["variants"]):
    histories = [r["knn_history"] for r in ok if r["variant"] == variant["name"]
                 and r["knn_history"]]
    if histories:
      steps, mean, std = _mean_curve(histories)
      style = variant_style(index)
      ax.plot(steps, mean, ms=4, lw=1.4, label=variant["name"], **style)
      ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=0.10)
  _baseline_lines(ax, results, ("knn_random_init", "knn_raw_pixels"))
  ax.set(xlabel="training step", ylabel="kNN top-1 (%)",
         title="kNN monitor over training (mean ± std over seeds)")


def _alignment_axes(ax, results: dict, ok: list[dict]) -> None:
  """Alignment vs uniformity: one small marker per run, one large one per variant's mean."""
  for index, variant in enumerate(results["variants"]):
    runs = [r for r in ok if r["variant"] == variant["name"]
            and r["metrics"]["alignment"] is not None and r["metrics"]["uniformity"] is not None]
    if runs:
      x = [r["metrics"]["alignment"] for r in runs]
      y = [r["metrics"]["uniformity"] for r in runs]
      style = variant_style(index)
      ax.scatter(x, y, s=14, alpha=0.5, color=style["color"], marker=style["marker"])
      ax.scatter([np.mean(x)], [np.mean(y)], s=70, marker=style["marker"], color=style["color"],
                 edgecolors="k", linewidths=0.6, label=variant["name"])
  ax.set(xlabel="alignment (lower: positive pairs closer)",
         ylabel="uniformity (lower: more uniform)",
         title="Alignment vs uniformity (small: seeds, large: means)")


def write_plots(results: dict, output_dir: str) -> list[str]:
  """knn_over_steps.png and alignment_uniformity.png; returns their file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ok = [r for r in results["runs"] if r["status"] == "ok"]
  written = []
  for name, draw, size in (("knn_over_steps.png", _knn_axes, (7, 4.5)),
                           ("alignment_uniformity.png", _alignment_axes, (6, 5))):
    fig, ax = plt.subplots(figsize=size)
    draw(ax, results, ok)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, ncol=2 if len(results["variants"]) > 8 else 1)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, name), dpi=110)
    plt.close(fig)
    written.append(name)
  return written


def with_statistics(results: dict) -> dict:
  """A copy of `results` (base_flagfile, variants, notes, runs) with every statistic the report
  shows: summary and baselines (mean ± std), paired comparisons, resolution, failed variants."""
  results = dict(results)
  runs = results["runs"]
  results["summary"], results["baselines"] = aggregate(runs)
  names = [v["name"] for v in results["variants"]]
  results["baseline_variant"] = BASELINE_VARIANT
  results["paired"] = compare_to_baseline(runs, names)
  results["resolution"] = design_resolution(runs, results["paired"], results["summary"])
  results["runs_csv"] = RUNS_CSV_FILE
  results["failed_variants"] = sorted({r["variant"] for r in runs if r["status"] == "failed"})
  return results


def write_results(results: dict, output_dir: str) -> None:
  """results.json, results.md and the plots into output_dir (local), each written whole."""
  results = with_statistics(results)
  results["plots"] = write_plots(results, output_dir)
  for name, text in ((RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True) + "\n"),
                     (MARKDOWN_FILE, markdown(results)), (RUNS_CSV_FILE,
                                                          runs_csv(results["runs"]))):
    runfiles.write_local(os.path.join(output_dir, name), text)  # a kill never leaves half a table
