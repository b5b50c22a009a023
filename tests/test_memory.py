"""Tests of tfmochi.memory: this process's memory from /proc/self/status."""

from absl.testing import absltest

from tfmochi import memory


class MemoryTest(absltest.TestCase):

  def test_resident_memory_of_this_process(self):
    rss = memory.resident_memory_mb()
    self.assertGreater(rss, 10.0)  # Linux: VmRSS of this Python process
    self.assertGreaterEqual(memory.status_kb("VmHWM") / 1024.0, rss * 0.5)
    self.assertIsNone(memory.status_kb("NoSuchField"))


if __name__ == "__main__":
  absltest.main()
