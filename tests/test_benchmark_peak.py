"""Tests of tfmochi.benchmark.peak."""

import numpy as np
import tensorflow as tf

from tfmochi.benchmark import peak


class PeakMemoryTest(tf.test.TestCase):

  def test_peak_memory_sees_a_transient_allocation(self):
    with peak.PeakMemory() as mem:
      block = np.ones(64 * 1024 * 1024 // 8)  # 64 MB, written so it is resident
      del block
    self.assertGreater(mem.increase_mb, 40)


if __name__ == "__main__":
  tf.test.main()
