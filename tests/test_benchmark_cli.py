"""Tests of `python -m tfmochi.benchmark` (tfmochi.benchmark.cli)."""

import json
import os
import subprocess
import sys

import tensorflow as tf
from absl import flags

import benchmark_fixtures as fx  # tests/fx.py
from tfmochi import config as config_lib
from tfmochi.benchmark import cli


class CliTest(tf.test.TestCase):

  def test_at_least_five_timed_steps(self):
    with self.assertRaisesRegex(ValueError, "timed must be >= 5"):
      cli.run("head", config_lib.TrainConfig(**fx.TINY), warmup=1, timed=4)

  def test_command_line_prints_one_json_line(self):
    cmd = [sys.executable, "-m", "tfmochi.benchmark", "--what=input", "--batch_size=2",
           "--image_size=8", "--source_images=4", "--source_size=12", "--warmup_steps=1",
           "--timed_steps=5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    self.assertLen(lines, 1)
    fx.check_result(self, json.loads(lines[0]), "input", ["input"])

  def test_command_line_rejects_fewer_than_five_timed_steps(self):
    with self.assertRaises(flags.IllegalFlagValueError):
      flag_values = flags.FlagValues()
      cli.define_flags(flag_values)
      flag_values(["benchmark", "--timed_steps=4"])


if __name__ == "__main__":
  tf.test.main()
