"""Peak memory of a block of code: resident set size and TensorFlow's allocator (`PeakMemory`)."""

from __future__ import annotations

import ctypes
import threading

from tfmochi import memory

_MB = 1024.0 * 1024.0


def current_rss_mb() -> float:
  """Resident set size of this process in MB (0 where /proc is missing)."""
  return memory.resident_memory_mb() or 0.0


def _release_free_heap() -> None:
  """Returns freed malloc memory to the OS (glibc), so a phase's start RSS is not inflated by the
  previous phase's freed buffers. A no-op where malloc_trim does not exist."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _reset_peak() -> bool:
  """Resets the kernel's RSS high-water mark (VmHWM) of this process; False if not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _tf_allocator_mb(reset: bool = False) -> tuple[float, float] | None:
  """(current, peak) MB of TensorFlow's CPU allocator (tensors and XLA buffers), optionally
  resetting the peak first; None where the runtime does not keep these statistics."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if reset:
      tf.config.experimental.reset_memory_stats("CPU:0")
    info = tf.config.experimental.get_memory_info("CPU:0")
  except (ValueError, RuntimeError, tf.errors.OpError):
    return None
  return info["current"] / _MB, info["peak"] / _MB


class PeakMemory:
  """Peak memory of a code block: `with PeakMemory() as m: ...; m.peak_mb, m.increase_mb`.

  Resident set size: two sources, the larger wins: the kernel's VmHWM (exact, when it can be reset
  at the start) and a background thread reading VmRSS every `interval` seconds (TensorFlow releases
  the GIL while it computes, so the thread keeps sampling). TensorFlow's CPU allocator keeps the
  memory it has used in a pool, so once a computation has run, repeating it barely moves the RSS;
  the allocator's own peak (`tf_peak_mb`, `tf_increase_mb`: tensors and XLA buffers allocated
  during the block) is what tells two computations' transient memory apart.
  """

  def __init__(self, interval: float = 0.005, tensorflow: bool = True):
    self.interval = interval
    self.tensorflow = tensorflow  # False: a process that must not start TensorFlow's runtime
    self.start_mb = 0.0
    self.peak_mb = 0.0
    self.tf_start_mb = 0.0
    self.tf_peak_mb = 0.0
    self._stop = threading.Event()
    self._thread = None
    self._hwm_valid = False

  @property
  def increase_mb(self) -> float:
    return max(0.0, self.peak_mb - self.start_mb)

  @property
  def tf_increase_mb(self) -> float:
    return max(0.0, self.tf_peak_mb - self.tf_start_mb)

  def _sample(self):
    while not self._stop.is_set():
      self.peak_mb = max(self.peak_mb, current_rss_mb())
      self._stop.wait(self.interval)

  def __enter__(self) -> "PeakMemory":
    _release_free_heap()
    self._hwm_valid = _reset_peak()
    self.start_mb = self.peak_mb = current_rss_mb()
    self.tf_start_mb, self.tf_peak_mb = (
        _tf_allocator_mb(reset=True) if self.tensorflow else None) or (0.0, 0.0)
    self._stop.clear()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_mb = max(self.peak_mb, current_rss_mb())
    if self._hwm_valid:
      hwm = memory.status_kb("VmHWM")
      if hwm is not None:
        self.peak_mb = max(self.peak_mb, hwm / 1024.0)
    allocator = _tf_allocator_mb() if self.tensorflow else None
    if allocator is not None:
      self.tf_peak_mb = allocator[1]
