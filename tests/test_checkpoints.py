"""Tests of tfmochi.checkpoints: listing a run's checkpoints from absolute and relative dirs."""

import os

import tensorflow as tf

from tfmochi import checkpoints


class ListCheckpointsTest(tf.test.TestCase):

  def _run_dir(self):
    root = self.create_tempdir().full_path
    step = tf.Variable(0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step),
                                         checkpoints.checkpoint_dir(os.path.join(root, "run")),
                                         max_to_keep=3)
    for n in (2, 4):
      manager.save(checkpoint_number=n)
    return root

  def test_absolute_model_dir(self):
    root = self._run_dir()
    got = checkpoints.list_checkpoints(os.path.join(root, "run"))
    self.assertEqual([checkpoints.checkpoint_step(p) for p in got], [4, 2])
    self.assertTrue(all(os.path.exists(p + ".index") for p in got))

  def test_relative_model_dir(self):
    # The quickstart's --model_dir=runs/quickstart is relative: its checkpoints (and so resume,
    # evaluate, export, analyze) must be found, not joined to the directory a second time.
    root = self._run_dir()
    cwd = os.getcwd()
    os.chdir(root)
    try:
      got = checkpoints.list_checkpoints("run")
    finally:
      os.chdir(cwd)
    self.assertEqual(got, [os.path.join("run", "checkpoints", "ckpt-4"),
                           os.path.join("run", "checkpoints", "ckpt-2")])


if __name__ == "__main__":
  tf.test.main()
