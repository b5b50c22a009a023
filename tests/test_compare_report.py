"""Tests of tfmochi.compare.report: mean ± std against NumPy, aggregation, the training log's
tail."""

import json
import os

from absl.testing import absltest
import numpy as np

from tfmochi.compare import report


class ReportTest(absltest.TestCase):

  def _run(self, variant, seed, knn, status="ok", random_init=50.0):
    metrics = {key: None for key, *_ in report.METRICS}
    metrics["knn_top1"] = knn
    baselines = {key: None for key, *_ in report.BASELINES}
    baselines["knn_random_init"] = random_init
    return {"variant": variant, "seed": seed, "status": status, "metrics": metrics,
            "baselines": baselines, "knn_history": [], "error": None if status == "ok" else "x"}

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
    runs = [self._run("a", 0, 90.0, random_init=50.0), self._run("a", 1, 94.0, random_init=60.0),
            self._run("b", 0, 80.0, random_init=50.0), self._run("b", 1, 0.0, status="failed",
                                                                 random_init=99.0)]
    summary, baselines = report.aggregate(runs)
    self.assertEqual(summary["a"]["knn_top1"]["values"], [90.0, 94.0])
    self.assertAlmostEqual(summary["a"]["knn_top1"]["std"], np.std([90.0, 94.0], ddof=1))
    self.assertEqual(summary["b"]["knn_top1"]["n"], 1)
    # Seed 0's two runs count once; the failed run's baseline not at all.
    self.assertEqual(baselines["knn_random_init"]["values"], [50.0, 60.0])

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


if __name__ == "__main__":
  absltest.main()
