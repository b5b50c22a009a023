"""Tests of tfmochi.rundir: a run directory on an object store, with ram:// standing in for gs://.

TensorFlow's in-memory file system (ram://) goes through the same tf.io.gfile layer as gs://,
and lives in one process. The end-to-end run (train, a SIGTERM to this process, resume, evaluate,
export, analyze, all in ram://) is tests/test_train.py's TPUStandInTest, on configs/tpu.flags.
"""

import json
import os
import uuid

import tensorflow as tf

import conftest  # the tests' shared set-up (tests/conftest.py)
from tfmochi import analyze
from tfmochi import config as config_lib
from tfmochi import evaluate
from tfmochi import export
from tfmochi import models
from tfmochi import rundir
from tfmochi import runfiles
from tfmochi import trainer


def _ram_dir(test, name="run"):
  root = f"ram://tfmochi-test-{uuid.uuid4().hex[:8]}"
  test.addCleanup(lambda: tf.io.gfile.rmtree(root) if tf.io.gfile.exists(root) else None)
  return f"{root}/{name}"


class WholeFilesTest(tf.test.TestCase):

  def test_object_store_file_is_one_write_without_rename(self):
    conftest.no_rename_on_object_stores(self)
    directory = _ram_dir(self)
    path = f"{directory}/sub/summary.json"
    rundir.write_json(path, {"global_step": 6})
    rundir.write_json(path, {"global_step": 8})  # replaced whole
    self.assertEqual(rundir.read_json(path), {"global_step": 8})
    self.assertEqual(tf.io.gfile.listdir(f"{directory}/sub"), ["summary.json"])  # no temp files

  def test_local_file_is_renamed_into_place(self):
    directory = self.create_tempdir().full_path
    path = os.path.join(directory, "config.json")
    rundir.write_text(path, "old\n")
    renamed = []
    original = os.replace

    def rename(src, dst):  # runfiles.write_local, the local branch of rundir.write_bytes
      renamed.append((os.path.basename(src), os.path.basename(dst)))
      with open(dst) as f:
        self.assertEqual(f.read(), "old\n")  # the old content stays until the rename
      return original(src, dst)

    os.replace = rename
    self.addCleanup(setattr, os, "replace", original)
    rundir.write_text(path, "new\n")
    self.assertEqual(open(path).read(), "new\n")
    self.assertLen(renamed, 1)
    self.assertStartsWith(renamed[0][0], "config.json.tmp-")
    self.assertEqual(os.listdir(directory), ["config.json"])

  def test_marker_makes_a_directory_complete(self):
    directory = _ram_dir(self, "analysis")
    rundir.begin_directory(directory, "report.json")
    self.assertFalse(rundir.is_complete(directory, "report.json"))
    rundir.write_bytes(f"{directory}/a/plot.png", b"png")
    rundir.write_json(f"{directory}/report.json", {})
    self.assertTrue(rundir.is_complete(directory, "report.json"))
    self.assertEqual(rundir.list_files(directory), ["a/plot.png", "report.json"])
    rundir.begin_directory(directory, "report.json")  # a rewrite starts: incomplete again
    self.assertFalse(rundir.is_complete(directory, "report.json"))
    self.assertEqual(rundir.list_files(directory), ["a/plot.png"])


class MetricsLogTest(tf.test.TestCase):

  def test_object_store_rewrites_the_whole_file_at_each_flush(self):
    path = f"{_ram_dir(self)}/metrics.jsonl"
    log = rundir.MetricsLog(path)
    log.append({"step": 2})
    log.append({"step": 4})
    self.assertFalse(tf.io.gfile.exists(path))  # written at checkpoints, not per line
    log.flush()
    log.append({"step": 6})
    log.flush()
    lines = rundir.read_text(path).splitlines()
    self.assertEqual([json.loads(line)["step"] for line in lines], [2, 4, 6])
    # A run resumed from step 4 continues the records up to its checkpoint, no duplicates.
    resumed = rundir.MetricsLog(path, resume_step=4)
    resumed.append({"step": 6, "again": True})
    resumed.flush()
    records = [json.loads(line) for line in rundir.read_text(path).splitlines()]
    self.assertEqual([r["step"] for r in records], [2, 4, 6])
    self.assertTrue(records[-1]["again"])

  def test_local_disk_appends_each_line(self):
    path = os.path.join(self.create_tempdir().full_path, "metrics.jsonl")
    log = rundir.MetricsLog(path)
    log.append({"step": 2})
    self.assertEqual(open(path).read(), '{"step": 2}\n')
    log.flush()
    log.append({"step": 4})
    self.assertLen(open(path).readlines(), 2)


class UnusableLocationTest(tf.test.TestCase):

  def test_unknown_file_system(self):
    with self.assertRaisesRegex(rundir.RunDirError,
                                r"--model_dir nosuch://bucket/run is not writable \(File system "
                                r"scheme 'nosuch' not implemented.*no file system for nosuch://"):
      rundir.check_writable("nosuch://bucket/run")

  def test_trainer_refuses_an_unwritable_model_dir_with_one_message(self):
    blocker = os.path.join(self.create_tempdir().full_path, "file")
    open(blocker, "w").close()  # a file where a directory should be: a read-only location
    for model_dir, reason in (("nosuch://bucket/run", "no file system for nosuch://"),
                              (f"{blocker}/run", "choose a directory you can write to")):
      config = config_lib.TrainConfig(model_dir=model_dir, arch="resnet10_tiny",
                                      export_format="none", knn_eval=False, verbose=False)
      with self.assertRaisesRegex(config_lib.ConfigError, f"is not writable.*{reason}"):
        trainer.Trainer(config)

  def test_unreadable_run_for_evaluate_export_analyze(self):
    # Their command lines turn a CheckpointError into one line and exit status 2.
    with self.assertRaisesRegex(rundir.CheckpointError,
                                "nosuch://bucket/run/config.json cannot be read .*no file system"):
      rundir.RunDir("nosuch://bucket/run").read_config()
    run = "nosuch://bucket/run"
    with self.assertRaisesRegex(rundir.CheckpointError, "cannot be read"):
      export.export_run(run)
    with self.assertRaisesRegex(rundir.CheckpointError, "cannot be read"):
      evaluate.evaluate_checkpoint(run, evaluate.EvalSettings(mode="knn"))
    with self.assertRaisesRegex(rundir.CheckpointError, "cannot be read"):
      analyze.analyze_run(run, self.create_tempdir().full_path)
    with self.assertRaisesRegex(analyze.AnalyzeError, "--output_dir .* is not writable"):
      analyze.analyze_run(run, f"{run}/analysis")


class CheckpointsOnObjectStoreTest(tf.test.TestCase):
  """tf.train.CheckpointManager on ram://: the `checkpoint` state file is written last."""

  def _run(self, steps=(2, 4)):
    model_dir = _ram_dir(self)
    v = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v),
                                         rundir.RunDir(model_dir).checkpoint_dir, max_to_keep=3)
    for n in steps:
      v.assign(float(n))
      manager.save(checkpoint_number=n)
    return model_dir, v

  def _restored(self, model_dir):
    v = tf.Variable(-1.0)
    path = rundir.RunDir(model_dir).restore(tf.train.Checkpoint(v=v))
    return rundir.checkpoint_step(path), float(v.numpy())

  def test_truncated_newest_falls_back(self):
    model_dir, _ = self._run()
    directory = rundir.RunDir(model_dir).checkpoint_dir
    data = [n for n in tf.io.gfile.listdir(directory) if n.startswith("ckpt-4.data")][0]
    rundir.write_bytes(f"{directory}/{data}", b"\0" * 3)  # a half-uploaded object
    with self.assertLogs(level="WARNING") as logs:
      self.assertEqual(self._restored(model_dir), (2, 2.0))
    self.assertTrue(any("ckpt-4" in line for line in logs.output))

  def test_missing_files_of_the_newest_are_skipped(self):
    model_dir, _ = self._run()
    tf.io.gfile.remove(f"{rundir.RunDir(model_dir).checkpoint_dir}/ckpt-4.index")
    self.assertEqual([rundir.checkpoint_step(p) for p in
                      rundir.RunDir(model_dir).list_checkpoints()], [2])
    self.assertEqual(self._restored(model_dir), (2, 2.0))

  def test_a_save_interrupted_before_the_state_file_is_not_chosen(self):
    model_dir, v = self._run()
    # ckpt-6's files are complete, but the save stopped before the state file named it.
    v.assign(6.0)
    tf.train.Checkpoint(v=v).write(f"{rundir.RunDir(model_dir).checkpoint_dir}/ckpt-6")
    self.assertEqual(self._restored(model_dir), (4, 4.0))

  def test_no_state_file_means_no_checkpoint_yet(self):
    model_dir, _ = self._run(steps=(2,))
    tf.io.gfile.remove(f"{rundir.RunDir(model_dir).checkpoint_dir}/checkpoint")
    self.assertEqual(rundir.RunDir(model_dir).list_checkpoints(), [])
    self.assertIsNone(rundir.RunDir(model_dir).restore(tf.train.Checkpoint(v=tf.Variable(0.))))


class RunDirTest(tf.test.TestCase):
  """Listing a run's checkpoints, its JSON files, a restore that finds nothing readable."""

  def _run_dir(self):
    root = self.create_tempdir().full_path
    manager = rundir.RunDir(os.path.join(root, "run")).checkpoint_manager(
        tf.train.Checkpoint(step=tf.Variable(0)), max_to_keep=3)
    for n in (2, 4):
      manager.save(checkpoint_number=n)
    return root

  def test_absolute_model_dir(self):
    root = self._run_dir()
    got = rundir.RunDir(os.path.join(root, "run")).list_checkpoints()
    self.assertEqual([rundir.checkpoint_step(p) for p in got], [4, 2])
    self.assertTrue(all(os.path.exists(p + ".index") for p in got))

  def test_relative_model_dir(self):
    # The quickstart's --model_dir=runs/quickstart is relative: its checkpoints (and so resume,
    # evaluate, export, analyze) must be found, not joined to the directory a second time.
    root = self._run_dir()
    cwd = os.getcwd()
    os.chdir(root)
    try:
      got = rundir.RunDir("run").list_checkpoints()
    finally:
      os.chdir(cwd)
    self.assertEqual(got, [os.path.join("run", "checkpoints", "ckpt-4"),
                           os.path.join("run", "checkpoints", "ckpt-2")])

  def test_other_workers_save_beside_the_chiefs_checkpoints(self):
    run_dir = rundir.RunDir(self.create_tempdir().full_path)
    manager = run_dir.checkpoint_manager(tf.train.Checkpoint(v=tf.Variable(1.0)), 1, worker=1)
    manager.save(checkpoint_number=3)
    self.assertEqual(run_dir.list_checkpoints(), [])
    self.assertEqual(rundir.checkpoint_step(tf.train.latest_checkpoint(
        run_dir.join("worker_tmp_1"))), 3)

  def test_json_files_and_a_missing_one(self):
    run_dir = rundir.RunDir(self.create_tempdir().full_path)
    self.assertIsNone(run_dir.read(runfiles.SUMMARY_FILE))
    run_dir.write(runfiles.SUMMARY_FILE, {"global_step": 6})
    self.assertEqual(run_dir.read(runfiles.SUMMARY_FILE), {"global_step": 6})

  def test_no_readable_checkpoint_names_each_reason(self):
    run_dir = rundir.RunDir(self.create_tempdir().full_path)
    run_dir.checkpoint_manager(tf.train.Checkpoint(v=tf.Variable(1.0)), 2).save(
        checkpoint_number=2)
    with self.assertRaisesRegex(rundir.CheckpointError,
                                r"No checkpoint in .* could be read into this model \(ckpt-2"):
      run_dir.restore(tf.train.Checkpoint(w=tf.Variable([1.0, 2.0])))


class ExportOnObjectStoreTest(tf.test.TestCase):

  def _backbone(self):
    return models.build_backbone("resnet18", small_stem=True)

  def test_interrupted_replacement_is_never_complete(self):
    conftest.no_rename_on_object_stores(self)
    out = f"{_ram_dir(self, 'export')}/torchvision"
    backbone = self._backbone()
    export.export_backbone(backbone, out, "torchvision", image_size=8, step=1)
    info = export.load_export_info(out)
    self.assertEqual(info["step"], 1)
    self.assertEqual(rundir.list_files(out), info["files"])
    original, copied = tf.io.gfile.copy, []

    def failing_copy(src, dst, overwrite=False):
      if copied:
        raise tf.errors.UnavailableError(None, None, "connection lost")
      copied.append(dst)
      return original(src, dst, overwrite)

    tf.io.gfile.copy = failing_copy
    try:
      with self.assertRaises(tf.errors.UnavailableError):
        export.export_backbone(backbone, out, "torchvision", image_size=8, step=2,
                               overwrite=True)
    finally:
      tf.io.gfile.copy = original
    with self.assertRaisesRegex(export.ExportError, "no export"):
      export.load_export_info(out)  # the partial upload was removed, never marked complete


if __name__ == "__main__":
  tf.test.main()
