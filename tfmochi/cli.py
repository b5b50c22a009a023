"""The command-line plumbing shared by tfmochi's `python -m` tools (evaluate, analyze, compare).

Every tool ends a bad invocation the same way: one line `tfmochi.<tool>: error: <message>` on
stderr and exit status 2, without a traceback, whether the flag parser (e.g. `--knn_k=abc`), the
tool's own argument checks or the library (a missing run, unlabelled data) found the problem.
absl FLAGS are read only here and by the tools' `main`, never by library code. Importing this
module does not import TensorFlow (the sweep driver `tfmochi.compare` runs without it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import logging


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
