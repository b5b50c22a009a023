"""Tests for tfmochi.evaluate.pipeline: one checkpoint of a run, and its random-init baseline."""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

from tfmochi import evaluate
from tfmochi import models
from tfmochi import rundir
import eval_fixtures as fx  # tests/ is on sys.path under pytest


class RunTest(tf.test.TestCase):

  def test_settings_are_validated(self):
    with self.assertRaisesRegex(evaluate.EvalError, "--mode must be one of knn, linear"):
      evaluate.EvalSettings(mode="svm").validate()
    with self.assertRaisesRegex(evaluate.EvalError, "--knn_t must be > 0.*--batch_size"):
      evaluate.EvalSettings(knn_t=0.0, batch_size=0).validate()

  def test_no_checkpoint_is_a_clear_error(self):
    model_dir = fx.make_run(os.path.join(self.create_tempdir().full_path, "run"), checkpoint=False)
    with self.assertRaisesRegex(rundir.CheckpointError, "no checkpoint yet"):
      evaluate.evaluate_checkpoint(model_dir, evaluate.EvalSettings(), sources=fx.sources())

  def test_unlabelled_sources_are_refused(self):
    model_dir = fx.make_run(os.path.join(self.create_tempdir().full_path, "run"))
    with self.assertRaisesRegex(evaluate.EvalError, "needs labels"):
      evaluate.evaluate_checkpoint(model_dir, evaluate.EvalSettings(),
                                   sources=fx.sources(labelled=False))

  def test_random_init_baseline(self):
    # A run that has not written a checkpoint yet still has its baseline: the initial network.
    model_dir = fx.make_run(os.path.join(self.create_tempdir().full_path, "run"), checkpoint=False)
    sources = fx.sources()
    settings = evaluate.EvalSettings(mode="knn", knn_k=5, batch_size=32, random_init=True)
    baseline = evaluate.evaluate_checkpoint(model_dir, settings, sources=sources)
    self.assertEqual((baseline["checkpoint_step"], baseline["random_init"]), (0, True))
    self.assertIsNone(baseline["checkpoint"])
    self.assertTrue(os.path.exists(os.path.join(model_dir, "eval_knn_random_init.json")))
    self.assertFalse(os.path.exists(evaluate.eval_json_path(model_dir, "knn")))
    # The same weights as a second rebuild: the baseline is reproducible.
    again = evaluate.evaluate_checkpoint(model_dir, settings, sources=sources, write=False)
    self.assertEqual(again["top1"], baseline["top1"])
    # Evaluations of checkpoints report it next to their own figure.
    fx.save_checkpoint(model_dir, models.build_encoder("resnet18", small_stem=True,
                                                     name="query_encoder"), 3)
    result = evaluate.evaluate_checkpoint(model_dir, dataclasses.replace(settings,
                                                                         random_init=False),
                                          sources=sources)
    self.assertEqual((result["checkpoint_step"], result["random_init"]), (3, False))
    self.assertEqual(result["random_init_top1"], baseline["top1"])
    with open(evaluate.eval_json_path(model_dir, "knn")) as f:
      self.assertEqual(json.load(f)["random_init_top1"], baseline["top1"])
    # Without evaluate's file, the trainer's knn_random_init.json is the kNN baseline.
    os.remove(evaluate.eval_json_path(model_dir, "knn", random_init=True))
    rundir.write_json(os.path.join(model_dir, "knn_random_init.json"), {"top1": 12.5})
    self.assertEqual(evaluate.random_init_result(model_dir, "knn")["top1"], 12.5)
    # ... unless the monitor ran on class-balanced subsets (another protocol).
    rundir.write_json(os.path.join(model_dir, "knn_random_init.json"),
                               {"top1": 12.5, "train_per_class": 20, "test_per_class": 10})
    self.assertIsNone(evaluate.random_init_result(model_dir, "knn"))
    self.assertIsNone(evaluate.random_init_result(model_dir, "linear"))
    # No checkpoint to pick, nothing to follow.
    with self.assertRaisesRegex(evaluate.EvalError, "takes no --checkpoint"):
      evaluate.evaluate_checkpoint(model_dir, settings, sources=sources,
                                   checkpoint_path=result["checkpoint"])
    with self.assertRaisesRegex(evaluate.EvalError, "--random_init and --sidecar"):
      evaluate.run_sidecar(model_dir, settings, sources=sources)
    with self.assertRaisesRegex(evaluate.EvalError, "linear_crop_min_scale"):
      evaluate.EvalSettings(linear_crop_min_scale=1.5).validate()


if __name__ == "__main__":
  tf.test.main()
