"""Timing of benchmark variants: interleaved calls, medians, memory per call."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

from tfmochi.benchmark.peak import PeakMemory


@dataclasses.dataclass
class VariantResult:
  """Timings and memory of one benchmarked variant.

  Attributes:
    seconds_per_step: [timed calls] wall seconds per step of each timed call.
    peak_rss_mb: [timed calls] peak RSS during each timed call.
    rss_increase_mb: [timed calls] that peak minus the RSS at the start of the call.
    tf_peak_mb: [timed calls] peak of TensorFlow's CPU allocator during each timed call.
    tf_increase_mb: [timed calls] that peak minus the allocator's use at the start of the call.
  """
  seconds_per_step: list[float] = dataclasses.field(default_factory=list)
  peak_rss_mb: list[float] = dataclasses.field(default_factory=list)
  rss_increase_mb: list[float] = dataclasses.field(default_factory=list)
  tf_peak_mb: list[float] = dataclasses.field(default_factory=list)
  tf_increase_mb: list[float] = dataclasses.field(default_factory=list)

  def summary(self, images_per_step: int) -> dict:
    median = statistics.median(self.seconds_per_step)
    return {
        "median_seconds_per_step": median,
        "images_per_sec": images_per_step / median,
        "seconds_per_step": self.seconds_per_step,
        "peak_rss_mb": max(self.peak_rss_mb),
        "rss_increase_mb": max(self.rss_increase_mb),
        "tf_peak_mb": max(self.tf_peak_mb),
        "tf_increase_mb": max(self.tf_increase_mb),
    }


def fetch_tensors(out) -> None:
  """Waits for a TensorFlow call: fetches every tensor of its (nested) result."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for t in tf.nest.flatten(out):
    if hasattr(t, "numpy"):
      t.numpy()


def run_interleaved(variants: dict[str, Callable[[], object]], *, warmup: int, timed: int,
                    steps_per_call: int = 1, finish: Callable[[object], None] | None = None,
                    tensorflow_memory: bool = True) -> dict[str, VariantResult]:
  """Times callables call by call in turn: A B A B ... after `warmup` untimed calls of each.

  Args:
    variants: name -> a callable running `steps_per_call` steps and returning something whose
      tensors are fetched (`.numpy()`) to wait for the work to finish.
    warmup: untimed calls per variant (first: tracing and compilation).
    timed: timed calls per variant.
    steps_per_call: steps each call runs (the per-step time is the call time divided by it).
    finish: waits for a call's result (None: fetches its TensorFlow tensors).
    tensorflow_memory: also track TensorFlow's allocator (False in a process without TensorFlow).

  Returns:
    name -> VariantResult.
  """
  if finish is None:
    finish = fetch_tensors

  for fn in variants.values():
    for _ in range(warmup):
      finish(fn())
  results = {name: VariantResult() for name in variants}
  for _ in range(timed):
    for name, fn in variants.items():
      with PeakMemory(tensorflow=tensorflow_memory) as mem:
        start = time.perf_counter()
        finish(fn())
        elapsed = time.perf_counter() - start
      res = results[name]
      res.seconds_per_step.append(elapsed / steps_per_call)
      res.peak_rss_mb.append(mem.peak_mb)
      res.rss_increase_mb.append(mem.increase_mb)
      res.tf_peak_mb.append(mem.tf_peak_mb)
      res.tf_increase_mb.append(mem.tf_increase_mb)
  return results


def summarize(results: dict, images_per_step: int) -> dict:
  out = {"variants": {k: v.summary(images_per_step) for k, v in results.items()}}
  if "moco" in results and "mochi" in results:
    moco, mochi = out["variants"]["moco"], out["variants"]["mochi"]
    out["ratio_mochi_over_moco"] = (mochi["median_seconds_per_step"]
                                    / moco["median_seconds_per_step"])
    out["rss_increase_mochi_minus_moco_mb"] = mochi["rss_increase_mb"] - moco["rss_increase_mb"]
    out["tf_increase_mochi_minus_moco_mb"] = mochi["tf_increase_mb"] - moco["tf_increase_mb"]
  for name in results:
    for suffix, ratio in (("_keras_conv", "ratio_keras_conv_over_fast"),
                          ("_jit", "ratio_jit_over_plain")):
      if name.endswith(suffix) and name[:-len(suffix)] in results:
        base = out["variants"][name[:-len(suffix)]]["median_seconds_per_step"]
        out[ratio] = out["variants"][name]["median_seconds_per_step"] / base
  if "mochi_xla_exact" in results and "mochi_xla_approx" in results:
    v = out["variants"]
    out["ratio_xla_approx_over_exact"] = (v["mochi_xla_approx"]["median_seconds_per_step"]
                                          / v["mochi_xla_exact"]["median_seconds_per_step"])
  return out
