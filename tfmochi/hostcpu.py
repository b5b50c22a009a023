"""What the host CPU offers: its /proc/cpuinfo fields and whether it has bfloat16 matrix units.

Read by the trainer (a bfloat16 run on a CPU that would emulate bfloat16 is warned about) and by
the benchmark (every figure names the CPU it was measured on).
"""

from __future__ import annotations

# Instructions that multiply bfloat16 in hardware: x86's AVX512-BF16 dot products and Intel's AMX
# tiles, Arm's BF16 extension. Without them TensorFlow's CPU kernels convert to float32 and back.
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpuinfo(path: str = "/proc/cpuinfo") -> dict:
  """The first processor's fields of /proc/cpuinfo: {"model name": ..., "flags": ..., ...}
  (empty where the file is missing, as on macOS)."""
  fields = {}
  try:
    with open(path) as f:
      for line in f:
        if not line.strip():
          break  # end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def cpu_flags(info: dict) -> set[str]:
  """The instruction-set flags of `cpuinfo(...)`: x86's "flags", Arm's "Features"."""
  return set((info.get("flags") or info.get("Features") or "").split())


def has_bfloat16_units(path: str = "/proc/cpuinfo") -> bool | None:
  """Whether the CPU multiplies bfloat16 in hardware (BFLOAT16_FLAGS); None where unknown."""
  flags = cpu_flags(cpuinfo(path))
  if not flags:
    return None
  return any(flag in flags for flag in BFLOAT16_FLAGS)
