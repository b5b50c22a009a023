"""Tests of tfmochi.compare.report and tfmochi.compare.stats on small synthetic per-run data:
mean ± std, paired differences and their intervals against a NumPy/hand reference, the Holm and
Bonferroni adjustments, the resolution figures, the words of the reading, the per-run CSV's round
trip, the new columns, the training log's tail and the plots' styles."""

import json
import math
import os

from absl.testing import absltest
import numpy as np

from tfmochi.compare import report
from tfmochi.compare import stats

# Student's t_{0.975} for 2 and 4 degrees of freedom (tables).
T975 = {2: 4.302652729749462, 4: 2.7764451051977934}
_KNN = {"moco_v2": [95.0, 96.0, 94.0, 95.5, 96.5], "mochi": [95.5, 96.4, 94.6, 96.1, 96.9],
        "hard": [93.0, 94.1, 92.2, 93.4, 94.0], "keep_hardest_1": [95.1, 95.8, 94.2, 95.4, 96.6]}


def _run(variant, seed, knn=None, status="ok", random_init=50.0, linear=None, **extra):
  metrics = {key: None for key, *_ in report.METRICS}
  metrics.update(knn_top1=knn, linear_top1=linear)
  baselines = {key: None for key, *_ in report.BASELINES}
  baselines["knn_random_init"] = random_init
  return {"variant": variant, "seed": seed, "status": status, "metrics": metrics,
          "baselines": baselines, "knn_history": [], "error": None if status == "ok" else "x",
          **extra}


def _sweep_runs():
  """5 seeds of four variants; linear = kNN - 1 (so its paired differences equal kNN's)."""
  runs = []
  for variant, values in _KNN.items():
    for seed, value in enumerate(values):
      runs.append(_run(variant, seed, value, linear=value - 1.0, num_test=1000,
                       sweep_wall_seconds=100.0 + seed, sweep_cpu_seconds=150.0,
                       global_step=620, train_seconds=80.0))
      runs[-1]["metrics"]["train_top1_queue"] = 40.0 + seed
      runs[-1]["baselines"]["same_class_raw_pixels"] = 55.0
      runs[-1]["baselines"]["same_class_random_init"] = 30.0 + seed
  return runs


def _results(runs):
  return report.with_statistics({
      "base_flagfile": "base.flags", "seeds": list(range(5)), "notes": ["a note"],
      "variants": [{"name": name, "flags": [], "about": ""} for name in _KNN], "runs": runs})


class StatsTest(absltest.TestCase):

  def test_paired_difference_and_interval_against_numpy(self):
    variant, baseline = _KNN["mochi"], _KNN["moco_v2"]
    got = stats.paired(dict(enumerate(variant)), dict(enumerate(baseline)))
    d = np.subtract(variant, baseline)
    half = T975[4] * d.std(ddof=1) / math.sqrt(5)
    self.assertEqual(got["n"], 5)
    self.assertAlmostEqual(got["mean"], d.mean(), places=12)
    self.assertAlmostEqual(got["sd"], d.std(ddof=1), places=12)
    self.assertAlmostEqual(got["half_width"], half, places=9)
    self.assertAlmostEqual(got["low"], d.mean() - half, places=9)
    self.assertAlmostEqual(got["high"], d.mean() + half, places=9)
    # By hand: differences 0.5, 0.4, 0.6, 0.6, 0.4 -> mean 0.5, sd sqrt(0.04 / 4) = 0.1.
    self.assertAlmostEqual(got["mean"], 0.5, places=12)
    self.assertAlmostEqual(got["sd"], 0.1, places=12)
    # p of the t statistic: the 95% interval excludes 0 exactly when p < 0.05.
    self.assertEqual(got["low"] > 0, got["p"] < 0.05)

  def test_paired_uses_only_the_seeds_both_have(self):
    got = stats.paired({0: 1.0, 1: 3.0, 2: None, 3: 9.0}, {0: 0.0, 1: 1.0, 2: 5.0})
    self.assertEqual(got["seeds"], [0, 1])
    self.assertEqual(got["differences"], [1.0, 2.0])
    self.assertAlmostEqual(got["half_width"], 12.706204736174698 * 0.5, places=9)  # t(1) * sd/√2
    one = stats.paired({0: 1.0}, {0: 0.0})
    self.assertEqual((one["mean"], one["half_width"], one["p"]), (1.0, None, None))
    self.assertEqual(stats.verdict(one, "+", None), "not seen (one seed: no interval)")

  def test_identical_differences_give_no_interval(self):
    """Accuracies move in steps of one test image: equal differences over seeds must not read as
    a zero-width interval and p = 0 (a 'resolved' difference out of two equal numbers)."""
    got = stats.paired({0: 95.0, 1: 94.6}, {0: 95.4, 1: 95.0})
    self.assertEqual((got["n"], got["sd"]), (2, 0.0))
    self.assertIsNone(got["p"])
    self.assertIsNone(got["half_width"])
    self.assertEqual(stats.verdict(got, "+", None),
                     "not seen (the 2 seeds' differences are all equal: no interval)")

  def test_holm_and_bonferroni(self):
    p = [0.01, 0.04, None, 0.03, 0.5]
    # Hand: sorted 0.01, 0.03, 0.04, 0.5 (m = 4) -> 0.04, 0.09, max(0.09, 0.08) = 0.09, 0.5.
    holm = stats.holm(p)
    self.assertIsNone(holm[2])
    for got, want in zip([holm[i] for i in (0, 3, 1, 4)], [0.04, 0.09, 0.09, 0.5]):
      self.assertAlmostEqual(got, want, places=12)
    self.assertEqual(stats.bonferroni(p), [0.04, 0.16, None, 0.12, 1.0])
    self.assertEqual(stats.holm([0.6, 0.4]), [0.8, 0.8])  # capped monotone

  def test_resolution_and_binomial_se(self):
    self.assertAlmostEqual(stats.binomial_se(93.0, 1000), 100 * math.sqrt(0.93 * 0.07 / 1000))
    res = stats.resolution([0.6, 0.8, None], n=5, m=6)
    pooled = math.sqrt((0.36 + 0.64) / 2)
    self.assertAlmostEqual(res["pooled_sd"], pooled, places=12)
    self.assertAlmostEqual(res["half_width"], T975[4] * pooled / math.sqrt(5), places=9)
    from scipy import stats as scipy_stats  # the references: Bonferroni's level, 80% power
    self.assertAlmostEqual(res["family_half_width"], scipy_stats.t.ppf(1 - 0.025 / 6, 4)
                           * pooled / math.sqrt(5), places=9)
    self.assertAlmostEqual(res["detectable_80"], (T975[4] + scipy_stats.t.ppf(0.8, 4))
                           * pooled / math.sqrt(5), places=9)
    self.assertEqual(stats.resolution([None], n=5, m=1), {})

  def test_words(self):
    resolved_up = {"n": 5, "mean": 1.0, "half_width": 0.4, "p": 0.001}
    resolved_down = {"n": 5, "mean": -1.0, "half_width": 0.4, "p": 0.001}
    unresolved = {"n": 5, "mean": 0.3, "half_width": 0.52, "p": 0.2}
    self.assertEqual(stats.verdict(resolved_up, "+", 0.01), "reproduces")
    self.assertEqual(stats.verdict(resolved_down, "+", 0.01), "contradicted")
    self.assertEqual(stats.verdict(resolved_down, ">=", 0.01), "contradicted")
    self.assertEqual(stats.verdict(resolved_up, None, 0.01), "higher")
    self.assertEqual(stats.verdict(unresolved, "+", 0.6),
                     "not seen (the design resolves about 0.52 points)")
    self.assertEqual(stats.verdict(unresolved, None, 0.6, unit=""),
                     "not seen (the design resolves about 0.52)")
    # Resolved alone but not after Holm: not resolved, and said so.
    self.assertIn("p < 0.05 before Holm", stats.verdict(resolved_up, "+", 0.2))
    self.assertEqual(stats.verdict({"n": 0}, "+", None), "not run (no seed of both)")
    self.assertEqual(stats.paper_claim("mochi_4_4_2")[0], "+")
    self.assertEqual(stats.paper_claim("drop_hardest_10")[0], ">=")
    self.assertIsNone(stats.paper_claim("keep_hardest_1")[0])
    self.assertIsNone(stats.paper_claim("drop_hardest_1")[0])
    self.assertIsNone(stats.paper_claim("keep_hardest_10")[0])
    # Cai et al.: the hardest 5% are necessary, so removing them should hurt.
    self.assertEqual(stats.paper_claim("drop_hardest_5")[0], "-")
    self.assertEqual(stats.verdict(resolved_down, "-", 0.01), "reproduces")
    self.assertEqual(stats.verdict(resolved_up, "-", 0.01), "contradicted")


class ReportTest(absltest.TestCase):

  def test_mean_std_matches_numpy(self):
    values = [91.25, 93.5, 90.0]
    stat = report.mean_std(values + [None])
    self.assertAlmostEqual(stat["mean"], np.mean(values), places=12)
    self.assertAlmostEqual(stat["std"], np.std(values, ddof=1), places=12)
    self.assertEqual(stat["n"], 3)
    self.assertIsNone(report.mean_std([4.0])["std"])
    self.assertEqual(report.format_mean_std(stat, 2),
                     f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (3)")

  def test_aggregate_skips_failures_and_averages_baselines_per_seed(self):
    runs = [_run("a", 0, 90.0, random_init=50.0), _run("a", 1, 94.0, random_init=60.0),
            _run("b", 0, 80.0, random_init=50.0), _run("b", 1, 0.0, status="failed",
                                                       random_init=99.0)]
    summary, baselines = report.aggregate(runs)
    self.assertEqual(summary["a"]["knn_top1"]["values"], [90.0, 94.0])
    self.assertAlmostEqual(summary["a"]["knn_top1"]["std"], np.std([90.0, 94.0], ddof=1))
    self.assertEqual(summary["b"]["knn_top1"]["n"], 1)
    # Seed 0's two runs count once; the failed run's baseline not at all.
    self.assertEqual(baselines["knn_random_init"]["values"], [50.0, 60.0])

  def test_paired_table_in_results(self):
    runs = _sweep_runs()
    runs[-1]["status"] = "failed"  # keep_hardest_1 seed 4: out of its comparison
    results = _results(runs)
    rows = {(r["variant"], r["metric"]): r for r in results["paired"]}
    self.assertLen(rows, 12)  # 3 variants x 4 metrics, in two families
    self.assertEqual({r["family"] for r in results["paired"]}, {"accuracy", "geometry"})
    for variant in ("mochi", "hard"):
      d = np.subtract(_KNN[variant], _KNN["moco_v2"])
      for metric in ("knn_top1", "linear_top1"):
        self.assertAlmostEqual(rows[(variant, metric)]["mean"], d.mean(), places=9)
    self.assertEqual(rows[("mochi", "alignment")]["verdict"], "not run (no seed of both)")
    self.assertEqual(rows[("keep_hardest_1", "knn_top1")]["n"], 4)
    accuracy = [r for r in results["paired"] if r["family"] == "accuracy"]
    self.assertLen(accuracy, 6)
    self.assertEqual([r["p_holm"] for r in accuracy], stats.holm([r["p"] for r in accuracy]))
    self.assertEqual(rows[("hard", "knn_top1")]["verdict"], "contradicted")
    self.assertEqual(rows[("mochi", "knn_top1")]["verdict"], "reproduces")
    self.assertStartsWith(rows[("keep_hardest_1", "knn_top1")]["verdict"], "not seen (")
    resolution = results["resolution"]["knn_top1"]
    self.assertEqual(resolution["n_test"], 1000)
    self.assertAlmostEqual(resolution["one_image"], 0.1)
    self.assertAlmostEqual(resolution["binomial_se"],
                           stats.binomial_se(np.mean(_KNN["moco_v2"]), 1000))
    sds = [rows[(v, "knn_top1")]["sd"] for v in ("mochi", "hard", "keep_hardest_1")]
    self.assertAlmostEqual(resolution["pooled_sd"], math.sqrt(np.mean(np.square(sds))))
    self.assertEqual((resolution["n"], resolution["m"]), (5, 6))  # m: the accuracy family

  def test_supcon_is_also_compared_with_the_oracle(self):
    runs = []
    for variant, values in (("moco_v2", [90.0, 91.0, 92.0]), ("oracle", [93.0, 93.5, 95.0]),
                            ("supcon", [94.0, 95.0, 96.5])):
      runs += [_run(variant, seed, value, linear=value, num_test=1000)
               for seed, value in enumerate(values)]
      for run, value in zip(runs[-3:], values):
        run["metrics"]["alignment"] = value / 100.0
    results = report.with_statistics({
        "base_flagfile": "b", "seeds": [0, 1, 2], "notes": [], "runs": runs,
        "variants": [{"name": n, "flags": [], "about": ""} for n in ("moco_v2", "oracle",
                                                                     "supcon")]})
    pair = [r for r in results["paired"] if r["reference"] == "oracle"]
    self.assertEqual([r["metric"] for r in pair], ["knn_top1", "linear_top1", "alignment",
                                                   "uniformity"])
    self.assertAlmostEqual(pair[0]["mean"], np.mean([1.0, 1.5, 1.5]))
    self.assertEqual(pair[0]["claim"], "+")
    self.assertIsNone(pair[2]["claim"])  # alignment: no claimed direction
    self.assertIn("| supcon | oracle | kNN top-1 | better | 3 |", report.markdown(results))

  def test_markdown_has_resolution_paired_table_and_new_columns(self):
    text = report.markdown(_results(_sweep_runs()))
    self.assertLess(text.index("What this design resolves"), text.index("| variant | kNN"))
    self.assertIn("training top-1 vs real queue, last 10% (%)", text)
    self.assertIn("The table makes 12 comparisons in 2 families", text)
    self.assertIn("| mochi | moco_v2 | kNN top-1 | better | 5 | +0.50 |", text)
    raw = next(line for line in text.splitlines() if line.startswith("| raw pixels |"))
    self.assertIn("55.0 ± 0.0 (5)", raw)  # the analysis' raw-pixel share, same-class column
    self.assertIn("results_runs.csv", text)

  def test_runs_csv_round_trip(self):
    runs = _sweep_runs()
    runs[0]["metrics"]["alignment"] = 0.1 + 0.2  # a float that prints with many digits
    back = report.read_runs_csv(report.runs_csv(runs))
    self.assertLen(back, len(runs))
    for original, read in zip(runs, back):
      self.assertEqual(read["metrics"], original["metrics"])
      self.assertEqual(read["baselines"], original["baselines"])
      for field in ("variant", "seed", "status", "num_test", "sweep_wall_seconds",
                    "global_step"):
        self.assertEqual(read[field], original[field], field)
    self.assertEqual(report.aggregate(back), report.aggregate(runs))
    again = report.with_statistics({**_results(runs), "runs": back})
    self.assertEqual(again["paired"], _results(runs)["paired"])

  def test_write_results_writes_the_csv_and_plots(self):
    out = self.create_tempdir().full_path
    runs = _sweep_runs()
    for run in runs:
      run["knn_history"] = [[0, 50.0], [10, run["metrics"]["knn_top1"]]]
    report.write_results({k: v for k, v in _results(runs).items() if k not in
                          ("summary", "paired")}, out)
    with open(os.path.join(out, report.RUNS_CSV_FILE)) as f:
      self.assertLen(report.read_runs_csv(f.read()), len(runs))
    with open(os.path.join(out, report.RESULTS_FILE)) as f:
      self.assertLen(json.load(f)["paired"], 12)
    for plot in ("knn_over_steps.png", "alignment_uniformity.png"):
      self.assertGreater(os.path.getsize(os.path.join(out, plot)), 1000)

  def test_variant_styles_are_distinct(self):
    looks = {(report.variant_style(i)["color"], report.variant_style(i)["linestyle"])
             for i in range(20)}
    self.assertLen(looks, 20)
    self.assertLen({report.variant_style(i)["color"] for i in range(20)}, 20)

  def test_tail_mean_reads_the_last_tenth_of_the_training_log(self):
    path = os.path.join(self.create_tempdir().full_path, "metrics.jsonl")
    rows = [{"step": step, "acc1": step / 100.0} for step in range(10, 101, 10)]
    with open(path, "w") as f:
      f.write("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
      f.write(json.dumps({"step": 85, "knn_top1": 50.0}) + "\n")  # an evaluation row: skipped
      f.write("\n".join(json.dumps(r) for r in rows[8:]) + "\n" + '{"step": 10')  # cut by a kill
    # Steps >= 90 of 100: 0.9 and 1.0.
    self.assertAlmostEqual(report.tail_mean(path, "acc1"), 0.95, places=12)
    self.assertAlmostEqual(report.tail_mean(path, "acc1", tail=0.5), np.mean(
        [r["acc1"] for r in rows if r["step"] >= 50]), places=12)
    self.assertIsNone(report.tail_mean(path, "loss"))
    self.assertIsNone(report.tail_mean(path + ".absent", "acc1"))

  def test_queue_accuracy_column_falls_back_to_acc1_without_mochi(self):
    run_dir = self.create_tempdir().full_path
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      f.write("\n".join(json.dumps({"step": s, "acc1": 0.5}) for s in (10, 20)) + "\n")
    self.assertAlmostEqual(report.read_run_metrics(run_dir)["metrics"]["train_top1_queue"], 50.0)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": 30, "acc1": 0.1, "acc1_queue": 0.7}) + "\n")
    metrics = report.read_run_metrics(run_dir)["metrics"]
    self.assertAlmostEqual(metrics["train_top1_queue"], 70.0)
    self.assertAlmostEqual(metrics["train_top1"], 10.0)


if __name__ == "__main__":
  absltest.main()
