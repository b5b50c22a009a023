"""Tests for tfmochi.evaluate.results: eval_<mode>.json's history, scalars and baselines text."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tfmochi import evaluate
from tfmochi.evaluate import results


def _result(step: int, top1: float, mode: str = "knn", random_init: bool = False) -> dict:
  return {"mode": mode, "random_init": random_init, "checkpoint_step": step,
          "checkpoint": f"ckpt-{step}", "top1": top1, "top5": 100.0, "k": 5, "best_top1": top1}


class ResultsTest(tf.test.TestCase):

  def test_history_keeps_one_entry_per_step_in_order(self):
    model_dir = self.create_tempdir().full_path
    for step, top1 in ((2, 50.0), (1, 40.0), (2, 55.0)):  # step 2 evaluated again: replaced
      results.record(model_dir, _result(step, top1))
    with open(evaluate.eval_json_path(model_dir, "knn")) as f:
      written = json.load(f)
    self.assertEqual((written["checkpoint_step"], written["top1"]), (2, 55.0))
    self.assertEqual([(h["checkpoint_step"], h["top1"]) for h in written["history"]],
                     [(1, 40.0), (2, 55.0)])
    events = tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*"))
    tags = {value.tag for path in events for event in tf.compat.v1.train.summary_iterator(path)
            for value in event.summary.value}
    self.assertEqual(tags, {"knn_top1", "knn_top5", "knn_k"})

  def test_random_init_result_has_its_own_file_and_scalars(self):
    model_dir = self.create_tempdir().full_path
    results.record(model_dir, _result(0, 30.0, mode="linear", random_init=True))
    self.assertFalse(os.path.exists(evaluate.eval_json_path(model_dir, "linear")))
    self.assertEqual(evaluate.random_init_result(model_dir, "linear")["top1"], 30.0)
    events = tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*"))
    tags = {value.tag for path in events for event in tf.compat.v1.train.summary_iterator(path)
            for value in event.summary.value}
    self.assertEqual(tags, {"linear_random_init_top1", "linear_random_init_top5",
                            "linear_random_init_best_top1"})

  def test_a_damaged_file_starts_a_new_history(self):
    model_dir = self.create_tempdir().full_path
    with open(evaluate.eval_json_path(model_dir, "knn"), "w") as f:
      f.write("[1, 2")
    results.write_result(model_dir, "knn", _result(3, 70.0))
    with open(evaluate.eval_json_path(model_dir, "knn")) as f:
      self.assertEqual([h["checkpoint_step"] for h in json.load(f)["history"]], [3])

  def test_baselines_text(self):
    self.assertEqual(evaluate.baselines_text({"top1": 1.0}), "")
    self.assertEqual(evaluate.baselines_text({"random_init_top1": 93.667}, "k=14"),
                     " (random init 93.67%; k=14)")
    self.assertEqual(evaluate.baselines_text({"random_init_top1": 93.667,
                                              "raw_pixels_top1": 96.667}),
                     " (random init 93.67%, raw pixels 96.67%)")


if __name__ == "__main__":
  tf.test.main()
