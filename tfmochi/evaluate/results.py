"""Where an evaluation's results go: eval_<mode>.json with its history, TensorBoard, baselines.

  <model_dir>/eval_<mode>.json   top1, top5 (in %), checkpoint_step, the settings, and a
                                 `history` of every checkpoint evaluated so far (atomic write)
  <model_dir>/eval_<mode>_random_init.json   the same for the network at its random init
  <model_dir>/eval/              TensorBoard scalars <mode>_top1/<mode>_top5 (+ knn_k or
                                 linear_best_top1) at the checkpoint's step

The random-init result is the baseline pretraining must beat; later evaluations of the run
report it as `random_init_top1` (for kNN the trainer's own `knn_random_init.json` serves too).
"""

from __future__ import annotations

import os

import tensorflow as tf

from tfmochi import rundir
from tfmochi import runfiles

RANDOM_INIT_SUFFIX = "_random_init"
EVAL_SUBDIR = "eval"


def eval_json_path(model_dir: str, mode: str, random_init: bool = False) -> str:
  """<model_dir>/eval_<mode>.json, or eval_<mode>_random_init.json for the random-init baseline."""
  return os.path.join(model_dir, f"eval_{mode}{RANDOM_INIT_SUFFIX if random_init else ''}.json")


def random_init_result(model_dir: str, mode: str) -> dict | None:
  """The random-init baseline recorded for a run, if any.

  `evaluate --random_init` writes eval_<mode>_random_init.json; for kNN the trainer also writes
  knn_random_init.json before its first step (same network, same k and t unless overridden; not
  used when the monitor ran on subsets, --knn_train_per_class / --knn_test_per_class).
  """
  candidates = [eval_json_path(model_dir, mode, random_init=True)]
  if mode == "knn":
    candidates.append(os.path.join(model_dir, runfiles.KNN_RANDOM_INIT_FILE))
  for path in candidates:
    if tf.io.gfile.exists(path):
      try:
        result = rundir.read_json(path)
      except (ValueError, tf.errors.OpError):
        continue
      # The trainer's monitor may have used class-balanced subsets (ImageNet configs): not the
      # whole-split protocol of this evaluation, so not its baseline.
      subset = result.get("train_per_class") or result.get("test_per_class") \
          if isinstance(result, dict) else False
      if isinstance(result, dict) and "top1" in result and not subset:
        return result
  return None


def baselines_text(result: dict, details: str = "") -> str:
  """' (random init 79.70%, raw pixels 91.10%, stored 28 px pixels 93.40%; <details>)': the
  baselines a result holds."""
  parts = [f"{name} {result[key]:.2f}%" for name, key in
           (("random init", "random_init_top1"), ("raw pixels", "raw_pixels_top1"))
           if result.get(key) is not None]
  if result.get("raw_pixels_stored_top1") is not None:
    parts.append(f"stored {result.get('raw_pixels_stored_size', '?')} px pixels "
                 f"{result['raw_pixels_stored_top1']:.2f}%")
  text = "; ".join(part for part in (", ".join(parts), details) if part)
  return f" ({text})" if text else ""


def write_eval_scalars(model_dir: str, step: int, scalars: dict[str, float]) -> None:
  """TensorBoard scalars under <model_dir>/eval at `step`."""
  writer = tf.summary.create_file_writer(os.path.join(model_dir, EVAL_SUBDIR))
  with writer.as_default():
    for name, value in scalars.items():
      tf.summary.scalar(name, value, step=step)
  writer.flush()
  writer.close()


def write_result(model_dir: str, mode: str, result: dict, random_init: bool = False) -> None:
  """eval_<mode>.json = this result + the history of every checkpoint evaluated (atomic)."""
  path = eval_json_path(model_dir, mode, random_init)
  history = []
  if tf.io.gfile.exists(path):
    try:
      history = list(rundir.read_json(path).get("history", []))
    except (ValueError, tf.errors.OpError, AttributeError):
      history = []  # a foreign or damaged file: start a new history rather than fail
  entry = {key: result[key] for key in ("checkpoint_step", "checkpoint", "top1", "top5")}
  history = [h for h in history if h.get("checkpoint_step") != result["checkpoint_step"]]
  history = sorted(history + [entry], key=lambda h: h.get("checkpoint_step", -1))
  rundir.write_json(path, {**result, "history": history})


def record(model_dir: str, result: dict) -> None:
  """Writes `result` (of `evaluate_checkpoint`) to eval_<mode>[_random_init].json and TensorBoard.

  The scalars are <prefix>_top1, <prefix>_top5 and knn's k or linear's best top-1, prefix being
  the mode (+ "_random_init"), at the result's checkpoint step.
  """
  mode, random_init = result["mode"], result["random_init"]
  write_result(model_dir, mode, result, random_init=random_init)
  prefix = mode + (RANDOM_INIT_SUFFIX if random_init else "")
  scalars = {f"{prefix}_top1": result["top1"], f"{prefix}_top5": result["top5"]}
  if mode == "linear":
    scalars[f"{prefix}_best_top1"] = result["best_top1"]
  else:
    scalars[f"{prefix}_k"] = result["k"]
  write_eval_scalars(model_dir, result["checkpoint_step"], scalars)
