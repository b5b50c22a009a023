"""Tests of the `python -m tfmochi.train` command: clear errors without tracebacks, exit codes."""

import os
import subprocess
import sys
import time

import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(args, timeout=120, env=None):
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "tfmochi.train"] + args, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=full_env)
  return proc, time.time() - start


class TrainCommandTest(tf.test.TestCase):

  def test_mochi_flagfile_without_imagenet_stops_with_instructions(self):
    tmp = self.create_tempdir().full_path
    proc, seconds = run_train(["--flagfile=configs/mochi.flags", f"--data_dir={tmp}/tfds",
                               f"--model_dir={tmp}/run"])
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn("ILSVRC2012_img_train.tar", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertLess(seconds, 60)  # seconds, not a download attempt or a device set-up
    self.assertFalse(os.path.exists(f"{tmp}/run/checkpoints"))

  def test_bad_flag_values(self):
    tmp = self.create_tempdir().full_path
    for args, message in (
        (["--queue_size=100"], "--queue_size (K) must be a multiple of the global batch size 64"),
        (["--dataset=imagenet3000"], "imagenet3000"),
        (["--mochi_num_hard=8", "--mochi_num_mix=4", "--mochi_beta_max=0.9"], "(0, 0.5]"),
    ):
      proc, _ = run_train(args + [f"--model_dir={tmp}/run"])
      self.assertEqual(proc.returncode, 2, args)
      self.assertIn(message, proc.stderr, args)
      self.assertNotIn("Traceback", proc.stderr, args)

  def test_unwritable_model_dir(self):
    tmp = self.create_tempdir().full_path
    blocker = os.path.join(tmp, "file")
    open(blocker, "w").close()  # a file where a directory should be: not writable as a dir
    proc, _ = run_train([f"--model_dir={blocker}/run", "--train_steps=1"])
    self.assertEqual(proc.returncode, 2)
    self.assertIn("is not writable", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)

  def test_help_lists_the_flags(self):
    proc = subprocess.run([sys.executable, "-m", "tfmochi.train", "--helpfull"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    for flag in ("--mochi_num_hard", "--bn_mode", "--label_mode", "--knn_every_epochs"):
      self.assertIn(flag, proc.stdout)


if __name__ == "__main__":
  tf.test.main()
