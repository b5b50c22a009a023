"""Tests for tfmochi.analyze.cli: `python -m tfmochi.analyze` in subprocesses.

A full analysis of a quickstart run at 16 px and the error cases, all started at once (at import
when not under pytest-xdist, so that they overlap with the other test modules' in-process
tests).
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import tensorflow as tf

import cli_harness  # tests/ is on sys.path under pytest
import eval_fixtures as fx

_PNGS = ("similarities.png", "false_negatives.png", "gradient_share.png", "mochi.png")
# MoCHi off (explicitly: the defaults turned it on), so the analysis uses its own defaults.
_MOCHI_OFF = {"mochi_num_hard": 0, "mochi_num_mix": 0, "mochi_num_query_mix": 0}


@functools.lru_cache(maxsize=None)
def _cli() -> dict:
  """Starts every CLI case at once; returns {name: (Popen, output_dir)}."""
  root = cli_harness.workdir("tfmochi-test-analyze-")
  good = fx.make_run(os.path.join(root, "run"), **_MOCHI_OFF)
  empty = fx.make_run(os.path.join(root, "empty"), checkpoint=False, **_MOCHI_OFF)
  blocker = os.path.join(root, "a_file")
  with open(blocker, "w") as f:
    f.write("not a directory")
  out = os.path.join(root, "analysis")
  start = functools.partial(cli_harness.start, "tfmochi.analyze", cwd=root)
  return {
      "analyze": (start(f"--model_dir={good}", f"--output_dir={out}", "--num_queries=64"), out),
      "no_checkpoint": (start(f"--model_dir={empty}", f"--output_dir={root}/x"), None),
      "unwritable": (start(f"--model_dir={good}", f"--output_dir={blocker}/out"), None),
      "bad_flag": (start(f"--model_dir={good}", "--num_queries=0"), None),
  }


def _finished(name: str) -> tuple[int, str, str, str | None]:
  process, out = _cli()[name]
  return (*cli_harness.finished(process), out)


if cli_harness.overlap_with_other_tests():
  _cli()


class CommandLineTest(tf.test.TestCase):

  @pytest.mark.filterwarnings("ignore")
  @pytest.mark.heavy
  def test_cli(self):
    """One test, so that under pytest-xdist a single worker starts the subprocesses."""
    import matplotlib.image  # pylint: disable=g-import-not-at-top

    _cli()
    with self.subTest("errors exit 2 without a traceback"):
      expected = {"no_checkpoint": "no checkpoint yet",
                  "unwritable": "is not writable",
                  "bad_flag": "--num_queries must be >= 1"}
      for name, message in expected.items():
        cli_harness.assert_clean_error(self, "tfmochi.analyze", name, _finished(name), message)

    with self.subTest("the analysis writes report.json, the plots and index.html"):
      code, stdout, stderr, out = _finished("analyze")
      self.assertEqual(code, 0, msg=stderr[-3000:])
      self.assertIn("Report:", stdout)
      with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
      self.assertEqual(report["checkpoint_step"], 1)
      self.assertEqual((report["queue_size"], report["num_queries"]), (256, 64))
      self.assertTrue(report["run"]["queries_disjoint_from_queue"])
      self.assertIn("query encoder", report["run"]["keys"])  # the checkpoint has no key encoder
      for key in ("negatives", "false_negatives", "gradient_share", "alignment", "uniformity",
                  "proxy_top1", "proxy_top5", "mochi"):
        self.assertIn(key, report)
      self.assertAllClose(sum(report["gradient_share"]["share"]), 1.0)
      # MoCHi was off in the run: the defaults MoCHi(min(1024, K/8), 1024, 512).
      self.assertEqual((report["mochi"]["num_hard"], report["mochi"]["num_mix"],
                        report["mochi"]["num_query_mix"]), (32, 1024, 512))
      self.assertFalse(report["semantic_similarity"]["available"])
      self.assertIn("ImageNet", report["semantic_similarity"]["message"])
      with open(os.path.join(out, "index.html")) as f:
        page = f.read()
      for name in _PNGS:
        image = matplotlib.image.imread(os.path.join(out, name))
        self.assertEqual(image.ndim, 3, msg=name)
        self.assertGreater(image.shape[0], 100, msg=name)
        self.assertIn(f"src='{name}'", page)
        self.assertIn(name, report["plots"])


if __name__ == "__main__":
  tf.test.main()
