"""This process's memory, from the kernel's /proc/self/status (Linux; None elsewhere)."""

from __future__ import annotations

import re


def status_kb(field: str) -> int | None:
  """A "VmXXX:   1234 kB" field of /proc/self/status in kB (VmRSS, VmHWM, ...), or None."""
  try:
    with open("/proc/self/status") as f:
      match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
  except OSError:
    return None
  return int(match.group(1)) if match else None


def resident_memory_mb() -> float | None:
  """This process's resident set size (VmRSS) in MB; None off Linux.

  Logged with every metrics.jsonl record, so that a long run (or the soak test) shows whether host
  memory grows; sampled by the benchmark for a step's peak.
  """
  kb = status_kb("VmRSS")
  return kb / 1024.0 if kb is not None else None
