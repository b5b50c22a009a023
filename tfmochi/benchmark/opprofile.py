"""Where a call's time goes, per TensorFlow op type, from TensorFlow's own profiler.

`profile_op_types(fn, calls)` traces `calls` calls of `fn` with `tf.profiler.experimental` and
reads the trace back through the profiler's "framework_op_stats" tool (the table TensorBoard's
profile plugin shows). What it reports is *thread* time: TensorFlow runs independent ops of a
graph on its inter-op threads at once, so per call the op types' times add up to about the number
of inter-op threads times the wall time, "IDLE" included (an inter-op thread with nothing to
run). Shares are therefore given of the busy thread time, which is what a kernel change can win.

The trace-to-table converter is the profiler's Python binding (`_pywrap_profiler_plugin`), not
a public API; where a TensorFlow build lacks it, `OpProfileUnavailable` says so, and the
timings of the benchmark that asked are still reported.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import tempfile
from typing import Callable

import tensorflow as tf

from tfmochi.benchmark import timing


class OpProfileUnavailable(RuntimeError):
  """This TensorFlow build cannot turn a profiler trace into per-op statistics."""


def _converter():
  try:
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise OpProfileUnavailable(
        f"TensorFlow {tf.__version__} has no profiler trace converter ({e}); profile with "
        "TensorBoard's profile plugin instead.") from e
  return _pywrap_profiler_plugin.xspace_to_tools_data


def op_stats_rows(xplane_paths: list[str]) -> list[dict]:
  """The "framework_op_stats" table of profiler traces: one dict per op (type, operation,
  occurrences, total_self_time in microseconds, ...)."""
  data, ok = _converter()(xplane_paths, "framework_op_stats", {})
  if not ok:
    raise OpProfileUnavailable(f"the profiler could not convert {xplane_paths}: {data!r}")
  table = json.loads(data)
  table = table[0] if isinstance(table, list) else table
  columns = [c["id"] for c in table["cols"]]
  return [{k: (cell or {}).get("v") for k, cell in zip(columns, row["c"])}
          for row in table["rows"]]


def summarize_rows(rows: list[dict], calls: int, top: int = 20) -> dict:
  """Per op type: self time per call (ms) and share of the busy thread time, largest first.

  Returns {"calls", "busy_thread_ms_per_call", "idle_thread_ms_per_call",
  "op_types": [{"type", "ms_per_call", "share"}...] (at most `top`, then "other")}.
  """
  by_type = collections.Counter()
  for row in rows:
    by_type[row["type"]] += float(row["total_self_time"] or 0.0) / 1e3 / calls
  idle = by_type.pop("IDLE", 0.0)
  busy = sum(by_type.values())
  ranked = by_type.most_common()
  op_types = [{"type": name, "ms_per_call": round(ms, 2), "share": round(ms / busy, 4)}
              for name, ms in ranked[:top]]
  rest = sum(ms for _, ms in ranked[top:])
  if rest:
    op_types.append({"type": "other", "ms_per_call": round(rest, 2),
                     "share": round(rest / busy, 4)})
  return {"calls": calls, "busy_thread_ms_per_call": round(busy, 2),
          "idle_thread_ms_per_call": round(idle, 2), "op_types": op_types}


def profile_op_types(fn: Callable[[], object], calls: int, logdir: str | None = None,
                     top: int = 20) -> dict:
  """Traces `calls` calls of `fn` (already warmed up: traced and compiled) and summarizes them.

  Args:
    fn: a callable returning tensors (fetched to wait for the work).
    calls: calls to trace (>= 1).
    logdir: where the trace is written (None: a temporary directory, removed afterwards).
    top: op types listed by name; the rest are summed as "other".

  Returns:
    `summarize_rows`'s dict.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}.")
  _converter()  # fail before tracing when the converter is missing
  with tempfile.TemporaryDirectory() as tmp:
    logdir = logdir or tmp
    tf.profiler.experimental.start(logdir)
    try:
      for _ in range(calls):
        timing.fetch_tensors(fn())
    finally:
      tf.profiler.experimental.stop()
    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
      raise OpProfileUnavailable(f"the profiler wrote no trace under {logdir}")
    return summarize_rows(op_stats_rows(paths[-1:]), calls, top)
