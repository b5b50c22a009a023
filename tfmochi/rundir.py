"""How a run's files are written: through tf.io.gfile, each one whole or not at all, no rename.

Every file a run reads or writes (config.json, checkpoints, metrics.jsonl, summary.json,
knn_random_init.json, eval_*.json, TensorBoard events, exports, analysis outputs; the layout is in
`tfmochi.checkpoints`) goes through `tf.io.gfile`, never `open()` or `os.*`, so that `model_dir`
(and export and analysis directories) may be a bucket: `gs://...` on Cloud TPU VMs, or TensorFlow's
in-memory `ram://...`, which the tests use as the stand-in for `gs://`.

"Written completely or not at all" must hold without an atomic rename: on Google Cloud Storage a
rename is a copy and a delete per object, and a directory rename is one such pair per object (a
crash half-way leaves half of each directory). The rules:

1. Small files (the JSON files, index.html, PNGs, metrics.jsonl on an object store) are written
   by `write_bytes` / `write_text` / `write_json`:
   * on a local disk, into a temporary sibling that is renamed over the target (POSIX rename is
     atomic);
   * elsewhere (`is_local` is False: any `scheme://` but `file://`), by one GFile write of the full
     content and a close. TensorFlow's GCS file system buffers a written file locally and uploads
     it when it is closed, and GCS makes an object visible only once its upload has completed, so
     a reader sees the previous object or the new one, never a part of one. Nothing here flushes
     an object store file before its close (a flush would upload the part written so far).
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
   file system declares no atomic move (S3). `checkpoints.list_checkpoints` only returns
   checkpoints named in the state file whose `.index` exists, so a save interrupted at any point
   is never chosen (the previous one is); one that exists but cannot be read (a truncated file)
   makes `checkpoints.restore_with_fallback` fall back to the previous one with a warning.
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
import uuid

from absl import logging
import tensorflow as tf


class RunDirError(ValueError):
  """A directory that cannot be read or written; the message names the path and the fix."""


def is_local(path: str) -> bool:
  """True for paths of the local file system (no scheme, or file://): rename there is atomic."""
  return "://" not in path or path.startswith("file://")


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
  if not is_local(path):
    if path.startswith("ram://") and tf.io.gfile.exists(path):
      # TensorFlow's in-memory file system appends to an existing file opened for writing
      # (measured, TF 2.21), where gs:// replaces the object: emulate the replacement.
      tf.io.gfile.remove(path)
    with tf.io.gfile.GFile(path, "wb") as f:  # one upload at close
      f.write(data)
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    remove(tmp)
    raise


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
    self.append_mode = is_local(path)
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
