"""Test-session set-up shared by every test module.

The CPU is split into eight logical devices before TensorFlow initialises its runtime, so that
multi-replica tests can run `distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])` (or all eight: an
8-GPU node) in the same process as single-device tests (which keep using "/cpu:0"). Nothing picks
"every device" by default: strategies name their devices, and `MirroredStrategy()` without GPUs
uses the CPU only once. This must happen before any op runs,
hence a conftest (imported by pytest before the test modules).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmochi import distribute as _distribute  # noqa: E402

_distribute.configure_cpu_replicas(8)

# tf.test.TestCase helpers (create_tempdir, get_temp_dir) read absl flags; pytest never parses
# them, so mark them parsed with their defaults.
from absl import flags as _flags  # noqa: E402

if not _flags.FLAGS.is_parsed():
  _flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True)
def _process_wide_precision_restored():
  """A Trainer sets Keras' global dtype policy and TF32 for its whole process
  (build.set_precision); a test after a bfloat16 run in the same process (xdist worker) would
  otherwise build its models in bfloat16, e.g. test_export's references after TPUStandInTest."""
  policy = keras.config.dtype_policy()
  tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
  yield
  keras.config.set_dtype_policy(policy)
  tf.config.experimental.enable_tensor_float_32_execution(tf32)


def no_rename_on_object_stores(test) -> None:
  """gs:// has no atomic rename: for the rest of `test`, any rename of a ram:// path fails it."""
  original = tf.io.gfile.rename

  def rename(src, dst, overwrite=False):
    if "://" in src or "://" in dst:
      raise AssertionError(f"rename on an object store: {src} -> {dst}")
    return original(src, dst, overwrite)

  tf.io.gfile.rename = rename
  test.addCleanup(setattr, tf.io.gfile, "rename", original)


def pytest_configure(config) -> None:
  config.addinivalue_line(
      "markers", "heavy: a test that runs for minutes (whole runs in subprocesses); started first")


def pytest_collection_modifyitems(session, config, items) -> None:
  """Heavy tests first, so that pytest-xdist spreads them over its workers from the start
  instead of leaving one of them to finish a long test alone at the end of the suite."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: else file order
