"""Runs `python -m tfmochi.<tool>` (or `python -c ...`) cases as subprocesses for the CLI tests.

A test module starts all its cases at once (they overlap: on 2 cores most of their cost is the
TensorFlow import) and collects each one once; whatever is still running at exit is killed.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STARTED: list[subprocess.Popen] = []


@atexit.register
def _stop_started() -> None:
  for process in _STARTED:
    if process.poll() is None:
      process.kill()


@functools.lru_cache(maxsize=None)
def workdir(prefix: str) -> str:
  """A temporary directory for one test module's runs, removed at exit."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def python(*args: str, cwd: str) -> subprocess.Popen:
  """Starts `python *args` on the CPU with this checkout's tfmochi (quiet TensorFlow logs)."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO,
         "CUDA_VISIBLE_DEVICES": ""}
  process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
  _STARTED.append(process)
  return process


def start(module: str, *args: str, cwd: str) -> subprocess.Popen:
  """Starts `python -m module args` (see `python`)."""
  return python("-m", module, *args, cwd=cwd)


@functools.lru_cache(maxsize=None)
def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of a started case, waiting for it once."""
  stdout, stderr = process.communicate(timeout=timeout)
  return process.returncode, stdout, stderr


def assert_clean_error(test, program: str, name: str, finished_case: tuple, message: str) -> None:
  """The case `name` ended with exit status 2 and one `<program>: error: ...message...` line."""
  code, _, stderr = finished_case[:3]
  test.assertEqual(code, 2, msg=f"{name}: {stderr[-2000:]}")
  test.assertIn(f"{program}: error:", stderr, msg=name)
  test.assertIn(message, stderr, msg=name)
  test.assertNotIn("Traceback", stderr, msg=name)


def overlap_with_other_tests() -> bool:
  """Whether a module may start its cases at import, to run during the other modules' tests.

  Not under pytest-xdist: every worker imports every module, so there the CLI test itself
  starts them and only the worker that runs it pays for them.
  """
  return "PYTEST_XDIST_WORKER" not in os.environ
