"""The machine a benchmark figure was measured on: CPU, ISA flags, versions, threads, GEMM peak.

A figure from a shared machine means little without the machine's state beside it, so every JSON
line carries `machine_info(...)`: the CPU model and family, the instruction sets that decide which
kernels the frameworks use (AVX2, AVX-512, AVX512-BF16, AMX), the framework versions, the thread
counts, and a float32 GEMM peak measured in the same process during the same run (what the other
jobs on the machine left of it at that moment).
"""

from __future__ import annotations

import importlib.metadata
import os
import time

from tfmochi import hostcpu

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
GEMM_SIZE = 2048


def cpu_description(path: str = "/proc/cpuinfo") -> dict:
  """{"cpu_model", "cpu_family", "cpu_model_number", "isa": {flag: present}} of this CPU."""
  info = hostcpu.cpuinfo(path)
  flags = hostcpu.cpu_flags(info)
  return {"cpu_model": info.get("model name"), "cpu_vendor": info.get("vendor_id"),
          "cpu_family": info.get("cpu family"), "cpu_model_number": info.get("model"),
          "isa": {flag: flag in flags for flag in ISA_FLAGS}}


def package_version(name: str) -> str | None:
  """The installed version of a distribution, without importing it (None: not installed)."""
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def schedulable_cpus() -> int:
  """CPUs this process may run on: what TensorFlow sizes its default thread pools by."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def gemm_gflops(library: str = "tensorflow", n: int = GEMM_SIZE, repeats: int = 5) -> float:
  """The best float32 [n, n] x [n, n] matmul rate of `library` ("tensorflow" or "torch") in
  GFLOP/s (2 n³ flops each), over `repeats` timed products after one untimed one."""
  if library == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    a = tf.random.stateless_normal([n, n], [1, 2])
    b = tf.random.stateless_normal([n, n], [3, 4])
    # One element to the host waits for the product without timing a 16 MB copy with it (which
    # cost TensorFlow ~10% of the rate that torch.mm, returning in place, was not charged).
    product = lambda: tf.matmul(a, b)[0, 0].numpy()  # noqa: E731
  elif library == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=generator) for _ in range(2))
    product = lambda: torch.mm(a, b)  # noqa: E731 (CPU: returns when done)
  else:
    raise ValueError(f"library must be tensorflow or torch, got {library!r}.")
  product()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best / 1e9


def machine_info(library: str = "tensorflow", gemm: dict | None = None) -> dict:
  """The machine, versions and threads of this process, as a JSON-able dict.

  Args:
    library: the framework this process times ("tensorflow" or "torch"): whose threads are given.
    gemm: float32 GEMM rates measured in this run, e.g. {"before": GFLOP/s, "after": GFLOP/s}.
  """
  try:
    load = [round(v, 2) for v in os.getloadavg()]
  except OSError:
    load = None
  out = {"cpus": os.cpu_count(), "schedulable_cpus": schedulable_cpus(), "loadavg": load,
         **cpu_description(), "tensorflow": package_version("tensorflow"),
         "keras": package_version("keras"), "torch": package_version("torch"), "library": library}
  if library == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    out["intra_op_threads"] = intra or schedulable_cpus()  # 0: TensorFlow's default
    out["inter_op_threads"] = inter or schedulable_cpus()
  else:
    import torch  # pylint: disable=g-import-not-at-top
    out["intra_op_threads"] = torch.get_num_threads()
    out["inter_op_threads"] = torch.get_num_interop_threads()
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
  if gemm is not None:
    out["gemm_f32_gflops"] = {k: round(v, 1) for k, v in gemm.items()}
    out["gemm_f32_peak_gflops"] = round(max(gemm.values()), 1)
    out["gemm_size"] = GEMM_SIZE
  return out
