"""Tests for tfmochi.evaluate.sidecar: following a run's checkpoints until it finishes."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tfmochi import evaluate
from tfmochi import models
from tfmochi import rundir
import eval_fixtures as fx  # tests/ is on sys.path under pytest


class SidecarTest(tf.test.TestCase):

  def test_training_finished(self):
    model_dir = fx.make_run(os.path.join(self.create_tempdir().full_path, "run"))
    latest = tf.train.latest_checkpoint(rundir.RunDir(model_dir).checkpoint_dir)
    self.assertFalse(evaluate.training_finished(model_dir, latest))  # no summary.json yet
    summary = os.path.join(model_dir, "summary.json")
    with open(summary, "w") as f:
      json.dump({"global_step": 1}, f)
    self.assertFalse(evaluate.training_finished(model_dir, None))  # newest not evaluated
    self.assertTrue(evaluate.training_finished(model_dir, latest))
    with open(summary, "w") as f:  # a stale summary of an earlier, since resumed run
      json.dump({"global_step": 0}, f)
    self.assertFalse(evaluate.training_finished(model_dir, latest))

  def test_sidecar_follows_checkpoints_until_the_summary(self):
    model_dir = fx.make_run(os.path.join(self.create_tempdir().full_path, "run"))
    sources = fx.sources()
    # The "trainer": after the side-car has evaluated step 1, it writes step 2 and finishes.
    next_encoder = models.build_encoder("resnet18", small_stem=True, name="query_encoder")
    lines = []

    def progress(line):
      lines.append(line)
      if line.startswith("side-car: step 1:"):
        fx.save_checkpoint(model_dir, next_encoder, 2)
        rundir.write_json(os.path.join(model_dir, "summary.json"), {"global_step": 2})

    settings = evaluate.EvalSettings(mode="knn", knn_k=5, batch_size=32)
    results = evaluate.run_sidecar(model_dir, settings, timeout=120, poll_interval=0.5,
                                   sources=sources, progress=progress)
    self.assertEqual([r["checkpoint_step"] for r in results], [1, 2], msg=lines)
    with open(evaluate.eval_json_path(model_dir, "knn")) as f:
      written = json.load(f)
    self.assertEqual(written["checkpoint_step"], 2)
    self.assertEqual([h["checkpoint_step"] for h in written["history"]], [1, 2])
    self.assertEqual(written["k"], 5)

  def test_sidecar_times_out_without_checkpoints(self):
    model_dir = fx.make_run(os.path.join(self.create_tempdir().full_path, "run"), checkpoint=False)
    with self.assertLogs(tf.get_logger(), "INFO") as logs:
      results = evaluate.run_sidecar(model_dir, evaluate.EvalSettings(), timeout=3,
                                     poll_interval=0.5, sources=fx.sources())
    self.assertEqual(results, [])
    waits = [r for r in logs.output if "Waiting for new checkpoint" in r]
    self.assertBetween(len(waits), 1, 4)  # it sleeps between polls, it does not spin


if __name__ == "__main__":
  tf.test.main()
