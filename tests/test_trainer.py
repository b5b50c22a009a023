"""End-to-end tests of tfmochi.trainer: tiny runs on one device, 2 mirrored replicas, resume,
the imagenet2012 path under tfds mock data, label modes, non-finite handling."""

import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfmochi import checkpoints
from tfmochi import config as config_lib
from tfmochi import trainer

TINY = dict(dataset="quickstart", image_size=16, batch_size=16, queue_size=64, bn_splits=2,
            embedding_dim=16, train_steps=6, steps_per_loop=3, checkpoint_every_steps=3,
            export_format="none", verbose=False, learning_rate=0.03, knn_eval=False)


def tiny(model_dir, **kw):
  values = dict(TINY, model_dir=str(model_dir))
  values.update(kw)
  return config_lib.TrainConfig(**values)


class TrainerTest(tf.test.TestCase):

  def test_tiny_run_writes_everything(self):
    model_dir = self.create_tempdir().full_path
    summary = trainer.train(tiny(model_dir, mochi_num_hard=8, mochi_num_mix=4,
                                 mochi_num_query_mix=2, mochi_warmup_epochs=0.05, knn_eval=True))
    for key in ("global_step", "final_loss", "knn_top1", "images_per_sec", "wall_seconds",
                "knn_top1_random_init"):
      self.assertIn(key, summary)
    self.assertEqual(summary["global_step"], 6)
    self.assertTrue(np.isfinite(summary["final_loss"]))
    on_disk = json.load(open(os.path.join(model_dir, "summary.json")))
    self.assertEqual(on_disk["global_step"], 6)
    self.assertEqual([checkpoints.checkpoint_step(p) for p in
                      checkpoints.list_checkpoints(model_dir)], [6, 3])
    self.assertTrue(os.listdir(os.path.join(model_dir, "train")))  # TensorBoard events
    run_config = checkpoints.load_run_config(model_dir)
    self.assertEqual(run_config.mochi_num_hard, 8)

  def test_resume_continues_from_the_checkpoint(self):
    model_dir = self.create_tempdir().full_path
    trainer.train(tiny(model_dir, train_steps=3))
    t = trainer.Trainer(tiny(model_dir, train_steps=6))
    self.assertEqual(t.restore(), 3)
    queue_before = t.moco.queue.keys.numpy()
    self.assertFalse(np.allclose(queue_before[:48],
                                 trainer.Trainer(tiny(self.create_tempdir().full_path))
                                 .moco.queue.keys.numpy()[:48]))  # queue restored, not re-init
    summary = t.run()
    self.assertEqual(summary["global_step"], 6)

  def test_mirrored_two_replicas(self):
    model_dir = self.create_tempdir().full_path
    summary = trainer.train(tiny(model_dir, strategy="mirrored", cpu_replicas=2,
                                 bn_mode="shuffle"))
    self.assertEqual(summary["replicas"], 2)
    self.assertEqual(summary["global_step"], 6)
    self.assertTrue(np.isfinite(summary["final_loss"]))

  def test_imagenet_path_under_mock_data(self):
    model_dir = self.create_tempdir().full_path
    with tfds.testing.mock_data(num_examples=48):
      summary = trainer.train(tiny(model_dir, dataset="imagenet2012", train_steps=2,
                                   steps_per_loop=2, knn_every_epochs=0))
    self.assertEqual(summary["global_step"], 2)

  def test_oracle_mode_counts_removed_false_negatives(self):
    model_dir = self.create_tempdir().full_path
    t = trainer.Trainer(tiny(model_dir, label_mode="oracle", train_steps=8, steps_per_loop=8,
                             checkpoint_every_steps=8))
    loop = t._make_loop()
    out = loop(iter(t._dataset(0)), tf.constant(8))
    # 10 classes: after the queue holds real keys, ~1/10 of it shares the query's label.
    self.assertGreater(float(out["removed_same_class"]), 0.0)

  def _poison_step(self, bad_step):
    """Makes the query views NaN at one step: a corrupt batch, as a data bug would.

    (oneDNN's ReLU maps NaN to 0, so the loss may stay finite while the gradient is NaN: the
    trainer reports which of the two went non-finite.)"""
    original = trainer.Trainer._replica_step

    def poisoned(self_, batch):
      batch = dict(batch)
      nan_or_one = tf.where(tf.equal(self_.step, bad_step), float("nan"), 1.0)
      batch["view1"] = batch["view1"] * nan_or_one
      return original(self_, batch)

    trainer.Trainer._replica_step = poisoned
    self.addCleanup(setattr, trainer.Trainer, "_replica_step", original)

  def test_nonfinite_loss_stops_with_a_message_and_keeps_the_checkpoint(self):
    model_dir = self.create_tempdir().full_path
    trainer.train(tiny(model_dir, train_steps=3))
    self._poison_step(4)
    with self.assertRaisesRegex(trainer.TrainingError, r"(loss|gradient) became non-finite .* at step 4.*"
                                r"ckpt-3"):
      trainer.train(tiny(model_dir, train_steps=6))
    self.assertEqual(checkpoints.checkpoint_step(checkpoints.list_checkpoints(model_dir)[0]), 3)

  def test_nonfinite_skip_counts_steps(self):
    model_dir = self.create_tempdir().full_path
    self._poison_step(1)
    t = trainer.Trainer(tiny(model_dir, train_steps=3, steps_per_loop=3, nonfinite="skip"))
    summary = t.run()
    self.assertEqual(summary["skipped_steps"], 1)
    for v in t.moco.query_encoder.weights + t.moco.key_encoder.weights:
      self.assertTrue(np.all(np.isfinite(v.numpy())), v.path)  # weights and BN statistics
    self.assertTrue(np.all(np.isfinite(t.moco.queue.keys.numpy())))
    self.assertEqual(int(t.moco.queue.ptr.numpy()), 2 * 16)  # 3 steps, one skipped

  def test_mask_labels_is_a_fixed_seeded_subset(self):
    ids = tf.range(2000, dtype=tf.int64)
    labels = ids % 10
    a = trainer.mask_labels(labels, ids, 0.3, seed=1).numpy()
    b = trainer.mask_labels(labels, ids, 0.3, seed=1).numpy()
    c = trainer.mask_labels(labels, ids, 0.3, seed=2).numpy()
    self.assertAllEqual(a, b)
    self.assertNotAllEqual(a, c)
    self.assertAllClose(np.mean(a >= 0), 0.3, atol=0.04)
    kept = a >= 0
    self.assertAllEqual(a[kept], labels.numpy()[kept])


class MultiWorkerTest(tf.test.TestCase):
  """MultiWorkerMirroredStrategy with 2 worker processes on localhost (TF_CONFIG)."""

  def test_two_workers_finish_with_identical_weights_and_queue(self):
    import socket
    import subprocess
    import sys

    ports = []
    for _ in range(2):
      with socket.socket() as s:
        s.bind(("localhost", 0))
        ports.append(s.getsockname()[1])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    model_dir = self.create_tempdir().full_path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "-m", "tfmochi.train", "--strategy=multi_worker",
            f"--model_dir={model_dir}", "--dataset=quickstart", "--image_size=16",
            "--batch_size=16", "--queue_size=64", "--bn_mode=shuffle", "--embedding_dim=16",
            "--train_steps=4", "--steps_per_loop=2", "--checkpoint_every_steps=2",
            "--export_format=none", "--noknn_eval", "--noverbose"]
    procs = []
    for index in range(2):
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
          {"cluster": cluster, "task": {"type": "worker", "index": index}}))
      procs.append(subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    try:
      outs = [p.communicate(timeout=300) for p in procs]
    finally:
      for p in procs:
        p.kill()
    for p, (_, err) in zip(procs, outs):
      self.assertEqual(p.returncode, 0, err[-3000:])
    chief = checkpoints.list_checkpoints(model_dir)[0]
    other = tf.train.latest_checkpoint(os.path.join(model_dir, "worker_tmp_1"))
    self.assertEqual(checkpoints.checkpoint_step(chief), 4)
    # Weights and queue must agree; BN moving statistics are per replica under shuffle BN (each
    # worker normalises its own slice), so they are not compared.
    names = [n for n, _ in tf.train.list_variables(chief)
             if ("query_encoder" in n or "key_encoder" in n or "queue" in n)
             and "moving_" not in n]
    self.assertGreater(len(names), 50)
    for name in names:
      self.assertAllEqual(tf.train.load_variable(chief, name), tf.train.load_variable(other, name),
                          msg=name)
    self.assertTrue(os.path.exists(os.path.join(model_dir, "summary.json")))


def _cli(model_dir, *extra):
  import sys
  return [sys.executable, "-m", "tfmochi.train", f"--model_dir={model_dir}",
          "--dataset=quickstart", "--image_size=16", "--batch_size=16", "--queue_size=64",
          "--bn_splits=2", "--embedding_dim=16", "--steps_per_loop=1",
          "--export_format=none", "--noknn_eval", "--mochi_num_hard=8", "--mochi_num_mix=4",
          "--mochi_num_query_mix=2", *extra]


def _losses(model_dir):
  """{step: loss} from metrics.jsonl (the last record of a step wins, as after a resume)."""
  out = {}
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      out[record["step"]] = record["loss"]
  return out


class ReliabilityTest(tf.test.TestCase):
  """What survives what: SIGKILL, SIGTERM, a corrupt newest checkpoint."""

  def _wait_for(self, model_dir, step, proc, timeout=240):
    import time
    deadline = time.time() + timeout
    while not any(checkpoints.checkpoint_step(p) >= step
                  for p in checkpoints.list_checkpoints(model_dir)):
      self.assertIsNone(proc.poll(), "the run ended before the checkpoint")
      self.assertLess(time.time(), deadline, f"no ckpt-{step} after {timeout}s")
      time.sleep(0.2)

  def test_sigkill_and_restart_repeats_the_uninterrupted_run(self):
    import signal
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # 24 steps keep the test near a minute (each checkpoint of the two ResNet-18s and the optimizer
    # is ~130 MB); the kill lands at step >= 6, mid-run, and the resumed run replays the rest.
    steps = 24
    args = ["--deterministic", f"--train_steps={steps}", "--checkpoint_every_steps=2"]
    straight = self.create_tempdir().full_path
    killed = self.create_tempdir().full_path
    run = lambda d: subprocess.Popen(_cli(d, *args), cwd=root, env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = run(straight)
    victim = run(killed)
    try:
      self._wait_for(killed, 6, victim)
      victim.send_signal(signal.SIGKILL)
      victim.wait(timeout=60)
      self.assertEqual(victim.returncode, -signal.SIGKILL)  # killed mid-run, not finished
      self.assertLess(checkpoints.checkpoint_step(checkpoints.list_checkpoints(killed)[0]), steps)
      resumed = run(killed)
      self.assertEqual(resumed.wait(timeout=300), 0, resumed.stderr.read()[-3000:])
      self.assertEqual(first.wait(timeout=300), 0, first.stderr.read()[-3000:])
    finally:
      for p in (first, victim):
        p.kill()
    a, b = _losses(straight), _losses(killed)
    self.assertEqual(sorted(a), list(range(1, steps + 1)))
    self.assertEqual(sorted(b), list(range(1, steps + 1)))
    for step in range(1, steps + 1):
      self.assertEqual(a[step], b[step], f"step {step}: {a[step]} vs {b[step]}")

  def test_sigterm_checkpoints_and_exits_cleanly(self):
    import signal
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = self.create_tempdir().full_path
    # Files, not pipes: an unread pipe would fill up with progress lines and block the child.
    out_path, err_path = os.path.join(model_dir, "out.txt"), os.path.join(model_dir, "err.txt")
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
      proc = subprocess.Popen(_cli(model_dir, "--train_steps=1000", "--checkpoint_every_steps=2"),
                              cwd=root, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                              text=True, stdout=out_f, stderr=err_f)
      try:
        self._wait_for(model_dir, 2, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
      finally:
        proc.kill()
    out, err = open(out_path).read(), open(err_path).read()
    self.assertEqual(proc.returncode, 0, err[-3000:])
    self.assertIn("Received SIGTERM: checkpointed at step", out)
    newest = checkpoints.list_checkpoints(model_dir)[0]
    last_logged = max(_losses(model_dir))
    self.assertEqual(checkpoints.checkpoint_step(newest), last_logged)
    self.assertLess(last_logged, 1000)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "summary.json")))

  def test_unreadable_newest_checkpoint_falls_back_to_the_previous(self):
    model_dir = self.create_tempdir().full_path
    trainer.train(tiny(model_dir, train_steps=6))
    data_file = [f for f in os.listdir(os.path.join(model_dir, "checkpoints"))
                 if f.startswith("ckpt-6.data")][0]
    with open(os.path.join(model_dir, "checkpoints", data_file), "r+b") as f:
      f.truncate(100)  # a half-written file
    t = trainer.Trainer(tiny(model_dir, train_steps=6))
    with self.assertLogs(level="WARNING") as logs:
      self.assertEqual(t.restore(), 3)
    self.assertTrue(any("ckpt-6" in line for line in logs.output))


if __name__ == "__main__":
  tf.test.main()
