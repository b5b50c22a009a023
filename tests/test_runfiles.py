"""Tests of tfmochi.runfiles: reading run files without TensorFlow, the local whole-file writer."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

from tfmochi import runfiles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunFilesTest(absltest.TestCase):

  def test_write_local_then_read(self):
    directory = self.create_tempdir().full_path
    path = os.path.join(directory, runfiles.SUMMARY_FILE)
    runfiles.write_local(path, json.dumps({"global_step": 6}))
    runfiles.write_local(path, b'{"global_step": 8}')  # replaces the file whole
    self.assertEqual(runfiles.read_json(path), {"global_step": 8})
    self.assertEqual(runfiles.read_json("file://" + path), {"global_step": 8})
    self.assertEqual(os.listdir(directory), [runfiles.SUMMARY_FILE])  # no temporary file left

  def test_absent_or_damaged_files_read_as_none(self):
    directory = self.create_tempdir().full_path
    self.assertIsNone(runfiles.read_json(os.path.join(directory, "absent.json")))
    self.assertIsNone(runfiles.read_text(os.path.join(directory, "absent.json")))
    damaged = os.path.join(directory, "cut.json")
    runfiles.write_local(damaged, '{"global_step": ')  # a file cut by a kill
    self.assertIsNone(runfiles.read_json(damaged))

  def test_a_scheme_is_read_through_tensorflow_only_then(self):
    script = ("import sys; from tfmochi import runfiles; "
              "assert runfiles.read_json('/nonexistent/summary.json') is None; "
              "assert 'tensorflow' not in sys.modules; "
              "import tensorflow as tf; "
              "tf.io.gfile.GFile('ram://r/s.json', 'w').write('{\"a\": 1}'); "
              "assert runfiles.read_json('ram://r/s.json') == {'a': 1}; "
              "assert runfiles.read_json('ram://r/absent.json') is None")
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertFalse(runfiles.is_local("gs://bucket/run"))
    self.assertTrue(runfiles.is_local("file:///tmp/run"))


if __name__ == "__main__":
  absltest.main()
