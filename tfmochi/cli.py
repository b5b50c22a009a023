"""The command-line plumbing shared by tfmochi's `python -m` tools (evaluate, analyze, compare).

Every tool ends a bad invocation the same way: one line `tfmochi.<tool>: error: <message>` on
stderr and exit status 2, without a traceback, whether the flag parser (e.g. `--knn_k=abc`), the
tool's own argument checks or the library (a missing run, unlabelled data) found the problem.
absl FLAGS are read only here and by the tools' `main`, never by library code. Importing this
module does not import TensorFlow (the sweep driver `tfmochi.compare` runs without it).

`quiet_tensorflow_startup` keeps TensorFlow's C++ start-up lines off a command's console (see its
docstring); `TF_CPP_MIN_LOG_LEVEL=0 python -m tfmochi.<tool> ...` shows all of them again.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from absl import logging

# TensorFlow's C++ code logs only severities >= this variable: 0 all, 1 no INFO, 2 no INFO or
# WARNING, 3 no ERROR either. 2 keeps C++ errors (a bucket that cannot be read, a lost worker).
LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LOG_LEVEL = "2"
_SEVERITIES = "IWEF"  # absl's line prefix letter, in the variable's order
# absl's prefix (TensorFlow 2.21: "E0000 00:00:...") or TSL's own (2.20, tensorflow-tpu's newest:
# "2026-12-07 06:28:14.003156: E external/...").
_ABSL_LINE = re.compile(r"(?:([IWEF])\d{4} \d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) )")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"
_NO_CUDA_RUNTIME = "GPU will not be used"
_CUINIT_FAILED = "failed call to cuInit"


@functools.lru_cache(maxsize=None)
def nvidia_driver_installed() -> bool:
  """Whether the NVIDIA driver library loads: without it this machine has no usable GPU."""
  try:
    ctypes.CDLL("libcuda.so.1")
  except OSError:
    return False
  return True


class StartupLogFilter:
  """Decides which lines TensorFlow writes to stderr while it loads reach the console.

  TensorFlow's shared libraries log while they are loaded, before they read
  TF_CPP_MIN_LOG_LEVEL, so its INFO lines (oneDNN, "Could not find cuda drivers") appear at any
  level, once per library that carries a copy of the logger. This filter applies the level to
  them. On a machine without the NVIDIA driver, the CUDA platform's initialisation also logs
  `failed call to cuInit` as an ERROR: it says only that there is no GPU, so it is dropped there;
  with the driver installed it is a real fault and shows (unless the level is 3), as does the
  line saying TensorFlow will not use the GPU.
  """

  def __init__(self, min_level: int,
               has_nvidia_driver: Callable[[], bool] = nvidia_driver_installed):
    self.min_level = min_level
    self.has_nvidia_driver = has_nvidia_driver

  def keep(self, line: str) -> bool:
    if self.min_level <= 0:
      return True
    if line.startswith(_ABSL_PREAMBLE):
      return False  # only announces where the early lines go
    match = _ABSL_LINE.match(line)
    if not match:
      return True  # not a C++ log line (Python warnings, tracebacks)
    if _CUINIT_FAILED in line or _NO_CUDA_RUNTIME in line:
      if not self.has_nvidia_driver():
        return False
      if _NO_CUDA_RUNTIME in line:
        return True  # a GPU that TensorFlow cannot use: worth seeing at any level
    return _SEVERITIES.index(match.group(1) or match.group(2)) >= self.min_level


def log_level() -> int:
  """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (unset or not a number: 0)."""
  try:
    return int(os.environ.get(LOG_LEVEL_VARIABLE, "0"))
  except ValueError:
    return 0


def _running_a_tfmochi_command() -> bool:
  """True in `python -m tfmochi.<tool>`, also while Python imports the tool's package."""
  main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  # While `python -m` locates its module (importing the packages on the way) argv[0] is "-m".
  return (getattr(sys, "argv", [])[:1] == ["-m"]
          or (getattr(main_spec, "name", None) or "").split(".")[0] == "tfmochi")


def _forward_lines(read_end: int, out_fd: int, keep: Callable[[str], bool]) -> None:
  with os.fdopen(read_end, "rb") as pipe:
    for line in pipe:
      try:
        wanted = keep(line.decode("utf-8", "replace"))
      except Exception:  # pylint: disable=broad-except
        wanted = True  # a filter bug must not eat a line, nor stop the forwarding
      while wanted and line:
        line = line[os.write(out_fd, line):]


@contextlib.contextmanager
def filtered_stderr(keep: Callable[[str], bool]) -> Iterator[None]:
  """Passes whatever is written to file descriptor 2 meanwhile (C++ included) through `keep`."""
  try:
    saved = os.dup(2)
  except OSError:
    saved = None
  if saved is None:  # no stderr to filter
    yield
    return
  read_end, write_end = os.pipe()
  if sys.stderr is not None:
    sys.stderr.flush()
  os.dup2(write_end, 2)
  os.close(write_end)
  forwarder = threading.Thread(target=_forward_lines, args=(read_end, saved, keep), daemon=True)
  forwarder.start()
  try:
    yield
  finally:
    if sys.stderr is not None:
      sys.stderr.flush()
    os.dup2(saved, 2)  # closes the pipe's only write end: the forwarder reads to its end
    forwarder.join(timeout=10)
    os.close(saved)


def quiet_tensorflow_startup() -> None:
  """Call before TensorFlow's first import: a command's console starts with tfmochi's lines.

  Sets TF_CPP_MIN_LOG_LEVEL=2 unless the environment sets it (the user's value wins). In a
  `python -m tfmochi.<tool>` process it then imports TensorFlow and initialises its devices
  (where CUDA logs) through `StartupLogFilter`; a program that imports tfmochi gets only the
  variable's default. `TF_CPP_MIN_LOG_LEVEL=0` shows every line again.
  """
  os.environ.setdefault(LOG_LEVEL_VARIABLE, DEFAULT_LOG_LEVEL)
  if "tensorflow" in sys.modules or not _running_a_tfmochi_command() or log_level() <= 0:
    return
  with filtered_stderr(StartupLogFilter(log_level()).keep):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if tf.test.is_built_with_cuda():  # (TPU builds have no CUDA: nothing to initialise early)
      tf.config.list_physical_devices("GPU")  # CUDA's initialisation logs here, inside the filter


def error(program: str, message: str) -> int:
  """Prints `<program>: error: <message>` to stderr; returns the exit status 2."""
  logging.flush()
  print(f"{program}: error: {message}", file=sys.stderr, flush=True)
  return 2


def check_invocation(program: str, argv: Sequence[str], *,
                     required: dict[str, str]) -> int | None:
  """The exit status of a bad invocation (positional arguments, a required flag missing), or None.

  Also keeps INFO chatter (absl, TensorFlow) off the console for a good one: the tools print
  their own progress to stdout.

  Args:
    program: the tool's name in error messages.
    argv: the arguments absl left over (argv[0] is the program).
    required: {flag name: what it is}, e.g. {"model_dir": "the training run to evaluate"}.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    return error(program, f"unexpected arguments {' '.join(argv[1:])} (flags start with --).")
  for name, what in required.items():
    if not flags.FLAGS[name].value:
      return error(program, f"--{name} is required ({what}).")
  logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.get_logger().setLevel("ERROR")  # e.g. checkpoints_iterator logs every wait at INFO
  return None


def run(program: str, define_flags: Callable[[], None], main: Callable[[list[str]], int]) -> None:
  """Defines the tool's flags and runs `main` under absl; flag errors also exit 2 (no traceback).

  Args:
    program: the tool's name in error messages, e.g. "tfmochi.evaluate".
    define_flags: defines the tool's absl flags (called once, here).
    main: argv -> exit status.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(error(program, str(e)))

  define_flags()
  app.run(main, flags_parser=parse_flags)
