"""Tests of tfmochi.checkpoints: listing a run's checkpoints, the random-init baseline network."""

import dataclasses
import json
import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from tfmochi import checkpoints
from tfmochi import config as config_lib
from tfmochi import distribute
from tfmochi import models
from tfmochi import trainer as trainer_lib


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
    with open(os.path.join(model_dir, checkpoints.CONFIG_FILE), "w") as f:
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
    with open(os.path.join(model_dir, checkpoints.CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(other_seed), f)
    other, _ = checkpoints.random_init_encoder(model_dir)
    kernel = [v for v in other.weights if "kernel" in v.path][0]
    self.assertNotAllClose(kernel.numpy(), initial[kernel.path])

  def test_needs_a_run_directory(self):
    with self.assertRaisesRegex(checkpoints.CheckpointError, "config.json"):
      checkpoints.random_init_encoder(self.create_tempdir().full_path)


class BuildRunEncoderTest(tf.test.TestCase):

  def test_fast_grad_follows_the_run_setting(self):
    def fast_convs(**kw):
      config = config_lib.TrainConfig(arch="resnet10_tiny", export_format="none", **kw)
      encoder = checkpoints.build_run_encoder(config, "query_encoder")
      convs = [l for l in encoder.backbone.layers if isinstance(l, keras.layers.Conv2D)]
      self.assertNotEmpty(convs)
      return {isinstance(l, models.Conv2D) for l in convs}

    self.assertEqual(fast_convs(), {True})  # auto on a host without GPU/TPU: on
    self.assertEqual(fast_convs(fast_grad="false"), {False})
    with mock.patch.object(distribute, "accelerator_visible", return_value=True):
      self.assertEqual(fast_convs(), {False})  # auto with a GPU/TPU: cuDNN's / XLA's kernels
      self.assertEqual(fast_convs(fast_grad="true"), {True})


if __name__ == "__main__":
  tf.test.main()
