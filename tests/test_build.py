"""Tests of tfmochi.build: a run's encoders and its training state."""

import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

import testdata  # tests/testdata.py

from tfmochi import build
from tfmochi import config as config_lib
from tfmochi import distribute
from tfmochi import models
from tfmochi import objective as objective_lib

_TINY = dict(arch="resnet10_tiny", small_stem=True, image_size=8, queue_size=64, batch_size=8,
             embedding_dim=8, export_format="none")


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
                                    config.moco_for_run(10, 100), 0.03)
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


class Float32MatmulsTest(tf.test.TestCase):
  """--tf32: what float32 products compute with, per device, and what XLA is told."""

  def test_resolves_per_device(self):
    cases = {(False, "TPU"): "float32", (True, "TPU"): "bfloat16",
             (False, "GPU"): "float32", (True, "GPU"): "tf32",
             (False, "CPU"): "float32", (True, "CPU"): "float32"}
    for (tf32, device), expected in cases.items():
      self.assertEqual(build.float32_matmuls(tf32, "bfloat16", device, (8, 0)), expected)
    self.assertEqual(build.float32_matmuls(True, "float32", "GPU", (7, 0)), "float32")  # V100
    self.assertEqual(build.training_device(tf.distribute.get_strategy()), ("CPU", None))

  def test_a_float32_run_on_a_tpu_is_warned_about(self):
    with self.assertLogs(level="WARNING") as logs:
      self.assertEqual(build.float32_matmuls(False, "float32", "TPU"), "float32")
    self.assertIn("HIGHEST", "".join(logs.output))
    with mock.patch.object(build.logging, "warning") as warning:
      build.float32_matmuls(False, "bfloat16", "TPU")  # configs/tpu.flags: head + logits only
      build.float32_matmuls(True, "float32", "TPU")
      warning.assert_not_called()

  def test_bfloat16_on_a_cpu_without_bfloat16_units_is_warned_about(self):
    with self.assertLogs(level="WARNING") as logs:
      self.assertTrue(build.warn_emulated_bfloat16("bfloat16", "CPU", False))
    self.assertIn("--mixed_precision=float32", "".join(logs.output))
    with mock.patch.object(build.logging, "warning") as warning:
      for precision, device, units in [("bfloat16", "CPU", True), ("bfloat16", "CPU", None),
                                       ("bfloat16", "TPU", False), ("bfloat16", "GPU", False),
                                       ("float32", "CPU", False), ("float16", "GPU", False)]:
        self.assertFalse(build.warn_emulated_bfloat16(precision, device, units))
      warning.assert_not_called()

  @testdata.needs_host_xla
  def test_tf32_off_compiles_the_logits_at_highest_precision(self):
    """The objective's q·Qᵀ as XLA compiles it (a TPU compiles the step with the same lowering):
    off, every float32 dot carries operand_precision=highest; on, the default precision."""
    self.addCleanup(keras.mixed_precision.set_global_policy, "float32")
    self.addCleanup(tf.config.experimental.enable_tensor_float_32_execution, True)
    q, queue = tf.math.l2_normalize(tf.random.normal([4, 8]), -1), tf.random.normal([32, 8])
    config = objective_lib.ObjectiveConfig(temperature=0.2)

    def f32_dots(tf32):
      build.set_precision("bfloat16", tf32=tf32)
      loss = tf.function(lambda q, k, queue: objective_lib.contrastive_objective(
          q, k, queue, config, jit_compile=None).loss, jit_compile=True)
      hlo = loss.experimental_get_compiler_ir(q, q, queue)(stage="hlo")
      return [line for line in hlo.splitlines() if " dot(f32[" in line]

    self.assertNotEmpty(f32_dots(False))
    self.assertTrue(all("operand_precision={highest,highest}" in d for d in f32_dots(False)))
    self.assertFalse(any("operand_precision" in d for d in f32_dots(True)))


if __name__ == "__main__":
  tf.test.main()
