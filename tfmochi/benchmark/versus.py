"""`--what=versus`: tfmochi's MoCo v2 step against the PyTorch peer, one process per variant.

Two frameworks in one process would share (and fight over) the cores with two sets of thread
pools, so each variant runs as its own `python -m tfmochi.benchmark` child: `--what=step` for
tfmochi (float32, and `--mixed_precision=bfloat16` for "tfmochi_bf16"), `--what=peer` for the
PyTorch step, all with the same training flags. Rounds alternate the variants (A B C A B C ...)
so that a change of load on a shared machine reaches all of them; each child's JSON line (its
timings, its machine and its own GEMM peak) is kept whole, and the summary gives every round's
images/s per variant and the ratios of the medians over rounds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

MOCHI_OFF = ("--mochi_num_hard=0", "--mochi_num_mix=0", "--mochi_num_query_mix=0")
VARIANTS = {
    "tfmochi": ("--what=step", "--nocompare_moco", *MOCHI_OFF),
    "tfmochi_bf16": ("--what=step", "--nocompare_moco", "--mixed_precision=bfloat16", *MOCHI_OFF),
    "peer": ("--what=peer", *MOCHI_OFF),
}
# The orchestrator's own flags, which the children must not inherit.
_OWN_FLAGS = ("--what", "--output", "--versus", "--rounds")


def child_command(argv: list[str], variant: str) -> list[str]:
  """The child's command line: the parent's flags (absl: the last value of a flag wins) without
  the orchestrator's own, then the variant's."""
  kept = [a for a in argv if not any(a == f or a.startswith(f + "=") for f in _OWN_FLAGS)]
  return [sys.executable, "-m", "tfmochi.benchmark", *kept, *VARIANTS[variant]]


def run_child(command: list[str], timeout: float) -> dict:
  """Runs one child and returns its JSON line (RuntimeError with its stderr if it failed)."""
  proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{' '.join(command[3:])} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def bench_versus(argv: list[str], variants: list[str], rounds: int, *,
                 timeout: float = 3600.0, log=None) -> dict:
  """Runs `rounds` rounds of the `variants` children, alternating, and summarises them.

  Args:
    argv: the parent's command-line flags (program name excluded).
    variants: names from VARIANTS, in the order each round runs them.
    rounds: rounds (>= 1).
    timeout: seconds allowed to one child.
    log: called with a line of progress per child (None: silent).

  Returns:
    {"what": "versus", "runs": [child results in run order, each with "variant" and "round"],
     "summary": {variant: {"images_per_sec": [per round], "median_images_per_sec",
     "gemm_f32_peak_gflops": [per round]}}, "ratio_*" of the medians}.
  """
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants or rounds < 1:
    raise ValueError(f"variants must be among {', '.join(VARIANTS)} and rounds >= 1; got "
                     f"{variants}, {rounds}.")
  runs = []
  for r in range(rounds):
    for variant in variants:
      result = run_child(child_command(argv, variant), timeout)
      result.update(variant=variant, round=r)
      runs.append(result)
      if log is not None:
        (child,) = result["variants"].values()
        log(f"round {r} {variant}: {child['images_per_sec']:.2f} images/s, GEMM peak "
            f"{result['machine'].get('gemm_f32_peak_gflops')} GFLOP/s")
  return {"what": "versus", "rounds": rounds, "runs": runs, **summarize(runs, variants)}


def summarize(runs: list[dict], variants: list[str]) -> dict:
  """Per variant: images/s and GEMM peak of every round and the median images/s; ratios."""
  summary = {}
  for variant in variants:
    mine = [r for r in runs if r["variant"] == variant]
    rates = [next(iter(r["variants"].values()))["images_per_sec"] for r in mine]
    summary[variant] = {"images_per_sec": rates, "median_images_per_sec": statistics.median(rates),
                        "gemm_f32_peak_gflops": [r["machine"].get("gemm_f32_peak_gflops")
                                                 for r in mine]}
  out = {"summary": summary}
  median = {v: s["median_images_per_sec"] for v, s in summary.items()}
  if "tfmochi" in median and "peer" in median:
    out["ratio_tfmochi_over_peer"] = median["tfmochi"] / median["peer"]
  if "tfmochi" in median and "tfmochi_bf16" in median:
    out["ratio_bf16_over_float32"] = median["tfmochi_bf16"] / median["tfmochi"]
  return out
