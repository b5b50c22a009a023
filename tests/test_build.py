"""Tests of tfmochi.build: a run's encoders, its training state, the random-init baseline, restore."""

import dataclasses
import json
import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from tfmochi import build
from tfmochi import config as config_lib
from tfmochi import distribute
from tfmochi import models
from tfmochi import rundir
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
    with open(os.path.join(model_dir, rundir.CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(config), f)
    tf.random.uniform([3])  # global random state moved on: the rebuild must not depend on it
    np.random.seed(123)
    encoder, restored = build.random_init_encoder(model_dir)
    self.assertEqual(restored.seed, 7)
    rebuilt = {v.path: v.numpy() for v in encoder.weights}
    self.assertEqual(set(rebuilt), set(initial))
    for path, value in initial.items():
      self.assertAllEqual(rebuilt[path], value, msg=path)
    # A different run seed gives a different network.
    other_seed = dataclasses.replace(config, seed=8)
    with open(os.path.join(model_dir, rundir.CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(other_seed), f)
    other, _ = build.random_init_encoder(model_dir)
    kernel = [v for v in other.weights if "kernel" in v.path][0]
    self.assertNotAllClose(kernel.numpy(), initial[kernel.path])

  def test_needs_a_run_directory(self):
    with self.assertRaisesRegex(rundir.CheckpointError, "config.json"):
      build.random_init_encoder(self.create_tempdir().full_path)


class BuildRunEncoderTest(tf.test.TestCase):

  def test_fast_grad_follows_the_run_setting(self):
    def fast_convs(**kw):
      config = config_lib.TrainConfig(arch="resnet10_tiny", export_format="none", **kw)
      encoder = build.build_run_encoder(config, "query_encoder")
      convs = [l for l in encoder.backbone.layers if isinstance(l, keras.layers.Conv2D)]
      self.assertNotEmpty(convs)
      return {isinstance(l, models.Conv2D) for l in convs}

    self.assertEqual(fast_convs(), {True})  # auto on a host without GPU/TPU: on
    self.assertEqual(fast_convs(fast_grad="false"), {False})
    with mock.patch.object(distribute, "accelerator_visible", return_value=True):
      self.assertEqual(fast_convs(), {False})  # auto with a GPU/TPU: cuDNN's / XLA's kernels
      self.assertEqual(fast_convs(fast_grad="true"), {True})


class TrainStateTest(tf.test.TestCase):

  def test_one_step_and_the_checkpoint_layout(self):
    config = config_lib.TrainConfig(**_TINY)
    state = build.build_train_state(config, tf.distribute.get_strategy(),
                                    config.moco_config(10, 100), 0.03)
    self.assertFalse(state.float16)
    self.assertFalse(state.skip_nonfinite)
    batch = {"view1": tf.random.uniform([8, 8, 8, 3]), "view2": tf.random.uniform([8, 8, 8, 3]),
             "id": tf.range(8, dtype=tf.int64), "label": tf.fill([8], tf.constant(-1, tf.int64))}
    before = [v.numpy() for v in state.moco.query_encoder.trainable_variables]
    metrics = state.replica_step(batch)
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    after = [v.numpy() for v in state.moco.query_encoder.trainable_variables]
    self.assertFalse(all(np.array_equal(a, b) for a, b in zip(before, after)))
    # The node names old runs resume from.
    names = {name.split("/")[0] for name, _ in tf.train.list_variables(
        state.checkpoint().write(os.path.join(self.create_tempdir().full_path, "ckpt")))}
    self.assertContainsSubset({"step", "skipped", "scale_skipped", "query_encoder",
                               "key_encoder", "queue", "optimizer", "loss_scale"}, names)

  def test_precision_policy(self):
    self.addCleanup(keras.mixed_precision.set_global_policy, "float32")
    self.addCleanup(tf.config.experimental.enable_tensor_float_32_execution, True)
    build.set_precision("bfloat16", tf32=False)
    self.assertEqual(keras.mixed_precision.global_policy().name, "mixed_bfloat16")
    self.assertFalse(tf.config.experimental.tensor_float_32_execution_enabled())


class RestoreRunEncoderTest(tf.test.TestCase):

  def _run(self):
    """A run directory with query-encoder checkpoints at steps 2 and 4."""
    config = config_lib.TrainConfig(**_TINY, model_dir=self.create_tempdir().full_path)
    run_dir = rundir.RunDir(config.model_dir)
    run_dir.write(rundir.CONFIG_FILE, dataclasses.asdict(config))
    encoder = build.build_run_encoder(config, "query_encoder")
    step = tf.Variable(0, dtype=tf.int64)
    manager = run_dir.checkpoint_manager(tf.train.Checkpoint(step=step, query_encoder=encoder), 3)
    for n in (2, 4):
      step.assign(n)
      manager.save(checkpoint_number=n)
    return run_dir

  def test_newest_a_given_one_and_the_fallback(self):
    run_dir = self._run()
    _, config, step, path = build.restore_run_encoder(run_dir.path)
    self.assertEqual((config.arch, step, rundir.checkpoint_step(path)), ("resnet10_tiny", 4, 4))
    older = run_dir.list_checkpoints()[1]
    self.assertEqual(build.restore_run_encoder(run_dir.path, older)[2:], (2, older))
    self.assertLen(build.restore_encoder(run_dir.path), 3)
    for name in tf.io.gfile.listdir(run_dir.checkpoint_dir):
      if name.startswith("ckpt-4.data"):
        with open(os.path.join(run_dir.checkpoint_dir, name), "r+b") as f:
          f.truncate(10)  # a half-written file
    with self.assertLogs(level="WARNING"):
      self.assertEqual(build.restore_run_encoder(run_dir.path)[2], 2)

  def test_no_checkpoint_yet(self):
    config = config_lib.TrainConfig(**_TINY, model_dir=self.create_tempdir().full_path)
    rundir.RunDir(config.model_dir).write(rundir.CONFIG_FILE, dataclasses.asdict(config))
    with self.assertRaisesRegex(rundir.CheckpointError, "has no checkpoint yet"):
      build.restore_run_encoder(config.model_dir)


if __name__ == "__main__":
  tf.test.main()
