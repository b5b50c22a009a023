"""The results of a comparison sweep: per-run metrics read from the runs' own files, mean ± std
over seeds per variant, results.json, the Markdown table results.md and the plots.

Every number comes from a file the evaluation wrote into the run (`METRICS`, `BASELINES`), so the
table can be checked against `eval_knn.json`, `eval_linear.json` and `analysis/report.json`. The
spread is the sample standard deviation over seeds (ddof = 1; none with one seed).
Needs no TensorFlow: run files are read through `tfmochi.runfiles`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from tfmochi import runfiles

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
)
# What `tfmochi.compare.eval` writes into a run besides the evaluations' own files: its summary
# (the kNN monitor's history, the seconds) and the linear probe on raw pixels.
COMPARE_EVAL_FILE = "compare_eval.json"
RAW_PIXELS_LINEAR_FILE = "eval_linear_raw_pixels.json"
# The sweep's outputs in its output directory.
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
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
    ("same_class_chance", "chance", "same_class_hardest_1pct", "analysis/report.json",
     ("false_negatives", "chance")),
)
_SCALE = {key: scale for key, _, _, _, scale, _ in METRICS}
_DECIMALS = {key: decimals for key, _, _, _, _, decimals in METRICS}


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
    if filename.endswith(".jsonl"):
      found = tail_mean(os.path.join(run_dir, filename), keys[0])
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
  return {"metrics": metrics, "baselines": baselines,
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


def format_mean_std(stat: dict, decimals: int) -> str:
  """'95.00 ± 0.42 (3)', '95.00 (1)' for one seed, '-' for none."""
  if not stat or stat["mean"] is None:
    return "-"
  text = f"{stat['mean']:.{decimals}f}"
  if stat["std"] is not None:
    text += f" ± {stat['std']:.{decimals}f}"
  return f"{text} ({stat['n']})"


def markdown(results: dict) -> str:
  """results.md: the variants' table, the baselines' table, the failures, the settings."""
  head = "| variant | " + " | ".join(title for _, title, *_ in METRICS) + " |"
  lines = [f"# Comparison: {results['base_flagfile']}", "", head,
           "|" + "---|" * (len(METRICS) + 1)]
  for variant in results["variants"]:
    stats = results["summary"].get(variant["name"])
    cells = [format_mean_std(stats.get(key) if stats else None, _DECIMALS[key])
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
  lines += ["", *[f"- {note}" for note in results["notes"]], ""]
  return "\n".join(lines)


def _mean_curve(histories: list[list[list[float]]]):
  """(steps, mean, std) over seeds at the steps every seed logged."""
  common = set.intersection(*[{int(s) for s, _ in h} for h in histories])
  steps = sorted(common)
  values = np.array([[dict((int(s), v) for s, v in h)[step] for step in steps]
                     for h in histories], np.float64)
  return steps, values.mean(0), values.std(0, ddof=1) if len(values) > 1 else 0 * values[0]


def _knn_axes(ax, results: dict, ok: list[dict]) -> None:
  """kNN top-1 over training steps per variant: mean over seeds, ± std shaded; raw pixels."""
  for variant in results["variants"]:
    histories = [r["knn_history"] for r in ok if r["variant"] == variant["name"]
                 and r["knn_history"]]
    if histories:
      steps, mean, std = _mean_curve(histories)
      line, = ax.plot(steps, mean, marker="o", ms=3, label=variant["name"])
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
  raw = results["baselines"].get("knn_raw_pixels", {}).get("mean")
  if raw is not None:
    ax.axhline(raw, color="k", ls="--", lw=1, label="raw pixels")
  ax.set(xlabel="training step", ylabel="kNN top-1 (%)",
         title="kNN monitor over training (mean ± std over seeds)")


def _alignment_axes(ax, results: dict, ok: list[dict]) -> None:
  """Alignment vs uniformity: one dot per run, one diamond per variant's mean."""
  for variant in results["variants"]:
    runs = [r for r in ok if r["variant"] == variant["name"]
            and r["metrics"]["alignment"] is not None and r["metrics"]["uniformity"] is not None]
    if runs:
      x = [r["metrics"]["alignment"] for r in runs]
      y = [r["metrics"]["uniformity"] for r in runs]
      points = ax.scatter(x, y, s=14, alpha=0.5)
      ax.scatter([np.mean(x)], [np.mean(y)], s=60, marker="D",
                 color=points.get_facecolor()[0][:3], label=variant["name"])
  ax.set(xlabel="alignment (lower: positive pairs closer)",
         ylabel="uniformity (lower: more uniform)",
         title="Alignment vs uniformity (dots: seeds, diamonds: means)")


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
      ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, name), dpi=110)
    plt.close(fig)
    written.append(name)
  return written


def write_results(results: dict, output_dir: str) -> None:
  """results.json, results.md and the plots into output_dir (local), each written whole."""
  results = dict(results)
  results["summary"], results["baselines"] = aggregate(results["runs"])
  results["failed_variants"] = sorted({r["variant"] for r in results["runs"]
                                       if r["status"] == "failed"})
  results["plots"] = write_plots(results, output_dir)
  for name, text in ((RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True) + "\n"),
                     (MARKDOWN_FILE, markdown(results))):
    runfiles.write_local(os.path.join(output_dir, name), text)  # a kill never leaves half a table
