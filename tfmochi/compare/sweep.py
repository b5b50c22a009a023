"""One comparison sweep: train every (variant, seed) in its own process, evaluate it in another,
and rewrite the results after every run (`run_sweep`).

Each (variant, seed) is one `python -m tfmochi.train` process, `--flagfile=BASE` followed by the
variant's flags (`tfmochi.compare.variants`), the sweep's overrides (`--train_steps`/`--epochs`,
`--strategy`, `--train_flags`) and `--seed=k --model_dir=OUTPUT/runs/<variant>/seed<k>`; then one
`python -m tfmochi.compare.eval` process measures it. Separate processes isolate the runs: a
crash or a failing variant is reported (exit status and the log's last line) and the sweep goes
on. This module imports no TensorFlow: it starts processes and reads the files they write
(`tfmochi.runfiles`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shlex
import subprocess
import sys
import time

from tfmochi import runfiles
from tfmochi.compare import report
from tfmochi.compare import variants as variants_lib


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What `run_sweep` does (the command's flags)."""
  base_flagfile: str
  variants: tuple  # of variants_lib.Variant
  seeds: tuple[int, ...]
  output_dir: str
  train_steps: int | None = None
  epochs: float | None = None
  strategy: str = "default"
  cpu_replicas: int = 1
  tpu: str | None = None
  train_flags: tuple[str, ...] = ()
  linear_epochs: int | None = None
  linear_cache_features: bool = True
  num_queries: int = 512
  python: str = sys.executable


def run_dir(config: SweepConfig, variant: str, seed: int) -> str:
  return os.path.join(config.output_dir, "runs", variant, f"seed{seed}")


def train_command(config: SweepConfig, variant, seed: int) -> list[str]:
  """The `tfmochi.train` command of one run; later flags win, so seed and model_dir come last."""
  overrides = []
  if config.train_steps:
    overrides.append(f"--train_steps={config.train_steps}")
  if config.epochs:
    overrides.append(f"--epochs={config.epochs}")
  overrides.append(f"--strategy={config.strategy}")
  if config.strategy == "mirrored":
    overrides.append(f"--cpu_replicas={config.cpu_replicas}")
  if config.tpu:
    overrides.append(f"--tpu={config.tpu}")
  return [config.python, "-m", "tfmochi.train", f"--flagfile={config.base_flagfile}",
          *variant.flags, *overrides, *config.train_flags, f"--seed={seed}",
          f"--model_dir={run_dir(config, variant.name, seed)}"]


def eval_command(config: SweepConfig, model_dir: str) -> list[str]:
  strategy = "default" if config.strategy == "multi_worker" else config.strategy
  command = [config.python, "-m", "tfmochi.compare.eval", f"--model_dir={model_dir}",
             f"--strategy={strategy}", f"--cpu_replicas={config.cpu_replicas}",
             f"--num_queries={config.num_queries}"]
  if config.tpu:
    command.append(f"--tpu={config.tpu}")
  if config.linear_epochs:
    command.append(f"--linear_epochs={config.linear_epochs}")
  if not config.linear_cache_features:
    command.append("--nolinear_cache_features")
  return command


def is_chief() -> bool:
  """Whether this process writes the results: always, except on the non-chief workers of a
  TF_CONFIG cluster (the chief, or worker 0 when there is no chief, writes)."""
  try:
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
  except ValueError:
    return True
  task = tf_config.get("task", {})
  has_chief = "chief" in tf_config.get("cluster", {})
  kind, index = task.get("type", "chief"), int(task.get("index", 0))
  return kind == "chief" or (not has_chief and kind == "worker" and index == 0)


def _run_logged(command: list[str], log_path: str) -> int:
  """Runs `command`, stdout and stderr into `log_path` (appended: a resumed run keeps both)."""
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n$ {shlex.join(command)}\n")
    log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def last_error_line(log_path: str) -> str:
  """The most telling line of a failed process' log: its 'error:' line, else its last line."""
  try:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      lines = [ln.strip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
  except OSError:
    return "no log"
  errors = [ln for ln in lines if "error:" in ln.lower() or ln.startswith(("Error", "Traceback"))]
  picked = [ln for ln in errors if not ln.startswith("Traceback")] or lines[-1:]
  return picked[-1][:400] if picked else "no output"


def _children_cpu() -> float:
  """User + system CPU seconds of the finished child processes so far (the runs' true cost on a
  shared machine, where wall time depends on the other jobs)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _fmt(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _train(config: SweepConfig, variant, seed: int, path: str) -> tuple[str, str | None]:
  """("ok" | "failed" | "stopped", error) of training one run (skipped when finished)."""
  if os.path.exists(os.path.join(path, runfiles.SUMMARY_FILE)):
    return "ok", None
  os.makedirs(path, exist_ok=True)
  log = os.path.join(path, "train.log")
  code = _run_logged(train_command(config, variant, seed), log)
  if code != 0:
    return "failed", f"training exited with status {code}: {last_error_line(log)} (log: {log})"
  if not os.path.exists(os.path.join(path, runfiles.SUMMARY_FILE)):
    return "stopped", "training was stopped (SIGTERM/Ctrl-C) after checkpointing"
  return "ok", None


def _evaluated(path: str) -> bool:
  summary = runfiles.read_json(os.path.join(path, runfiles.SUMMARY_FILE)) or {}
  done = runfiles.read_json(os.path.join(path, report.COMPARE_EVAL_FILE)) or {}
  return done.get("checkpoint_step") is not None \
      and done.get("checkpoint_step") == summary.get("global_step")


def _evaluate(config: SweepConfig, path: str) -> tuple[str, str | None]:
  if _evaluated(path):
    return "ok", None
  log = os.path.join(path, "eval.log")
  code = _run_logged(eval_command(config, path), log)
  if code != 0:
    return "failed", f"evaluation exited with status {code}: {last_error_line(log)} (log: {log})"
  return "ok", None


def _record(variant: str, seed: int, path: str, status: str, error: str | None) -> dict:
  record = {"variant": variant, "seed": seed, "run_dir": path, "status": status, "error": error}
  return {**record, **report.read_run_metrics(path)}


def _pct(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}%"


class _Eta:
  """Remaining time of the sweep from the runs trained and evaluated by this invocation."""

  def __init__(self, total: int):
    self.total, self.done, self.durations = total, 0, []

  def finished(self, seconds: float | None) -> str:
    self.done += 1
    if seconds is not None:
      self.durations.append(seconds)
    left = self.total - self.done
    if not left:
      return "sweep done"
    if not self.durations:
      return f"{left} run(s) left"
    per_run = sum(self.durations) / len(self.durations)
    return f"{left} run(s) left, ETA {_fmt(left * per_run)} (~{_fmt(per_run)} per run)"


def _notes(config: SweepConfig) -> list[str]:
  return [
      "mean ± sample standard deviation (ddof = 1) over seeds; (n) = seeds that finished.",
      "kNN: weighted, k from the data, t = 0.1, held-out split, pooled backbone features.",
      ("linear: the linear probe on centre-view features extracted once "
       "(`linear_probe(cache_features=True)`), fast but not MoCo's augmented protocol"
       if config.linear_cache_features else "linear: MoCo's linear protocol (fresh crops every "
       "epoch); the raw-pixel probe on cached pixels")
      + f"; epochs: {config.linear_epochs or 'the data set default'}.",
      "alignment (α = 2), uniformity (t = 2), same-class share of each query's hardest 1% of "
      f"the queue and proxy top-1: `tfmochi.analyze` on {config.num_queries} training queries; "
      "the same share on the same queue and queries for the network at random initialisation "
      "and for raw pixels (L2-normalised eval views) in the baselines' table.",
      ("training top-1: the trainer's proxy accuracy (acc1 in metrics.jsonl: the positive "
       "above every negative, MoCHi's synthetic ones included) over the last "
       f"{report.TAIL:.0%} of the logged steps; training top-1 vs real queue: acc1_queue of "
       "the same rows (the real queue entries only, after any removal by the variant; acc1 "
       "itself where the run has no synthetic negatives); proxy top-1 vs queue scores the "
       "final model against the real queue only."),
      (f"paired: each variant minus {report.BASELINE_VARIANT} on the same seed, mean and 95% t "
       "interval over seeds, Holm-adjusted over every comparison of the table; the paper's "
       "claim: the direction the variant's paper states (tfmochi.compare.stats)."),
      f"base: {config.base_flagfile}; seeds {', '.join(map(str, config.seeds))}; overrides: "
      + (" ".join(train_command(config, variants_lib.Variant("V", ()), 0)[4:-2]) or "none"),
      "variants: " + "; ".join(f"{v.name} = {' '.join(v.flags) or '(base)'}"
                               for v in config.variants),
  ]


def _add_cost(path: str, wall: float, cpu: float) -> None:
  """Adds this invocation's seconds to the run's cost file (written whole)."""
  cost = runfiles.read_json(os.path.join(path, report.COST_FILE)) or {}
  cost = {"wall_seconds": (cost.get("wall_seconds") or 0.0) + wall,
          "cpu_seconds": (cost.get("cpu_seconds") or 0.0) + cpu,
          "invocations": (cost.get("invocations") or 0) + 1}
  runfiles.write_local(os.path.join(path, report.COST_FILE), json.dumps(cost))


def _run_one(config: SweepConfig, variant, seed: int,
             chief: bool) -> tuple[dict, str, str, float]:
  """Trains and (on the chief) evaluates one run. Returns (its record, status, what to print,
  the wall seconds this invocation spent on it); its cost file accumulates wall and CPU."""
  path = run_dir(config, variant.name, seed)
  start, cpu_start = time.time(), _children_cpu()
  status, error = _train(config, variant, seed, path)
  if status == "ok" and chief:
    status, error = _evaluate(config, path)
  wall, cpu = time.time() - start, _children_cpu() - cpu_start
  if chief and cpu > 1.0:  # this invocation trained or evaluated (a skip costs ~0 CPU)
    _add_cost(path, wall, cpu)
  record = _record(variant.name, seed, path, "pending" if status == "stopped" else status, error)
  metrics = record["metrics"]
  what = (f"FAILED: {error}" if status == "failed" else error if status == "stopped" else
          f"kNN {_pct(metrics['knn_top1'])}, linear {_pct(metrics['linear_top1'])}" if chief
          else "trained")
  return record, status, f"{what} ({_fmt(wall)} wall, {_fmt(cpu)} CPU)", wall


def run_sweep(config: SweepConfig, log=print) -> dict:
  """Trains and evaluates every (variant, seed), skipping finished work; returns the results."""
  os.makedirs(config.output_dir, exist_ok=True)
  chief = is_chief()
  jobs = [(v, s) for v in config.variants for s in config.seeds]
  eta = _Eta(len(jobs))
  records = {(v.name, s): _record(v.name, s, run_dir(config, v.name, s), "pending", None)
             for v, s in jobs}
  results = {"base_flagfile": config.base_flagfile, "seeds": list(config.seeds),
             "variants": [dataclasses.asdict(v) for v in config.variants],
             "notes": _notes(config), "runs": list(records.values()), "stopped": False}
  for i, (variant, seed) in enumerate(jobs, 1):
    path = run_dir(config, variant.name, seed)
    tag = f"[{i}/{len(jobs)}] {variant.name} seed {seed}"
    fresh = not (os.path.exists(os.path.join(path, runfiles.SUMMARY_FILE)) and _evaluated(path))
    log(f"{tag}: " + (f"training + evaluation (logs: {path}/train.log, eval.log)" if fresh
                      else "finished earlier, skipped"), flush=True)
    record, status, what, wall = _run_one(config, variant, seed, chief)
    records[(variant.name, seed)] = record
    results["runs"] = list(records.values())
    results["stopped"] = status == "stopped"
    if chief:
      report.write_results(results, config.output_dir)
    if status == "stopped":
      log(f"{tag}: {what}; rerun the same command to continue the sweep.", flush=True)
      break
    ran = wall if fresh and status == "ok" else None
    log(f"{tag}: {what}; {eta.finished(ran)}", flush=True)
  if chief:  # with the aggregates
    results = runfiles.read_json(os.path.join(config.output_dir, report.RESULTS_FILE))
  return results
