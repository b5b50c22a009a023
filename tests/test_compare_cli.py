"""Tests of tfmochi.compare.cli: the driver imports no TensorFlow, and bad flags end in one line."""

import os
import subprocess
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


class CliTest(absltest.TestCase):

  def test_the_driver_imports_no_tensorflow(self):
    proc = _python("-c", "import sys; import tfmochi.compare.cli; "
                   "sys.exit('tensorflow' in sys.modules)")
    self.assertEqual(proc.returncode, 0, proc.stderr)

  def test_a_missing_base_flagfile_is_one_error_line(self):
    proc = _python("-m", "tfmochi.compare", "--output_dir=/tmp/unused")
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertEqual(proc.stderr.strip().splitlines(),
                     ["tfmochi.compare: error: --base_flagfile must name an existing "
                      "tfmochi.train flag file, got None (e.g. configs/compare_digits.flags)."])


if __name__ == "__main__":
  absltest.main()
