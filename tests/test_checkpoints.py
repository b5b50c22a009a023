"""Tests of tfmochi.checkpoints: a run's encoder restored from a checkpoint, or as initialised."""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from tfmochi import build
from tfmochi import checkpoints
from tfmochi import config as config_lib
from tfmochi import rundir
from tfmochi import runfiles
from tfmochi import trainer as trainer_lib

_TINY = dict(arch="resnet10_tiny", small_stem=True, image_size=8, queue_size=64, batch_size=8,
             embedding_dim=8, export_format="none")


class RandomInitEncoderTest(tf.test.TestCase):

  def test_is_the_trainers_initial_query_encoder(self):
    # `evaluate --random_init` must measure the very network training starts from, so that
    # "pretraining beats random init" compares like with like.
    model_dir = self.create_tempdir().full_path
    config = config_lib.TrainConfig(
        dataset="quickstart", arch="resnet10_tiny", small_stem=True, image_size=16,
        model_dir=model_dir, queue_size=64, batch_size=16, export_format="none", seed=7)
    trainer = trainer_lib.Trainer(config)
    initial = {v.path: v.numpy() for v in trainer.moco.query_encoder.weights}
    with open(os.path.join(model_dir, runfiles.CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(config), f)
    tf.random.uniform([3])  # global random state moved on: the rebuild must not depend on it
    np.random.seed(123)
    encoder, restored = checkpoints.random_init_encoder(model_dir)
    self.assertEqual(restored.seed, 7)
    rebuilt = {v.path: v.numpy() for v in encoder.weights}
    self.assertEqual(set(rebuilt), set(initial))
    for path, value in initial.items():
      self.assertAllEqual(rebuilt[path], value, msg=path)
    # A different run seed gives a different network.
    other_seed = dataclasses.replace(config, seed=8)
    with open(os.path.join(model_dir, runfiles.CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(other_seed), f)
    other, _ = checkpoints.random_init_encoder(model_dir)
    kernel = [v for v in other.weights if "kernel" in v.path][0]
    self.assertNotAllClose(kernel.numpy(), initial[kernel.path])

  def test_needs_a_run_directory(self):
    with self.assertRaisesRegex(rundir.CheckpointError, "config.json"):
      checkpoints.random_init_encoder(self.create_tempdir().full_path)


class RestoreEncoderTest(tf.test.TestCase):

  def _run(self):
    """A run directory with query-encoder checkpoints at steps 2 and 4."""
    config = config_lib.TrainConfig(**_TINY, model_dir=self.create_tempdir().full_path)
    run_dir = rundir.RunDir(config.model_dir)
    run_dir.write(runfiles.CONFIG_FILE, dataclasses.asdict(config))
    encoder = build.build_run_encoder(config, "query_encoder")
    step = tf.Variable(0, dtype=tf.int64)
    manager = run_dir.checkpoint_manager(tf.train.Checkpoint(step=step, query_encoder=encoder), 3)
    for n in (2, 4):
      step.assign(n)
      manager.save(checkpoint_number=n)
    return run_dir

  def test_newest_a_given_one_and_the_fallback(self):
    run_dir = self._run()
    _, config, step, path = checkpoints.restore_encoder(run_dir.path)
    self.assertEqual((config.arch, step, rundir.checkpoint_step(path)), ("resnet10_tiny", 4, 4))
    older = run_dir.list_checkpoints()[1]
    self.assertEqual(checkpoints.restore_encoder(run_dir.path, older)[2:], (2, older))
    self.assertEqual(checkpoints.restore_encoder(run_dir.path).step, 4)
    for name in tf.io.gfile.listdir(run_dir.checkpoint_dir):
      if name.startswith("ckpt-4.data"):
        with open(os.path.join(run_dir.checkpoint_dir, name), "r+b") as f:
          f.truncate(10)  # a half-written file
    with self.assertLogs(level="WARNING"):
      self.assertEqual(checkpoints.restore_encoder(run_dir.path)[2], 2)

  def test_no_checkpoint_yet(self):
    config = config_lib.TrainConfig(**_TINY, model_dir=self.create_tempdir().full_path)
    rundir.RunDir(config.model_dir).write(runfiles.CONFIG_FILE, dataclasses.asdict(config))
    with self.assertRaisesRegex(rundir.CheckpointError, "has no checkpoint yet"):
      checkpoints.restore_encoder(config.model_dir)


if __name__ == "__main__":
  tf.test.main()
