"""Subprocesses for the tests of the command lines (`python -m tfmochi.<module> ...`).

A test module starts all its command-line cases at once (they overlap: each pays TensorFlow's
start-up) and waits for each in the test that checks it. Whatever nobody waited for (a test
failed early) is killed when the test session ends.
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
  """A temporary directory, one per prefix for the whole session, removed at exit."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def python(*args: str, cwd: str) -> subprocess.Popen:
  """Starts `python *args` on this checkout's tfmochi (CPU only, quiet TensorFlow logs)."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO,
         "CUDA_VISIBLE_DEVICES": ""}
  process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
  _STARTED.append(process)
  return process


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
  """Waits for `process`: (return code, stdout, stderr)."""
  stdout, stderr = process.communicate(timeout=timeout)
  return process.returncode, stdout, stderr
