"""Tests for tfmochi.cli: the quiet start-up of the `python -m tfmochi.<tool>` commands.

The filter's decisions are tested on lines TensorFlow 2.21 writes (copied from a CPU machine
without the NVIDIA driver); one command runs in a subprocess with and without
TF_CPP_MIN_LOG_LEVEL=0 to show the console a user sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tfmochi import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN = ("I0000 00:00:1796623034.428530    4896 port.cc:153] oneDNN custom operations are on. "
          "You may see slightly different numerical results due to floating-point round-off errors")
NO_CUDART = ("I0000 00:00:1796623034.429401    4896 cudart_stub.cc:31] Could not find cuda drivers "
             "on your machine, GPU will not be used.")
CUINIT = ("E0000 00:00:1796623057.745391    5875 cuda_platform.cc:52] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
WARNING = "W0000 00:00:1796623057.745391    5875 some_file.cc:12] a C++ warning"
ERROR = "E0000 00:00:1796623057.745391    5875 gcs_file_system.cc:99] a C++ error"
# TensorFlow 2.20 (tensorflow-tpu's newest) writes these lines with TSL's prefix instead of absl's.
CUINIT_220 = ("2026-12-07 06:28:14.003156: E external/local_xla/xla/stream_executor/cuda/"
              "cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error: Failed call to "
              "cuInit: UNKNOWN ERROR (303)")
ONEDNN_220 = ("2026-12-07 06:28:04.719621: I tensorflow/core/util/port.cc:153] oneDNN custom "
              "operations are on.")
ERROR_220 = "2026-12-07 06:28:04.719621: E tensorflow/core/platform/some_file.cc:9] a C++ error"
C_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d|\d{4}-\d\d-\d\d [\d:.]+: [IWEF] )", re.MULTILINE)


def _keeps(lines, level, driver=False):
  log_filter = cli.StartupLogFilter(level, has_nvidia_driver=lambda: driver)
  return [line for line in lines if log_filter.keep(line + "\n")]


def test_the_default_level_drops_info_and_warnings_and_keeps_errors():
  lines = [PREAMBLE, ONEDNN, WARNING, ERROR, "a Python warning", "Traceback (most recent call)"]
  assert _keeps(lines, 2) == [ERROR, "a Python warning", "Traceback (most recent call)"]
  assert _keeps(lines, 1) == [WARNING, ERROR, "a Python warning", "Traceback (most recent call)"]
  assert _keeps(lines, 3) == ["a Python warning", "Traceback (most recent call)"]


def test_tensorflow_2_20_lines_are_filtered_alike():
  assert _keeps([ONEDNN_220, CUINIT_220, ERROR_220], 2) == [ERROR_220]
  assert _keeps([ONEDNN_220, CUINIT_220, ERROR_220], 2, driver=True) == [CUINIT_220, ERROR_220]


def test_level_0_keeps_every_line():
  lines = [PREAMBLE, ONEDNN, NO_CUDART, CUINIT, WARNING, ERROR]
  assert _keeps(lines, 0) == lines
  assert _keeps(lines, 0, driver=True) == lines


def test_the_cuinit_failure_is_dropped_only_without_the_nvidia_driver():
  assert _keeps([NO_CUDART, CUINIT], 2, driver=False) == []
  # With the driver installed, a failing cuInit or an unusable GPU is a fault to see.
  assert _keeps([NO_CUDART, CUINIT], 2, driver=True) == [NO_CUDART, CUINIT]
  assert _keeps([NO_CUDART, CUINIT], 3, driver=True) == [NO_CUDART]


def test_filtered_stderr_filters_the_file_descriptor(capfd):
  with cli.filtered_stderr(cli.StartupLogFilter(2, has_nvidia_driver=lambda: False).keep):
    os.write(2, (ONEDNN + "\n" + ERROR + "\n" + CUINIT + "\nnot a log line\n").encode())
  os.write(2, b"after\n")  # the filter's lines are all out when the block ends
  assert capfd.readouterr().err == ERROR + "\nnot a log line\nafter\n"


def test_a_program_importing_tfmochi_gets_only_the_default_level(monkeypatch):
  monkeypatch.delenv(cli.LOG_LEVEL_VARIABLE, raising=False)
  cli.quiet_tensorflow_startup()  # under pytest: no filtering, TensorFlow already imported
  assert os.environ[cli.LOG_LEVEL_VARIABLE] == "2"
  monkeypatch.setenv(cli.LOG_LEVEL_VARIABLE, "0")
  cli.quiet_tensorflow_startup()
  assert os.environ[cli.LOG_LEVEL_VARIABLE] == "0"  # the user's value wins


def _train_with_missing_data(level: str | None, tmp_path) -> subprocess.Popen:
  """`python -m tfmochi.train` on a data folder that does not exist: the flags are valid, so
  TensorFlow loads (and logs) before the data error ends the command with status 2."""
  env = {k: v for k, v in os.environ.items() if k != cli.LOG_LEVEL_VARIABLE}
  env["PYTHONPATH"] = REPO
  if level is not None:
    env[cli.LOG_LEVEL_VARIABLE] = level
  command = [sys.executable, "-m", "tfmochi.train", "--dataset=folder",
             f"--data_dir={tmp_path / 'missing'}", f"--model_dir={tmp_path / f'run{level}'}"]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_a_command_starts_without_tensorflow_logs_unless_asked(tmp_path):
  quiet = _train_with_missing_data(None, tmp_path)
  loud = _train_with_missing_data("0", tmp_path)  # both at once: most of their time is TF's import
  _, quiet_err = quiet.communicate(timeout=300)
  _, loud_err = loud.communicate(timeout=300)
  assert quiet.returncode == 2 and loud.returncode == 2
  assert quiet_err.strip().splitlines() == [
      f"tfmochi.train: error: --dataset=folder: data_dir {tmp_path / 'missing'} does not exist "
      "or is not a folder."], quiet_err
  assert "does not exist" in loud_err
  if not C_LOG_LINE.search(loud_err):
    pytest.skip("TensorFlow logs nothing at start-up on this machine")
