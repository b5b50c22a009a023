"""Tests of tfmochi.schedules against MoCo's `adjust_learning_rate` (docs/ALGORITHMS.md §10, E1)."""

import math

import tensorflow as tf

from tfmochi import schedules


class ScheduleTest(tf.test.TestCase):

  def test_e1_cosine_per_epoch(self):
    sched = schedules.WarmupCosine(0.03, total_steps=200 * 10, steps_per_epoch=10)
    self.assertAllClose(sched(0), 0.03)
    self.assertAllClose(sched(100 * 10 + 7), 0.015)  # constant within epoch 100
    self.assertAllClose(sched(199 * 10), 1.85e-6, atol=1e-8)

  def test_per_step_and_warmup(self):
    sched = schedules.WarmupCosine(1.0, total_steps=110, warmup_steps=10)
    self.assertAllClose(sched(0), 0.1)
    self.assertAllClose(sched(9), 1.0)
    self.assertAllClose(sched(10), 1.0)
    self.assertAllClose(sched(60), 0.5)
    self.assertAllClose(sched(110), 0.0)
    self.assertAllClose(sched(35), 0.5 * (1 + math.cos(math.pi * 0.25)))

  def test_linear_scaling(self):
    self.assertAllClose(schedules.scaled_learning_rate(0.03, 128), 0.015)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "total_steps"):
      schedules.WarmupCosine(0.1, 0)
    with self.assertRaisesRegex(ValueError, "warmup_steps"):
      schedules.WarmupCosine(0.1, 10, warmup_steps=10)


if __name__ == "__main__":
  tf.test.main()
