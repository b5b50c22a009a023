"""Learning-rate schedules as pure functions of the step (MoCo v2's cosine, optional warm-up)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def scaled_learning_rate(lr_per_256: float, global_batch_size: int) -> float:
  """Linear scaling rule: lr = lr_per_256 · batch / 256 (MoCo: 0.03 at 256, 0.015 at 128)."""
  return lr_per_256 * global_batch_size / 256.0


@keras.saving.register_keras_serializable(package="tfmochi")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up then cosine decay to 0, MoCo v2's `--cos` schedule.

  lr(t) = base·t/W for t < W; then base·0.5·(1 + cos(π·(e − W_e)/(E − W_e))). With
  `steps_per_epoch` set, the cosine argument is quantised to whole epochs exactly as MoCo's
  `adjust_learning_rate` (lr is set once per epoch: epoch 100 of 200 gives base/2); without it
  the decay is per step.

  Args:
    base_lr: the peak learning rate.
    total_steps: the number of training steps.
    warmup_steps: linear warm-up steps (0 = none, MoCo's default).
    steps_per_epoch: quantise the cosine to epochs when given.
  """

  def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0,
               steps_per_epoch: int | None = None):
    if total_steps <= 0:
      raise ValueError(f"total_steps must be > 0, got {total_steps}.")
    if not 0 <= warmup_steps < total_steps:
      raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}.")
    self.base_lr = float(base_lr)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else None

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = float(self.warmup_steps)
    total = float(self.total_steps)
    if self.steps_per_epoch:
      spe = float(self.steps_per_epoch)
      progress = (tf.floor(step / spe) * spe - warm) / (total - warm)
    else:
      progress = (step - warm) / (total - warm)
    progress = tf.clip_by_value(progress, 0.0, 1.0)
    cosine = self.base_lr * 0.5 * (1.0 + tf.cos(math.pi * progress))
    if self.warmup_steps:
      return tf.where(step < warm, self.base_lr * (step + 1.0) / warm, cosine)
    return cosine

  def get_config(self):
    return dict(base_lr=self.base_lr, total_steps=self.total_steps,
                warmup_steps=self.warmup_steps, steps_per_epoch=self.steps_per_epoch)
