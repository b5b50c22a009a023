"""Tests for tfmochi.evaluate.cli: `python -m tfmochi.evaluate` in subprocesses.

A kNN evaluation of a quickstart run at 16 px, its random-init baseline, and the error cases,
all started at once (at import when not under pytest-xdist, so that they overlap with the other
test modules' in-process tests).
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import tensorflow as tf

import cli_harness  # tests/ is on sys.path under pytest
import eval_fixtures as fx


@functools.lru_cache(maxsize=None)
def _cli() -> dict:
  """Starts every CLI case at once; returns {name: (Popen, model_dir)}."""
  root = cli_harness.workdir("tfmochi-test-evaluate-")
  good = fx.make_run(os.path.join(root, "run"))
  empty = fx.make_run(os.path.join(root, "empty"), checkpoint=False)
  start = functools.partial(cli_harness.start, "tfmochi.evaluate", cwd=root)
  return {
      "knn": (start(f"--model_dir={good}", "--mode=knn"), good),
      "no_checkpoint": (start(f"--model_dir={empty}", "--mode=knn"), empty),
      "random_init": (start(f"--model_dir={empty}", "--mode=knn", "--random_init"), empty),
      "bad_mode": (start(f"--model_dir={good}", "--mode=svm"), good),
      "bad_k": (start(f"--model_dir={good}", "--knn_k=abc"), good),
      "bad_strategy": (start(f"--model_dir={good}", "--strategy=multi_worker"), good),
  }


def _finished(name: str) -> tuple[int, str, str, str]:
  process, model_dir = _cli()[name]
  return (*cli_harness.finished(process), model_dir)


if cli_harness.overlap_with_other_tests():
  _cli()


class CommandLineTest(tf.test.TestCase):

  def _succeeded(self, name: str, written: str) -> tuple[str, dict, str]:
    """(stdout, the JSON file it wrote, model_dir) of a CLI case that must exit 0."""
    code, stdout, stderr, model_dir = _finished(name)
    self.assertEqual(code, 0, msg=stderr[-3000:])
    with open(os.path.join(model_dir, written)) as f:
      return stdout, json.load(f), model_dir

  @pytest.mark.filterwarnings("ignore")
  @pytest.mark.heavy
  def test_cli(self):
    """One test, so that under pytest-xdist a single worker starts the subprocesses."""
    _cli()
    with self.subTest("errors exit 2 without a traceback"):
      expected = {"no_checkpoint": "no checkpoint yet", "bad_mode": "--mode must be one of",
                  "bad_k": "knn_k", "bad_strategy": "--strategy must be one of"}
      for name, message in expected.items():
        cli_harness.assert_clean_error(self, "tfmochi.evaluate", name, _finished(name), message)

    with self.subTest("--mode=knn writes eval_knn.json and TensorBoard scalars"):
      stdout, result, model_dir = self._succeeded("knn", "eval_knn.json")
      self.assertIn("kNN top-1", stdout)
      for key in ("top1", "top5", "checkpoint_step", "k", "t", "num_train", "num_test",
                  "history"):
        self.assertIn(key, result)
      self.assertEqual(result["checkpoint_step"], 1)
      # k auto (the run's --knn_k=0): a tenth of the smallest class of the 1,497 digits (145).
      self.assertEqual((result["k"], result["t"]), (14, 0.1))
      self.assertIn("k=14", stdout)
      self.assertIn("raw pixels", stdout)
      self.assertAlmostEqual(result["raw_pixels_top1"], 96.67, places=1)
      self.assertEqual((result["num_train"], result["num_test"]), (1497, 300))
      self.assertBetween(result["top1"], 0.0, 100.0)
      self.assertGreaterEqual(result["top5"], result["top1"])
      events = tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*"))
      self.assertNotEmpty(events)
      tags = {value.tag for path in events
              for event in tf.compat.v1.train.summary_iterator(path)
              for value in event.summary.value if event.step == 1}
      self.assertContainsSubset({"knn_top1", "knn_top5", "knn_k"}, tags)

    with self.subTest("--random_init needs no checkpoint and writes its own file"):
      stdout, result, model_dir = self._succeeded("random_init", "eval_knn_random_init.json")
      self.assertIn("(random init,", stdout)
      self.assertEqual((result["checkpoint_step"], result["random_init"]), (0, True))
      self.assertEqual((result["num_train"], result["num_test"]), (1497, 300))
      self.assertFalse(os.path.exists(os.path.join(model_dir, "eval_knn.json")))


if __name__ == "__main__":
  tf.test.main()
