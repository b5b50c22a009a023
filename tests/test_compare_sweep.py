"""Tests of tfmochi.compare.sweep and `python -m tfmochi.compare`: the commands it starts, the
error line it reports, and one real sweep of resnet10_tiny on the offline digits that is killed
half-way, resumed, and holds a failing variant (which also runs tfmochi.compare.eval and
tfmochi.compare.report on real runs)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from absl.testing import absltest
import numpy as np

from tfmochi.compare import report
from tfmochi.compare import sweep
from tfmochi.compare import variants as variants_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CommandsTest(absltest.TestCase):

  def test_train_command_puts_seed_and_model_dir_last(self):
    config = sweep.SweepConfig("base.flags", (), (0,), "/out", train_steps=5,
                               train_flags=("--seed=9",), python="py")
    cmd = sweep.train_command(config, variants_lib.resolve(["hard"])[0], 3)
    self.assertEqual(cmd[:4], ["py", "-m", "tfmochi.train", "--flagfile=base.flags"])
    self.assertIn("--train_steps=5", cmd)
    self.assertEqual(cmd[-2:], ["--seed=3", "--model_dir=/out/runs/hard/seed3"])

  def test_eval_command_runs_the_eval_module(self):
    config = sweep.SweepConfig("base.flags", (), (0,), "/out", linear_epochs=2, python="py")
    cmd = sweep.eval_command(config, "/out/runs/hard/seed3")
    self.assertEqual(cmd[:4], ["py", "-m", "tfmochi.compare.eval",
                               "--model_dir=/out/runs/hard/seed3"])
    self.assertIn("--linear_epochs=2", cmd)

  def test_last_error_line(self):
    path = os.path.join(self.create_tempdir().full_path, "log")
    with open(path, "w") as f:
      f.write("step 1/6\r step 2/6\nTraceback (most recent call last):\n  x\n"
              "tfmochi.train: error: --queue_size (K) must be a multiple\nbye\n")
    self.assertEqual(sweep.last_error_line(path),
                     "tfmochi.train: error: --queue_size (K) must be a multiple")


# resnet10_tiny at 16 px, 6 steps, a checkpoint every 2 and a kNN pass every ~3 steps.
_TINY = ["--arch=resnet10_tiny", "--image_size=16", "--batch_size=16", "--queue_size=64",
         "--embedding_dim=16", "--mochi_num_hard=8", "--mochi_num_mix=4",
         "--mochi_num_query_mix=2", "--mochi_warmup_epochs=0", "--train_steps=6",
         "--steps_per_loop=2", "--checkpoint_every_steps=2", "--knn_every_epochs=0.03",
         "--export_format=none"]


class SweepTest(absltest.TestCase):
  """One real sweep: moco_v2 (2 seeds) and a variant whose flags are invalid."""

  def _sweep(self, base, variants_file, out, **popen):
    cmd = [sys.executable, "-m", "tfmochi.compare", f"--base_flagfile={base}",
           f"--variants_file={variants_file}", "--seeds=2", f"--output_dir={out}",
           "--linear_epochs=2", "--num_queries=32"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)

  @pytest.mark.heavy
  def test_kill_resume_failure_and_table(self):
    tmp = self.create_tempdir().full_path
    base = os.path.join(tmp, "tiny.flags")
    with open(base, "w") as f:
      f.write("\n".join([f"--flagfile={REPO}/configs/digits.flags", *_TINY]) + "\n")
    variants_file = os.path.join(tmp, "variants")
    with open(variants_file, "w") as f:
      f.write("moco_v2\nbroken: --queue_size=7  # K = 7 < N: fails\n")
    out = os.path.join(tmp, "out")
    runs = os.path.join(out, "runs")
    first, second = (os.path.join(runs, "moco_v2", f"seed{s}") for s in (0, 1))

    # 1. Kill the whole sweep (driver and trainer) once seed 1 has a checkpoint.
    proc = self._sweep(base, variants_file, out, start_new_session=True)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(second, "checkpoints", "checkpoint")):
      self.assertIsNone(proc.poll(), proc.stdout.read() if proc.poll() is not None else "")
      self.assertLess(time.time(), deadline)
      time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    self.assertTrue(os.path.exists(os.path.join(first, "compare_eval.json")))
    done_mtime = os.path.getmtime(os.path.join(first, "summary.json"))

    # 2. The same command continues: seed 0 is not redone, seed 1 resumes, "broken" fails alone.
    proc = self._sweep(base, variants_file, out)
    output, _ = proc.communicate(timeout=900)
    self.assertEqual(proc.returncode, 0, output)
    self.assertIn("moco_v2 seed 0: finished earlier, skipped", output)
    self.assertIn("broken seed 1: FAILED", output)
    self.assertEqual(os.path.getmtime(os.path.join(first, "summary.json")), done_mtime)
    for name, commands in (("train.log", 1), ("eval.log", 1)):
      with open(os.path.join(first, name)) as f:
        self.assertEqual(f.read().count("\n$ "), commands, name)
    with open(os.path.join(second, "train.log")) as f:
      log = f.read()
    self.assertEqual(log.count("\n$ "), 2)
    self.assertRegex(log, r"Resumed from .* \(step [246]/6\)")

    results = json.load(open(os.path.join(out, "results.json")))
    status = {(r["variant"], r["seed"]): r for r in results["runs"]}
    self.assertEqual(status[("broken", 0)]["status"], "failed")
    self.assertIn("--mochi_num_hard (N) must be in [0, K]", status[("broken", 1)]["error"])
    self.assertIn("broken", results["failed_variants"])
    self._check_table(results, [status[("moco_v2", s)] for s in (0, 1)], out)

  def _check_table(self, results, ok_runs, out):
    """The table's numbers are the runs' eval files' numbers, and their mean ± std."""
    values = {}
    for run in ok_runs:
      self.assertEqual(run["status"], "ok")
      files = {name: json.load(open(os.path.join(run["run_dir"], name))) for name in
               ("eval_knn.json", "eval_linear.json", "eval_linear_random_init.json",
                "eval_linear_raw_pixels.json", "analysis/report.json", "summary.json",
                report.ANALYSIS_BASELINES_FILE)}
      self.assertEqual(files["summary.json"]["global_step"], 6)
      expected = {"knn_top1": files["eval_knn.json"]["top1"],
                  "linear_top1": files["eval_linear.json"]["top1"],
                  "alignment": files["analysis/report.json"]["alignment"],
                  "uniformity": files["analysis/report.json"]["uniformity"],
                  "same_class_hardest_1pct":
                      100 * files["analysis/report.json"]["false_negatives"]["hardest_1pct"]}
      logged = [json.loads(line) for line in open(os.path.join(run["run_dir"],
                                                                  "metrics.jsonl"))]
      acc1 = [(r["step"], r["acc1"]) for r in logged if "acc1" in r]
      expected["train_top1"] = 100 * np.mean([a for step, a in acc1
                                              if step >= 0.9 * max(s for s, _ in acc1)])
      # moco_v2 has no synthetic negatives: its queue accuracy is acc1 itself.
      expected["train_top1_queue"] = expected["train_top1"]
      for key, value in expected.items():
        self.assertAlmostEqual(run["metrics"][key], value, places=9, msg=key)
        values.setdefault(key, []).append(value)
      shares = files[report.ANALYSIS_BASELINES_FILE]
      for kind in ("random_init", "raw_pixels"):
        self.assertBetween(shares[kind]["hardest_1pct"], 0.0, 1.0)
        self.assertAlmostEqual(run["baselines"][f"same_class_{kind}"],
                               100 * shares[kind]["hardest_1pct"], places=9)
      self.assertEqual(run["num_test"], files["eval_knn.json"]["num_test"])
      self.assertEqual(run["baselines"]["knn_raw_pixels"],
                       files["eval_knn.json"]["raw_pixels_top1"])
      self.assertEqual(run["baselines"]["linear_random_init"],
                       files["eval_linear_random_init.json"]["top1"])
      self.assertTrue(files["eval_linear.json"]["cache_features"])
      self.assertEqual([s for s, _ in run["knn_history"]], [0, 3, 6])
    table = open(os.path.join(out, "results.md")).read()
    row = next(line for line in table.splitlines() if line.startswith("| moco_v2 |"))
    for key, decimals in (("knn_top1", 2), ("linear_top1", 2), ("alignment", 3),
                          ("uniformity", 3), ("same_class_hardest_1pct", 1), ("train_top1", 1)):
      stat = results["summary"]["moco_v2"][key]
      self.assertAlmostEqual(stat["mean"], np.mean(values[key]), places=9)
      self.assertAlmostEqual(stat["std"], np.std(values[key], ddof=1), places=9)
      self.assertIn(f"{np.mean(values[key]):.{decimals}f} ± "
                    f"{np.std(values[key], ddof=1):.{decimals}f} (2)", row)
    # Each run's cost, kept across invocations: seed 0 was skipped by the second one (still one
    # invocation), seed 1's killed first share is not recorded (one).
    for run in ok_runs:
      cost = json.load(open(os.path.join(run["run_dir"], report.COST_FILE)))
      self.assertEqual(cost["invocations"], 1)
      self.assertGreater(cost["cpu_seconds"], 1.0)
      self.assertEqual(run["sweep_wall_seconds"], cost["wall_seconds"])
    self.assertIn("Cost of the 2 finished run(s)", table)
    self.assertIn("What this design resolves", table)
    with open(os.path.join(out, report.RUNS_CSV_FILE)) as f:
      csv_runs = {(r["variant"], r["seed"]): r for r in report.read_runs_csv(f.read())}
    self.assertLen(csv_runs, 4)
    for run in ok_runs:
      self.assertEqual(csv_runs[(run["variant"], run["seed"])]["metrics"], run["metrics"])
    broken = [row for row in results["paired"] if row["variant"] == "broken"]
    # kNN, linear, alignment, uniformity: failed, not run
    self.assertEqual([row["n"] for row in broken], [0, 0, 0, 0])
    self.assertIn("| broken | - |", table)
    self.assertIn("cache_features=True", table)
    for plot in ("knn_over_steps.png", "alignment_uniformity.png"):
      self.assertGreater(os.path.getsize(os.path.join(out, plot)), 1000)


if __name__ == "__main__":
  absltest.main()
