"""Tests of the `python -m tfmochi.train` command: clear errors without tracebacks, exit codes,
and `configs/tpu.flags` run end to end on the CPU stand-ins of the scale tfmochi exists for.

The stand-ins (no TPU, GPU or bucket here):
  * a Cloud TPU VM: the flag file as it is, with `--jit_compile=true` on one device (the whole
    per-replica step, forward, backward, SGD and queue write, compiled by XLA as TPUStrategy
    compiles it) and `--model_dir=ram://...` (TensorFlow's in-memory file system goes through the
    same tf.io.gfile layer as gs://, and has no atomic rename either);
  * an 8-GPU node: the same flag file with `--strategy=mirrored --cpu_replicas=8` (8 logical CPU
    devices), killed with SIGKILL and resumed by running the same command again;
  * ImageNet shards in a bucket: TFRecord files of real JPEG bytes (crops of scikit-learn's two
    sample photographs) in the ImageNet layout, labels 1..N.
Only size and placement flags are overridden (architecture, image size, batch, queue, MoCHi's
counts, steps, strategy, paths); the recipe, bfloat16, TFRecord input and the kNN monitor's
bounds are the flag file's.
"""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from absl import flags
import numpy as np
import tensorflow as tf

import conftest  # the tests' shared set-up (tests/conftest.py)
import testdata  # tests/testdata.py

from tfmochi import analyze
from tfmochi import build
from tfmochi import config as config_lib
from tfmochi import evaluate
from tfmochi import export
from tfmochi import hooks
from tfmochi import rundir
from tfmochi import runfiles
from tfmochi import train
from tfmochi import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(args, timeout=120, env=None):
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "tfmochi.train"] + args, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=full_env)
  return proc, time.time() - start


def train_in_process(args):
  """(exit status, stderr) of `python -m tfmochi.train *args`, run in this process."""
  flag_values = flags.FlagValues()
  config_lib.define_flags(flag_values)
  flag_values(["tfmochi.train", *args])
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    code = train.train_from_flags(flag_values)
  return code, stderr.getvalue()


class TrainCommandTest(tf.test.TestCase):

  def test_mochi_flagfile_without_imagenet_stops_with_instructions(self):
    tmp = self.create_tempdir().full_path
    proc, seconds = run_train(["--flagfile=configs/mochi.flags", f"--data_dir={tmp}/tfds",
                               f"--model_dir={tmp}/run"])
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn("ILSVRC2012_img_train.tar", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertLess(seconds, 60)  # seconds, not a download attempt or a device set-up
    self.assertFalse(os.path.exists(f"{tmp}/run/checkpoints"))

  def test_bad_flag_values(self):
    # In this process, through the command's own `train_from_flags` (the subprocess cases above
    # and below prove the wiring from `python -m` to it: exit status 2, no traceback).
    tmp = self.create_tempdir().full_path
    for args, message in (
        (["--queue_size=100"], "--queue_size (K) must be a multiple of the global batch size 64"),
        (["--dataset=imagenet3000"], "imagenet3000"),
        (["--mochi_num_hard=8", "--mochi_num_mix=4", "--mochi_beta_max=0.9"], "(0, 0.5]"),
    ):
      code, stderr = train_in_process(args + [f"--model_dir={tmp}/run"])
      self.assertEqual(code, 2, args)
      self.assertIn("tfmochi.train: error:", stderr, args)
      self.assertIn(message, stderr, args)
    self.assertFalse(os.path.exists(f"{tmp}/run"))

  def test_unwritable_model_dir(self):
    tmp = self.create_tempdir().full_path
    blocker = os.path.join(tmp, "file")
    open(blocker, "w").close()  # a file where a directory should be: not writable as a dir
    code, stderr = train_in_process([f"--model_dir={blocker}/run", "--train_steps=1"])
    self.assertEqual(code, 2)
    self.assertIn("is not writable", stderr)

  def test_help_lists_the_flags(self):
    proc = subprocess.run([sys.executable, "-m", "tfmochi.train", "--helpfull"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    for flag in ("--mochi_num_hard", "--bn_mode", "--label_mode", "--knn_every_epochs"):
      self.assertIn(flag, proc.stdout)


# --------------------------------------------------------------------------------------------
# configs/tpu.flags on the stand-ins

# Size and placement only: everything else comes from configs/tpu.flags (and mochi.flags).
_SIZE = ["--arch=resnet10_tiny", "--image_size=16", "--batch_size=16", "--queue_size=64",
         "--embedding_dim=16", "--mochi_num_hard=8", "--mochi_num_mix=4",
         "--mochi_num_query_mix=2", "--mochi_warmup_epochs=0.5", "--train_steps=8",
         "--steps_per_loop=2", "--checkpoint_every_steps=2", "--export_format=none"]
_CLASSES = 4


def tpu_flags_config(*overrides: str) -> config_lib.TrainConfig:
  """configs/tpu.flags parsed as `python -m tfmochi.train` parses it, plus `overrides`."""
  cwd = os.getcwd()
  os.chdir(ROOT)  # its nested --flagfile=configs/mochi.flags is relative to the repository root
  try:
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["prog", "--flagfile=configs/tpu.flags", *overrides])
    return config_lib.from_flags(fv)
  finally:
    os.chdir(cwd)


def _remove_quietly(path: str) -> None:
  """ram:// can refuse to delete a root it listed a moment ago; its memory goes with the process."""
  try:
    tf.io.gfile.rmtree(path)
  except tf.errors.OpError:
    pass


class _TerminateAt(hooks.Hook):
  """Sends this process a SIGTERM (a Spot TPU's preemption notice) once a block ends at `step`."""

  def __init__(self, step: int):
    self.step = step

  def after_block(self, block: hooks.Block) -> None:
    if block.step == self.step:
      os.kill(os.getpid(), signal.SIGTERM)


@testdata.needs_host_xla
class TPUStandInTest(tf.test.TestCase):
  """configs/tpu.flags, XLA-compiled replica step, ImageNet TFRecords, model_dir in ram://."""

  @pytest.mark.heavy
  def test_jit_run_in_ram_resumes_evaluates_exports_analyzes(self):
    conftest.no_rename_on_object_stores(self)
    shards = testdata.write_imagenet_tfrecords(self.create_tempdir().full_path,
                                               num_classes=_CLASSES)
    cwd = os.getcwd()
    scratch = self.create_tempdir().full_path
    os.chdir(scratch)  # whatever a path mix-up writes locally would land here
    self.addCleanup(os.chdir, cwd)
    stale_exports = set(os.listdir(tempfile.gettempdir()))
    bucket = f"ram://tfmochi-tpu-{uuid.uuid4().hex[:8]}"
    self.addCleanup(_remove_quietly, bucket)
    model_dir = f"{bucket}/runs/mochi_tpu"
    config = tpu_flags_config(*_SIZE, "--strategy=default", "--tpu=", "--jit_compile=true",
                              f"--data_dir={shards}", f"--model_dir={model_dir}",
                              "--noverbose")
    self.assertEqual((config.dataset, config.mixed_precision, config.mochi_num_hard,
                      config.knn_train_per_class), ("tfrecord", "bfloat16", 8, 50))

    # 1. Train; a SIGTERM (a Spot TPU's preemption notice) after step 4, in this process because
    # ram:// lives in one process.
    first = trainer.Trainer(config, hooks=[_TerminateAt(4)])
    self.assertTrue(first.jit_compile)
    self.assertEqual(first.run(), {"preempted": True, "global_step": 4})
    self.assertEqual(rundir.checkpoint_step(rundir.RunDir(model_dir).list_checkpoints()[0]), 4)

    # 2. The same command again resumes at step 4 and ends at 8 (MoCHi from step 2 on).
    second = trainer.Trainer(config)
    summary = second.run()
    self.assertEqual(summary["global_step"], 8)
    self.assertEqual(summary["skipped_steps"], 0)
    self.assertGreater(summary["knn_top1"], 100.0 / _CLASSES)
    self.assertEqual((summary["knn_num_train"], summary["knn_num_test"]), (48, 12))
    records = [json.loads(line) for line in
               rundir.read_text(f"{model_dir}/{runfiles.METRICS_FILE}").splitlines()]
    self.assertEqual([r["step"] for r in records], [2, 4, 6, 8])
    for r in records:
      self.assertTrue(np.isfinite(r["loss"]), r)

    # 3. Evaluate the newest checkpoint (kNN) from the bucket.
    result = evaluate.evaluate_checkpoint(model_dir, evaluate.EvalSettings(mode="knn"))
    self.assertEqual(result["checkpoint_step"], 8)
    self.assertEqual(rundir.read_json(evaluate.eval_json_path(model_dir, "knn"))["top1"],
                     result["top1"])

    # 4. Analyze the negatives of the run into the bucket.
    analysis = f"{model_dir}/analysis"
    analyze.analyze_run(model_dir, analysis, num_queries=16, queue_size=32, batch_size=16)
    self.assertTrue(rundir.is_complete(analysis, analyze.REPORT_FILE))

    # 5. Export: resnet10_tiny has no torchvision counterpart, so the same run at resnet18 (16 px)
    # in the same bucket, its checkpoint written as the trainer writes one, exports a SavedModel.
    run18 = f"{bucket}/runs/mochi_tpu_r18"
    config18 = dataclasses.replace(config, model_dir=run18, arch="resnet18",
                                   export_format="saved_model")
    rundir.write_json(f"{run18}/{runfiles.CONFIG_FILE}", dataclasses.asdict(config18))
    encoder = build.build_run_encoder(config18, "query_encoder")
    tf.train.CheckpointManager(
        tf.train.Checkpoint(step=tf.Variable(8, dtype=tf.int64), query_encoder=encoder),
        rundir.RunDir(run18).checkpoint_dir, max_to_keep=1).save(checkpoint_number=8)
    out, info = export.export_run(run18, fmt="saved_model")
    self.assertEqual(export.load_export_info(out)["files"], info["files"])
    images = np.random.default_rng(0).integers(0, 256, [2, 16, 16, 3], dtype=np.uint8)
    served = tf.saved_model.load(out).signatures["serving_default"](images=tf.constant(images))
    self.assertEqual(served["embedding"].shape, (2, 512))

    # Every file is in the bucket, none went to the local disk in its stead, no temp file left.
    for name in ("config.json", "checkpoints/checkpoint", "checkpoints/ckpt-8.index",
                 "metrics.jsonl", "summary.json", "eval_knn.json", "knn_random_init.json"):
      self.assertTrue(tf.io.gfile.exists(f"{model_dir}/{name}"), name)
    self.assertNotEmpty(tf.io.gfile.glob(f"{model_dir}/train/events.out.tfevents.*"))
    self.assertEqual(os.listdir(scratch), [])
    self.assertEqual({n for n in os.listdir(tempfile.gettempdir())
                      if n.startswith("tfmochi-export-")} - stale_exports, set())
    for root in (model_dir, run18):
      for depth in range(3):
        self.assertEqual(tf.io.gfile.glob(root + "/*" * depth + "/*.tmp*"), [])


class EightGPUStandInTest(tf.test.TestCase):
  """configs/tpu.flags with --strategy=mirrored --cpu_replicas=8: killed (SIGKILL), resumed.

  MoCo v2 on the flag file (docs/TPU.md's four MoCHi flags set to 0) and no kNN monitor, for
  time: MoCHi's synthesis is its own XLA cluster, compiled once per device (8 compiles on 2
  cores), and 8 replicas of a monitor pass add minutes on 2 cores. MoCHi and the monitor across
  replicas are covered by the 2-replica equality and trainer tests.
  """

  def _command(self, *args):
    return [sys.executable, "-m", "tfmochi.train", "--flagfile=configs/tpu.flags", *_SIZE,
            "--mochi_num_hard=0", "--mochi_num_mix=0", "--mochi_num_query_mix=0",
            "--mochi_warmup_epochs=0", "--strategy=mirrored", "--cpu_replicas=8", "--tpu=",
            "--bn_mode=shuffle", "--noknn_eval", *args]

  @pytest.mark.heavy
  def test_eight_replicas_killed_and_resumed(self):
    tmp = self.create_tempdir().full_path
    shards = testdata.write_imagenet_tfrecords(self.create_tempdir().full_path,
                                               num_classes=_CLASSES)
    model_dir = os.path.join(tmp, "run")
    command = self._command(f"--data_dir={shards}", f"--model_dir={model_dir}",
                            "--checkpoint_every_steps=2")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    log = open(os.path.join(tmp, "first.log"), "w")
    self.addCleanup(log.close)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    self.addCleanup(proc.kill)
    deadline = time.time() + 600  # a hang guard: the first 8-replica trace takes minutes here
    # Wait for a checkpoint the run's state lists, not just its .index file: a kill between
    # the two (the data is written before the state names it) leaves a run with nothing to
    # resume from, which is correct but not what this test is about.
    while not rundir.RunDir(model_dir).list_checkpoints():
      self.assertIsNone(proc.poll(), open(log.name).read()[-3000:])
      self.assertLess(time.time(), deadline, "no checkpoint within 600 s")
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no notice: the newest checkpoint is all that survives
    proc.wait()
    killed_at = rundir.checkpoint_step(rundir.RunDir(model_dir).list_checkpoints()[0])
    self.assertLess(killed_at, 8)

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    self.assertIn("Resumed from", rerun.stdout)
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    self.assertEqual((summary["global_step"], summary["replicas"]), (8, 8))

    # The 8-replica run's checkpoint restores and evaluates (kNN) on one device. Evaluation over
    # replicas is tests/test_evaluate_features.py's (2 replicas): 8 replicas would add a minute
    # of tracing on 2 cores and prove nothing more.
    result = evaluate.evaluate_checkpoint(model_dir, evaluate.EvalSettings(mode="knn"))
    self.assertEqual(result["checkpoint_step"], 8)
    self.assertGreater(result["top1"], 100.0 / _CLASSES)


if __name__ == "__main__":
  tf.test.main()
