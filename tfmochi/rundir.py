"""A run's directory: what it holds, and how each file is written (whole or not at all).

`RunDir` is the one owner of `<model_dir>`: config.json, checkpoints (listing, restore with
fallback), result files, metrics.jsonl, TensorBoard writers and the write probe all go through it.
Layout of `model_dir` (local, gs:// or ram://):

  config.json            the TrainConfig of the run, plus what "auto" resolved to
  checkpoints/ckpt-N.*   tf.train.Checkpoint: step, query_encoder, key_encoder, queue, optimizer
  worker_tmp_<i>/        the checkpoints of worker i > 0 of a multi-worker run (not kept)
  train/, eval/          TensorBoard event files
  summary.json           the end-of-run summary
  knn_random_init.json   the trainer's kNN of the network before its first step
  eval_<mode>[_random_init].json   tfmochi.evaluate's results (of checkpoints / of the initial
                         network, see checkpoints.random_init_encoder)
  metrics.jsonl          one JSON record per training loop (see MetricsLog)
  export/<format>/       the exported backbone (complete once export_info.json exists)
  analysis/              tfmochi.analyze's report (complete once report.json exists)

Everything downstream (export, evaluate, analyze) rebuilds the encoder from config.json and reads
the `query_encoder` node of the newest readable checkpoint, so any of them works on a run that is
still training.

Every file goes through `tf.io.gfile`, never `open()` or `os.*`, so that `model_dir` (and export
and analysis directories) may be a bucket: `gs://...` on Cloud TPU VMs, or TensorFlow's in-memory
`ram://...`, which the tests use as the stand-in for `gs://`.

"Written completely or not at all" must hold without an atomic rename: on Google Cloud Storage a
rename is a copy and a delete per object, and a directory rename is one such pair per object (a
crash half-way leaves half of each directory). The rules:
1. Small files (the JSON files, index.html, PNGs, metrics.jsonl on an object store) are written
   by `write_bytes` / `write_text` / `write_json`:
   * on a local disk, into a temporary sibling that is renamed over the target (POSIX rename is
     atomic);
   * elsewhere (`runfiles.is_local` is False: any `scheme://` but `file://`), by one GFile write
     of the full content and a close. TensorFlow's GCS file system buffers a written file locally
     and uploads it when it is closed, and GCS makes an object visible only once its upload has
     completed, so a reader sees the previous object or the new one, never a part of one. Nothing
     here flushes an object store file before its close (a flush would upload the part written so
     far).
2. Directories (exports, analyses) are complete when their marker file exists: `export_info.json`
   for an export, `report.json` for an analysis. The marker is written last (rule 1) and lists the
   directory's files; a directory is rewritten by first deleting its marker (`begin_directory`),
   and readers treat a directory without its marker as absent (`is_complete`). On a local disk an
   export is in addition built in a temporary sibling and renamed into place, so that it replaces
   an older export in one step.
3. Checkpoints (tf.train.CheckpointManager): TensorFlow writes the variables into
   `<prefix>_temp/`, renames the data files into place, writes `<prefix>.index` after them, and
   only then rewrites the `checkpoint` state file that names the checkpoints. That small file is
   whole on every file system: TensorFlow writes it to a temporary file and renames it (on gs:// a
   rename is a server-side copy, whose target object appears whole, then a delete; a crash can
   leave a stray `checkpoint.tmp*` object, never a partial state file), or in one write where the
   file system declares no atomic move (S3). `RunDir.list_checkpoints` only returns
   checkpoints named in the state file whose `.index` exists, so a save interrupted at any point
   is never chosen (the previous one is); one that exists but cannot be read (a truncated file)
   makes `RunDir.restore` fall back to the previous one with a warning.
4. metrics.jsonl (`MetricsLog`): on a local disk one JSON line is appended per loop. Object stores
   cannot append: TensorFlow's GCS "append" downloads the object and uploads it whole again, so a
   line per loop would cost O(lines^2) traffic over a run. There the trainer keeps the records in
   memory and rewrites the whole file (rule 1) at every checkpoint, at a SIGTERM stop, at the end
   of training and when training fails (e.g. a non-finite loss): the file holds the records up to
   the newest checkpoint (after a failure: up to the failure), and a resumed run starts from the
   records up to the step it restored (no duplicates). Between checkpoints, TensorBoard shows the
   live values.
5. TensorBoard event files are written by tf.summary through gfile (on gs:// each flush uploads
   the event file again); TensorBoard ignores a truncated last record, so they need no marker.
6. At start-up `check_writable` proves that the directory can be created, written, read back and
   deleted; a path that cannot (an unknown scheme, a missing bucket, no permission, a file where a
   directory should be) gets one `RunDirError` naming the path, the reason and what to do.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import tensorflow as tf

from tfmochi import runfiles




class RunDirError(ValueError):
  """A directory that cannot be read or written; the message names the path and the fix."""


class CheckpointError(ValueError):
  """A model_dir has no usable checkpoint, or one that does not fit the model. Clear message."""


def reason(error: BaseException) -> str:
  """The first line of an I/O error, e.g. "File system scheme 'foo' not implemented (...)"."""
  text = str(getattr(error, "message", "") or error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def _advice(path: str, error: BaseException) -> str:
  if isinstance(error, tf.errors.UnimplementedError) and "://" in path:
    scheme = path.split("://", 1)[0]
    return (f"TensorFlow has no file system for {scheme}://; use a local path, gs://bucket/... "
            "(built into TensorFlow) or ram://... (in-memory, one process)")
  if isinstance(error, tf.errors.PermissionDeniedError) or path.startswith("gs://"):
    return ("check that the path exists and that this machine's credentials may read and write "
            "it (for a bucket: gcloud storage ls on it; the VM's service account needs the "
            "Storage Object User role)")
  return "choose a directory you can write to"


def check_writable(directory: str, what: str = "--model_dir") -> None:
  """Creates `directory` if needed and proves it can be written, read back and cleaned up.

  Raises:
    RunDirError: one message with the path, the file system's reason and the fix.
  """
  # Unique per process and call: the workers of a multi-worker run probe one directory at once.
  probe = os.path.join(directory, f".write_test_{os.getpid()}_{time.time_ns()}")
  try:
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    with tf.io.gfile.GFile(probe, "r") as f:
      if f.read() != "ok":
        raise tf.errors.DataLossError(None, None, "the probe file read back differently")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise RunDirError(f"{what} {directory} is not writable ({reason(e)}): "
                      f"{_advice(directory, e)}.") from None


def check_readable(path: str, what: str = "--model_dir") -> bool:
  """Whether `path` exists; an unreadable location (bad scheme, no access) raises RunDirError."""
  try:
    return tf.io.gfile.exists(path)
  except (tf.errors.OpError, OSError) as e:
    raise RunDirError(f"{what} {path} cannot be read ({reason(e)}): {_advice(path, e)}.") from None


# -------------------------------------------------------------------------------------------------
# Whole files (rule 1)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the whole new one (rule 1)."""
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  if not runfiles.is_local(path):
    if path.startswith("ram://") and tf.io.gfile.exists(path):
      # TensorFlow's in-memory file system appends to an existing file opened for writing,
      # where gs:// replaces the object: emulate the replacement.
      tf.io.gfile.remove(path)
    with tf.io.gfile.GFile(path, "wb") as f:  # one upload at close
      f.write(data)
    return
  runfiles.write_local(path, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(path: str) -> str:
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def read_json(path: str):
  return json.loads(read_text(path))


def remove(path: str) -> None:
  """Deletes a file or a directory tree if it exists; failures are logged, never raised."""
  try:
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)
  except tf.errors.OpError as e:  # clean-up must not hide the error that led to it
    logging.warning("Could not remove %s: %s", path, reason(e))


# -------------------------------------------------------------------------------------------------
# Directories with a marker written last (rule 2)


def list_files(directory: str) -> list[str]:
  """Every file under `directory` (any gfile path), relative to it, sorted."""
  files = []
  for root, _, names in tf.io.gfile.walk(directory):
    rel = os.path.relpath(root, directory) if root != directory else ""
    files += [os.path.join(rel, n) if rel else n for n in names]
  return sorted(files)


def copy_tree(src: str, dst: str, skip: tuple[str, ...] = ()) -> None:
  """Copies every file of directory `src` to `dst` (both any gfile path), except `skip`."""
  for name in list_files(src):
    if name in skip:
      continue
    target = os.path.join(dst, name)
    tf.io.gfile.makedirs(os.path.dirname(target))
    tf.io.gfile.copy(os.path.join(src, name), target, overwrite=True)


def is_complete(directory: str, marker: str) -> bool:
  """A directory of rule 2 is complete (and may be read) once its marker exists."""
  return tf.io.gfile.exists(os.path.join(directory, marker))


def begin_directory(directory: str, marker: str) -> None:
  """Makes `directory` exist and marks it incomplete (deletes the marker) before a rewrite."""
  tf.io.gfile.makedirs(directory)
  path = os.path.join(directory, marker)
  if tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


# -------------------------------------------------------------------------------------------------
# metrics.jsonl (rule 4)


class MetricsLog:
  """One JSON record per training loop in `path` (appended locally; rewritten on object stores).

  Args:
    path: <model_dir>/metrics.jsonl.
    resume_step: the step a run restored (0 for a new run). On an object store the records up to
      this step are read back, so that the rewritten file continues them.
  """

  def __init__(self, path: str, resume_step: int = 0):
    self.path = path
    self.append_mode = runfiles.is_local(path)
    self._records: list[str] = []  # object stores: every line of the file, in order
    self._dirty = False
    if not self.append_mode and resume_step > 0 and tf.io.gfile.exists(path):
      try:
        for line in read_text(path).splitlines():
          if line.strip() and json.loads(line).get("step", 0) <= resume_step:
            self._records.append(line)
      except (ValueError, tf.errors.OpError) as e:
        logging.warning("Starting a new %s: the previous one cannot be read (%s).", path,
                        reason(e))
        self._records = []

  def append(self, record: dict) -> None:
    line = json.dumps(record)
    if not self.append_mode:
      self._records.append(line)
      self._dirty = True
      return
    try:
      with tf.io.gfile.GFile(self.path, "a") as f:
        f.write(line + "\n")
    except (tf.errors.OpError, OSError) as e:
      logging.log_first_n(logging.WARNING, "metrics.jsonl not written: %s", 1, reason(e))

  def flush(self) -> None:
    """Object stores: rewrites the whole file in one upload (at checkpoints, stops, the end)."""
    if self.append_mode or not self._dirty:
      return
    try:
      write_text(self.path, "".join(line + "\n" for line in self._records))
      self._dirty = False
    except (tf.errors.OpError, OSError) as e:
      logging.log_first_n(logging.WARNING, "metrics.jsonl not written: %s", 1, reason(e))


# -------------------------------------------------------------------------------------------------
# The run directory


# What reading a damaged or mismatched checkpoint raises; a truncated file can surface as
# IndexError ("Read less bytes than requested").
_CHECKPOINT_READ_ERRORS = (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError,
                           EOFError)


def checkpoint_step(path: str) -> int:
  """The step number of a `ckpt-N` prefix (-1 if it has none)."""
  try:
    return int(path.rsplit("-", 1)[1])
  except (IndexError, ValueError):
    return -1


class RunDir:
  """`<model_dir>` of a training run: its config, checkpoints, result files and logs.

  Args:
    path: the directory (local, gs://, ram://); nothing is touched until a method is called.
  """

  def __init__(self, path: str):
    self.path = path

  def join(self, *names: str) -> str:
    return os.path.join(self.path, *names)

  @property
  def checkpoint_dir(self) -> str:
    return self.join(runfiles.CHECKPOINT_SUBDIR)

  def check_writable(self) -> None:
    """The write probe of rule 6 on model_dir; raises RunDirError."""
    check_writable(self.path, "--model_dir")

  # ---- JSON files: config.json, summary.json, knn_random_init.json, eval_*.json
  def read(self, name: str) -> dict | None:
    """The JSON file `name` of the run, or None when it does not exist."""
    path = self.join(name)
    return read_json(path) if tf.io.gfile.exists(path) else None

  def write(self, name: str, obj) -> None:
    """Writes the JSON file `name` whole (rule 1)."""
    write_json(self.join(name), obj)

  def read_config(self):
    """The TrainConfig the run was started with (config.json); raises CheckpointError."""
    from tfmochi import config as config_lib  # local: config imports the heavy modules

    path = self.join(runfiles.CONFIG_FILE)
    try:
      found = check_readable(path)
    except RunDirError as e:  # an unknown scheme, a bucket without access, ...
      raise CheckpointError(str(e)) from None
    if not found:
      if not tf.io.gfile.exists(self.path):
        raise CheckpointError(f"--model_dir {self.path} does not exist. Point it at the directory "
                              "a training run wrote (it holds config.json and checkpoints/).")
      raise CheckpointError(f"{self.path} has no {runfiles.CONFIG_FILE}: it is not a tfmochi "
                            "training directory (python -m tfmochi.train --model_dir=... writes "
                            "one).")
    try:
      return config_lib.TrainConfig.from_dict(read_json(path))
    except (ValueError, tf.errors.OpError) as e:
      raise CheckpointError(f"{path} cannot be read ({reason(e)}).") from None

  def metrics_log(self, resume_step: int = 0) -> "MetricsLog":
    return MetricsLog(self.join(runfiles.METRICS_FILE), resume_step)

  def summary_writer(self, name: str, enabled: bool = True):
    """A TensorBoard writer into `<model_dir>/<name>` (a no-op writer when not `enabled`)."""
    if not enabled:
      return tf.summary.create_noop_writer()
    return tf.summary.create_file_writer(self.join(name))

  # ---- checkpoints (rule 3)
  def checkpoint_manager(self, checkpoint: tf.train.Checkpoint, max_to_keep: int,
                         worker: int | None = None) -> tf.train.CheckpointManager:
    """Saves into checkpoints/, or into worker_tmp_<worker> for a multi-worker run's non-chief
    (every worker must save, its collectives need all of them; only the chief's copy is kept)."""
    directory = self.checkpoint_dir if worker is None else self.join(f"worker_tmp_{worker}")
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)

  def list_checkpoints(self) -> list[str]:
    """Checkpoint prefixes of the run, newest first (empty if none)."""
    try:
      found = check_readable(self.checkpoint_dir, "The checkpoint directory")
    except RunDirError as e:  # an unknown scheme, a bucket without access, ...
      raise CheckpointError(str(e)) from None
    state = tf.train.get_checkpoint_state(self.checkpoint_dir) if found else None
    if state is None:
      return []
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    # get_checkpoint_state has already prefixed relative entries with the directory; joining
    # them again would break a relative model_dir.
    return [p for p in reversed(paths) if tf.io.gfile.exists(p + ".index")]

  def restore(self, checkpoint: tf.train.Checkpoint, partial: bool = False,
              paths: list[str] | None = None) -> str | None:
    """Restores the newest *readable* checkpoint; falls back to older ones with a warning.

    Args:
      checkpoint: the object graph to restore into.
      partial: allow the checkpoint to hold more than `checkpoint` (e.g. only the query encoder
        is wanted).
      paths: the candidates, newest first (default: `list_checkpoints()`).

    Returns:
      The restored checkpoint prefix, or None when there is no candidate.

    Raises:
      CheckpointError: candidates exist but none can be read into this model (e.g. another
        architecture), with the reasons.
    """
    paths = self.list_checkpoints() if paths is None else paths
    errors = []
    for path in paths:
      try:
        status = checkpoint.restore(path)
        if partial:
          status.expect_partial()
        # Every object of the model must be in the checkpoint (another architecture fails here).
        status.assert_existing_objects_matched()
      except _CHECKPOINT_READ_ERRORS as e:
        errors.append(f"{os.path.basename(path)}: {reason(e)}")
        logging.warning("Cannot read checkpoint %s: %s", path, reason(e))
        continue
      if errors:
        logging.warning("Restored the older checkpoint %s because newer ones could not be read: "
                        "%s", path, "; ".join(errors))
      return path
    if errors:
      raise CheckpointError(
          f"No checkpoint in {self.checkpoint_dir} could be read into this model ("
          + "; ".join(errors) + "). If the run used another --arch, --embedding_dim, --mlp_head, "
          "--head_bn or --small_stem, use the same values (config.json of the run has them), or a "
          "new --model_dir.")
    return None
