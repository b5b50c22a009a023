"""Tests of tfmochi.hooks: each hook of the training loop on hand-made blocks (no training)."""

import contextlib
import io
import json
import os
import signal

import tensorflow as tf

from tfmochi import hooks
from tfmochi import rundir
from tfmochi import runfiles


def _block(step, steps=3, **kw):
  values = dict(step=step, steps=steps, seconds=0.5, lr=0.03, batch_size=16,
                metrics={"loss": 7.5, "acc1": 0.25},
                counts={"skipped_steps": 0, "loss_scale_skipped_steps": 0})
  values.update(kw)
  return hooks.Block(**values)


class BlockTest(tf.test.TestCase):

  def test_values_add_lr_and_speed(self):
    block = _block(6)
    self.assertEqual(block.images_per_sec, 3 * 16 / 0.5)
    self.assertEqual(block.values, {"loss": 7.5, "acc1": 0.25, "lr": 0.03,
                                    "images_per_sec": 96.0})
    self.assertEqual(hooks.format_time(3725.9), "1:02:05")
    self.assertEqual(hooks.format_time(float("nan")), "?")


class NonFiniteHookTest(tf.test.TestCase):

  def test_stop_names_the_step_and_the_kept_checkpoint(self):
    hook = hooks.NonFiniteHook("stop", lambda: ["run/checkpoints/ckpt-3"])
    hook.after_block(_block(6))  # all finite: nothing happens
    with self.assertRaisesRegex(hooks.TrainingError,
                                r"The gradient became non-finite .* at step 4\..*ckpt-3"):
      hook.after_block(_block(6, first_nonfinite_step=4))
    with self.assertRaisesRegex(hooks.TrainingError, r"The loss .*none was written yet"):
      hooks.NonFiniteHook("stop", list).after_block(
          _block(6, first_nonfinite_step=4, nonfinite_loss=True))

  def test_skip_goes_on(self):
    hooks.NonFiniteHook("skip", list).after_block(_block(6, first_nonfinite_step=4))


class MetricsHookTest(tf.test.TestCase):

  def test_one_record_per_block_and_totals(self):
    records = []
    writer = tf.summary.create_file_writer(self.create_tempdir().full_path)
    hook = hooks.MetricsHook(writer, records.append)
    hook.begin()
    self.assertIsNone(hook.images_per_sec)
    hook.after_block(_block(3))
    hook.after_block(_block(6, seconds=1.5))
    self.assertEqual([r["step"] for r in records], [3, 6])
    self.assertEqual(list(records[0]), ["step", "loss", "acc1", "lr", "images_per_sec",
                                        "skipped_steps", "loss_scale_skipped_steps", "rss_mb"])
    self.assertGreater(records[0]["rss_mb"], 10.0)
    self.assertEqual(hook.last["images_per_sec"], 32.0)
    self.assertEqual(hook.images_per_sec, 96 / 2.0)
    self.assertGreaterEqual(hook.wall_seconds, 0.0)

  def test_off_the_chief_nothing_is_logged(self):
    hook = hooks.MetricsHook(tf.summary.create_noop_writer(), None)
    hook.after_block(_block(3))
    self.assertEqual(hook.last["loss"], 7.5)


class ProgressHookTest(tf.test.TestCase):

  def test_one_line_per_block(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      hook = hooks.ProgressHook(total=6, start=0, enabled=True, show_skipped=True)
      hook.begin()
      hook.after_block(_block(3))
      hooks.ProgressHook(total=6, start=0, enabled=False).after_block(_block(3))
    line, = out.getvalue().splitlines()
    self.assertRegex(line, r"^step 3/6 \[={12}\.{12}\] ETA \S+ loss 7\.5 acc1 25 lr 0\.03 "
                           r"img/s 96 skipped 0$")


class _Manager:
  def __init__(self):
    self.saved = []

  def save(self, checkpoint_number):
    self.saved.append(checkpoint_number)


class CheckpointHookTest(tf.test.TestCase):

  def test_every_n_steps_at_the_end_and_before_a_stop(self):
    manager, stop = _Manager(), []
    hook = hooks.CheckpointHook(manager, every=4, total=10, stop_requested=lambda: bool(stop))
    self.assertEqual((hook.boundary(0), hook.boundary(4), hook.boundary(5)), (4, 8, 8))
    for step in (3, 4, 7):
      hook.after_block(_block(step))
    stop.append(True)
    hook.after_block(_block(9))
    stop.clear()
    hook.after_block(_block(10))
    hook.save(10)  # the end of training saves again: the same step is not written twice
    self.assertEqual(manager.saved, [4, 9, 10])
    self.assertEqual(hook.last_saved_step, 10)

  def test_metrics_are_flushed_with_each_checkpoint(self):
    path = f"ram://tfmochi-hooks-{os.getpid()}/metrics.jsonl"
    self.addCleanup(rundir.remove, os.path.dirname(path))
    hook = hooks.CheckpointHook(_Manager(), every=2, total=4, stop_requested=lambda: False)
    hook.metrics = rundir.MetricsLog(path)  # an object store: rewritten at checkpoints only
    hook.metrics.append({"step": 1})
    self.assertFalse(tf.io.gfile.exists(path))
    hook.after_block(_block(2))
    self.assertEqual(json.loads(rundir.read_text(path)), {"step": 1})


class PreemptionHookTest(tf.test.TestCase):

  def test_sigterm_sets_the_flag_until_the_handlers_are_restored(self):
    hook = hooks.PreemptionHook("default")
    previous = signal.getsignal(signal.SIGTERM)
    hook.start(lambda: hook.make_handler(None, None, None))
    self.assertIsNone(hook.handler)  # one device: the flag alone
    self.assertFalse(hook.stop_requested())
    os.kill(os.getpid(), signal.SIGTERM)
    self.assertTrue(hook.stop_requested())
    self.assertEqual(hook.signal_name, "SIGTERM")
    self.assertEqual(hook.run(lambda a, b: a + b, 1, 2), 3)
    hook.after_block(_block(3))
    hook.restore_signals()
    hook.close()
    self.assertIs(signal.getsignal(signal.SIGTERM), previous)

  def test_multi_worker_stops_only_through_the_cluster_handler(self):
    hook = hooks.PreemptionHook("multi_worker")
    hook.requested = True
    self.assertFalse(hook.stop_requested())

  def test_cluster_error_reason_drops_the_python_stack(self):
    heartbeat = ("Graph execution error:\n\nDetected at node while/CollectiveReduceV2 defined at "
                 "(most recent call last):\n  File \"<frozen runpy>\", line 198, in _run\n\n"
                 "Collective ops is aborted by: Error reported from /job:worker/task:1: The "
                 "following tasks are unhealthy (stopped sending heartbeats):\n"
                 "/job:worker/replica:0/task:1\nThe tasks have crashed.\n"
                 "\t [[{{node while/CollectiveReduceV2}}]] [Op:__inference_loop_1]")
    self.assertEqual(
        hooks.cluster_error_reason(tf.errors.UnavailableError(None, None, heartbeat)),
        "Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped "
        "sending heartbeats): /job:worker/replica:0/task:1")
    reset = "Graph execution error:\n\nrecvmsg:Connection reset by peer\n\t [[{{node x}}]]"
    self.assertEqual(hooks.cluster_error_reason(tf.errors.UnavailableError(None, None, reset)),
                     "recvmsg:Connection reset by peer")


def _knn_result(top1, **kw):
  return dict(top1=top1, top5=99.0, k=14, t=0.1, num_train=1497, num_test=300, seconds=6.1, **kw)


class KnnMonitorHookTest(tf.test.TestCase):

  def _hook(self, run_dir, calls, **kw):
    def evaluate(raw_pixels=False):
      calls.append(raw_pixels)
      return _knn_result(10.0 * len(calls), **({"raw_pixels_top1": 96.7}
                                               if raw_pixels is None else {}))

    cost = {"images": 300, "train_images": 200, "test_images": 100, "epoch_fraction": 0.1}
    values = dict(final=True, every=4, total=10, run_dir=run_dir, chief=True,
                  writer=tf.summary.create_noop_writer(),
                  progress=hooks.ProgressHook(10, 0, False), verbose=True)
    values.update(kw)
    return hooks.KnnMonitorHook(evaluate, lambda: dict(cost), **values)

  def test_random_init_during_and_at_the_end(self):
    run_dir, calls = rundir.RunDir(self.create_tempdir().full_path), []
    hook = self._hook(run_dir, calls)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      hook.before_training(0)
      self.assertEqual((hook.boundary(0), hook.boundary(5)), (4, 8))
      for step in (2, 4, 6):
        hook.after_block(_block(step, steps=2))
      hook.end()
      hook.report()
    self.assertEqual(calls, [None, False, False])  # raw pixels once, with random init
    self.assertEqual(run_dir.read(runfiles.KNN_RANDOM_INIT_FILE)["top1"], 10.0)
    self.assertEqual((hook.result["top1"], hook.raw_pixels_top1), (30.0, 96.7))
    text = out.getvalue()
    self.assertIn("kNN monitor: 300 images per pass (200 train, 100 held out)", text)
    self.assertIn("kNN top-1 at random init: 10.00% (raw pixels 96.70%; k=14", text)
    # The estimate comes from the second block (the first one traces the loop).
    self.assertIn("kNN monitor: about 2 s per pass at 64 training images/s.", text)
    self.assertIn("kNN top-1 20.00% top-5 99.00% at step 4", text)
    self.assertIn("Final kNN top-1 on the held-out split: 30.00% (random init 10.00%, raw "
                  "pixels 96.70%", text)

  def test_a_resumed_run_reads_its_random_init_result(self):
    run_dir, calls = rundir.RunDir(self.create_tempdir().full_path), []
    run_dir.write(runfiles.KNN_RANDOM_INIT_FILE, _knn_result(12.5))
    hook = self._hook(run_dir, calls, every=0, verbose=False)
    hook.before_training(4)
    self.assertIsNone(hook.boundary(4))
    hook.after_block(_block(8))
    hook.end()
    self.assertEqual(calls, [None])  # the raw-pixel baseline the random-init pass lacked
    self.assertEqual((hook.random["top1"], hook.raw_pixels_top1), (12.5, 96.7))

  def test_off(self):
    run_dir, calls = rundir.RunDir(self.create_tempdir().full_path), []
    hook = self._hook(run_dir, calls, final=False, every=0)
    self.assertIsNone(hook.cost)
    hook.before_training(0)
    hook.end()
    self.assertEqual((calls, hook.result, hook.random), ([], None, None))


if __name__ == "__main__":
  tf.test.main()
