"""Tests of tfmochi.benchmark (tiny sizes; never about speed)."""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from absl import flags

from tfmochi import benchmark
from tfmochi import config as config_lib

_TINY = dict(dataset="quickstart", arch="resnet18", small_stem=True, image_size=16, batch_size=4,
             queue_size=16, embedding_dim=8, bn_mode="split", bn_splits=2, mask_duplicates=False,
             mochi_num_hard=4, mochi_num_mix=3, mochi_num_query_mix=2)


def _check_result(test, result, what, variants):
  test.assertEqual(result["what"], what)
  json.loads(json.dumps(result))  # one JSON line: everything serialisable
  test.assertEqual(sorted(result["variants"]), sorted(variants))
  for name in variants:
    v = result["variants"][name]
    test.assertLen(v["seconds_per_step"], result["timed_steps"])
    for key in ("median_seconds_per_step", "images_per_sec", "peak_rss_mb"):
      test.assertGreater(v[key], 0, f"{name}.{key}")
    test.assertGreaterEqual(v["rss_increase_mb"], 0)
  if "moco" in variants and "mochi" in variants:
    test.assertGreater(result["ratio_mochi_over_moco"], 0)
    test.assertIn("rss_increase_mochi_minus_moco_mb", result)
  test.assertEqual(result["machine"]["cpus"], os.cpu_count())


class BenchmarkTest(tf.test.TestCase):

  def test_head_times_moco_and_mochi(self):
    # With MoCHi off in the flags, the head benchmark times the paper's MoCHi(1024, 1024, 512),
    # N capped at K.
    config = config_lib.TrainConfig(**dict(_TINY, mochi_num_hard=0, mochi_num_mix=0,
                                            mochi_num_query_mix=0))
    result = benchmark.run("head", config, warmup=1, timed=5)
    _check_result(self, result, "head", ["moco", "mochi"])
    self.assertEqual(result["config"]["mochi"], [16, 1024, 512])

  def test_step(self):
    # Plain MoCo only: tracing a ResNet training step is what costs time here (the MoCo-vs-MoCHi
    # comparison is checked by the head test, MoCHi steps by tests/test_moco.py).
    config = config_lib.TrainConfig(**dict(_TINY, mochi_num_hard=0, mochi_num_mix=0,
                                            mochi_num_query_mix=0))
    result = benchmark.run("step", config, warmup=1, timed=5, steps_per_call=2,
                           compare_keras_conv=True)
    _check_result(self, result, "step", ["moco", "moco_keras_conv"])
    self.assertEqual(result["config"]["steps_per_call"], 2)
    self.assertEqual(result["tracing_count"], {"moco": 1, "moco_keras_conv": 1})
    self.assertGreater(result["ratio_keras_conv_over_fast"], 0)

  def test_input_pipeline(self):
    config = config_lib.TrainConfig(**dict(_TINY, image_size=8))
    source = benchmark.synthetic_source(8, 12)
    result = benchmark.run("input", config, warmup=1, timed=5, source=source)
    _check_result(self, result, "input", ["input"])
    self.assertEqual(result["config"]["source_examples"], 8)

  def test_at_least_five_timed_steps(self):
    with self.assertRaisesRegex(ValueError, "timed must be >= 5"):
      benchmark.run("head", config_lib.TrainConfig(**_TINY), warmup=1, timed=4)

  def test_peak_memory_sees_a_transient_allocation(self):
    with benchmark.PeakMemory() as mem:
      block = np.ones(64 * 1024 * 1024 // 8)  # 64 MB, written so it is resident
      del block
    self.assertGreater(mem.increase_mb, 40)

  def test_command_line_prints_one_json_line(self):
    cmd = [sys.executable, "-m", "tfmochi.benchmark", "--what=input", "--batch_size=2",
           "--image_size=8", "--source_images=4", "--source_size=12", "--warmup_steps=1",
           "--timed_steps=5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    self.assertLen(lines, 1)
    _check_result(self, json.loads(lines[0]), "input", ["input"])

  def test_command_line_rejects_fewer_than_five_timed_steps(self):
    with self.assertRaises(flags.IllegalFlagValueError):
      flag_values = flags.FlagValues()
      benchmark.define_flags(flag_values)
      flag_values(["benchmark", "--timed_steps=4"])


if __name__ == "__main__":
  tf.test.main()
