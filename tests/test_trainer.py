"""End-to-end tests of tfmochi.trainer: tiny runs on one device, 2 mirrored replicas, resume,
the imagenet2012 path under tfds mock data, label modes, non-finite handling; 2-worker
MultiWorkerMirroredStrategy runs (preemption, a killed worker); reliability (SIGKILL, SIGTERM,
corrupt checkpoint, a 1,000-step memory soak)."""

import json
import os
from unittest import mock

import keras
import pytest
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfmochi import augment
from tfmochi import config as config_lib
from tfmochi import evaluate
from tfmochi import rundir
from tfmochi import runfiles
from tfmochi import trainer

# resnet10_tiny: the trainer's logic does not depend on the backbone, and the narrow ResNet keeps
# these runs (and the suite) short. The default resnet18 runs the same replica step (tfmochi.build)
# in tests/test_benchmark_step.py and is exported in tests/test_export.py.
TINY = dict(dataset="quickstart", arch="resnet10_tiny", image_size=16, batch_size=16,
            queue_size=64, bn_splits=2, embedding_dim=16, train_steps=6, steps_per_loop=3,
            checkpoint_every_steps=3, export_format="none", verbose=False, learning_rate=0.03,
            knn_eval=False)


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
                "knn_top1_random_init", "knn_top1_raw_pixels", "knn_k"):
      self.assertIsNotNone(summary[key], key)
    self.assertEqual(summary["knn_k"], 14)  # a tenth of the smallest class (145 digits)
    self.assertEqual(summary["global_step"], 6)
    self.assertTrue(np.isfinite(summary["final_loss"]))
    on_disk = json.load(open(os.path.join(model_dir, "summary.json")))
    self.assertEqual(on_disk["global_step"], 6)
    self.assertEqual([rundir.checkpoint_step(p) for p in
                      rundir.RunDir(model_dir).list_checkpoints()], [6, 3])
    self.assertTrue(os.listdir(os.path.join(model_dir, "train")))  # TensorBoard events
    run_config = rundir.RunDir(model_dir).read_config()
    self.assertEqual(run_config.mochi_num_hard, 8)
    # --jit_compile, --fast_grad, --device_augment: the flags as given, and what "auto" became
    # on this CPU host.
    written = json.load(open(os.path.join(model_dir, runfiles.CONFIG_FILE)))
    self.assertEqual((written["jit_compile"], written["fast_grad"]), ("auto", "auto"))
    self.assertEqual(written["resolved"], {"jit_compile": False, "fast_grad": True,
                                           "float32_matmuls": "float32",
                                           "device_augment": False})

  @pytest.mark.heavy
  def test_mirrored_two_replicas(self):
    model_dir = self.create_tempdir().full_path
    summary = trainer.train(tiny(model_dir, strategy="mirrored", cpu_replicas=2,
                                 bn_mode="shuffle", knn_eval=True))
    self.assertEqual(summary["replicas"], 2)
    self.assertEqual(summary["global_step"], 6)
    self.assertTrue(np.isfinite(summary["final_loss"]))
    # The kNN monitor runs over both replicas; evaluating the final checkpoint offline on one
    # device gives the same figure (up to one tie of 300 held-out digits).
    offline = evaluate.evaluate_checkpoint(model_dir, evaluate.EvalSettings(mode="knn"),
                                           write=False)
    self.assertEqual(offline["checkpoint_step"], 6)
    self.assertAllClose(summary["knn_top1"], offline["top1"], atol=0.34)

  def test_knn_monitor_over_two_replicas_equals_one_device(self):
    # Bounded monitor (10 + 5 digits per class) over 2 replicas whose copies of the BN moving
    # statistics differ, as training leaves them (each replica updates its own from its slice).
    t = trainer.Trainer(tiny(self.create_tempdir().full_path, strategy="mirrored",
                             cpu_replicas=2, bn_mode="shuffle", knn_eval=True,
                             knn_train_per_class=10, knn_test_per_class=5, train_steps=2))
    moving = [w.value for w in t.moco.query_encoder.non_trainable_weights
              if "moving_mean" in w.path]
    rng = np.random.default_rng(0)
    for v in moving:
      v.values[1].assign(rng.normal(size=v.shape).astype(np.float32))
    monitor = t.knn_eval()
    for v in moving:  # every replica now holds the first replica's (the checkpoint's) values
      self.assertAllEqual(v.values[0].numpy(), v.values[1].numpy())
    self.assertEqual((monitor["num_train"], monitor["num_test"], monitor["k"]), (100, 50, 1))
    one_device = evaluate.knn_eval(
        t.moco.query_encoder, t.train_source, t._knn_test_source, image_size=16,
        train_per_class=10, test_per_class=5, seed=0, raw_pixels=False)
    self.assertEqual(monitor["top1"], one_device["top1"])
    self.assertNotIn("raw_pixels_top1", monitor)  # computed once per run, with random init
    cost = t.knn_monitor_cost()
    self.assertEqual((cost["images"], cost["epoch_fraction"]), (150, 150 / (3 * 1497)))

  def test_jit_compile_over_several_cpu_replicas_is_refused(self):
    model_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(config_lib.ConfigError, "cannot compile a step over 2 CPU"):
      trainer.Trainer(tiny(model_dir, strategy="mirrored", cpu_replicas=2, jit_compile="true"))

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
      batch["view1"] = augment.to_model_input(batch["view1"]) * nan_or_one  # uint8 -> float
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
    self.assertEqual(rundir.checkpoint_step(rundir.RunDir(model_dir).list_checkpoints()[0]), 3)

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

  def test_float16_overflows_are_skipped_and_counted_not_fatal(self):
    """From a huge loss scale float16 overflows at once: skipped, counted, the run goes on."""
    self.addCleanup(tf.config.experimental.enable_tensor_float_32_execution, True)  # TF default
    model_dir = self.create_tempdir().full_path
    t = trainer.Trainer(tiny(model_dir, mixed_precision="float16", initial_loss_scale=2.0**40,
                             train_steps=32, steps_per_loop=32, checkpoint_every_steps=32,
                             image_size=8, batch_size=8))
    self.assertFalse(tf.config.experimental.tensor_float_32_execution_enabled())  # --tf32 off
    summary = t.run()  # --nonfinite=stop: an overflow must not stop it
    self.assertEqual(summary["global_step"], 32)
    skips = summary["loss_scale_skipped_steps"]
    self.assertBetween(skips, 10, 31)  # 2^40 halves until float16 gradients fit
    self.assertEqual(summary["skipped_steps"], 0)
    self.assertEqual(summary["loss_scale"], 2.0 ** (40 - skips))
    for v in t.moco.query_encoder.weights + t.moco.key_encoder.weights:
      self.assertTrue(np.all(np.isfinite(v.numpy())), v.path)
    self.assertTrue(np.all(np.isfinite(t.moco.queue.keys.numpy())))
    self.assertEqual(int(t.moco.queue.ptr.numpy()), (32 - skips) * 8 % 64)
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
      record = json.loads(f.readlines()[-1])
    self.assertEqual(record["loss_scale_skipped_steps"], skips)
    self.assertAllClose(record["loss_scale_skip"], skips / 32)

  def test_bfloat16_on_a_cpu_without_bfloat16_units_is_warned_about_at_set_up(self):
    self.addCleanup(keras.mixed_precision.set_global_policy, "float32")
    with mock.patch.object(trainer.hostcpu, "has_bfloat16_units", return_value=False), \
         self.assertLogs(level="WARNING") as logs:
      trainer.Trainer(tiny(self.create_tempdir().full_path, mixed_precision="bfloat16"))
    self.assertIn("a CPU without bfloat16 units", "".join(logs.output))

  def test_tf32_flag_and_old_optimizer_checkpoints(self):
    self.addCleanup(tf.config.experimental.enable_tensor_float_32_execution, True)
    model_dir = self.create_tempdir().full_path
    # A checkpoint of an earlier tfmochi: Keras' SGD state under "optimizer".
    old = keras.optimizers.SGD(0.1, momentum=0.9)
    old.build([keras.Variable([1.0])])
    tf.train.CheckpointManager(tf.train.Checkpoint(optimizer=old),
                               rundir.RunDir(model_dir).checkpoint_dir, 1).save(checkpoint_number=3)
    t = trainer.Trainer(tiny(model_dir, tf32=True))
    self.assertTrue(tf.config.experimental.tensor_float_32_execution_enabled())
    with self.assertRaisesRegex(config_lib.ConfigError,
                                "ckpt-3 holds Keras' SGD state.*new --model_dir"):
      t.restore()

  def test_memory_is_logged_and_smoke_arch_has_no_weight_files(self):
    with self.assertRaisesRegex(config_lib.ConfigError, "resnet10_tiny.*no torchvision weight"):
      trainer.Trainer(tiny(self.create_tempdir().full_path, arch="resnet10_tiny",
                           export_format="torchvision"))
    model_dir = self.create_tempdir().full_path
    t = trainer.Trainer(tiny(model_dir, train_steps=3))
    self.assertIsNone(t._make_preemption_handler())  # one device: the SIGTERM flag alone
    self.assertEqual(t.run()["global_step"], 3)
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
      self.assertGreater(json.loads(f.readline())["rss_mb"], 10.0)

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


def _free_ports(n):
  import socket
  ports = []
  for _ in range(n):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      ports.append(s.getsockname()[1])
  return ports


# A 2-worker run small enough to start, train and restart three times within the suite's time
# budget. MoCHi is off: its XLA compilation adds ~20 s to each worker's start on this 2-core
# machine, and it has no multi-worker code of its own (each replica mixes its own queries; the
# all-gathers it relies on are shuffle BN's and the queue's, exercised here).
_MW_TINY = ["--arch=resnet10_tiny", "--image_size=8", "--batch_size=16", "--queue_size=64",
            "--bn_mode=shuffle", "--embedding_dim=16", "--mochi_num_hard=0", "--mochi_num_mix=0",
            "--mochi_num_query_mix=0", "--steps_per_loop=5", "--export_format=none",
            "--noknn_eval"]


def _same_variables(test, chief, other):
  """Weights and queue of two checkpoints agree; BN moving statistics are per replica under
  shuffle BN (each worker normalises its own slice), so they are not compared."""
  names = [n for n, _ in tf.train.list_variables(chief)
           if ("query_encoder" in n or "key_encoder" in n or "queue" in n)
           and "moving_" not in n]
  test.assertGreater(len(names), 20)
  for name in names:
    test.assertAllEqual(tf.train.load_variable(chief, name), tf.train.load_variable(other, name),
                        msg=name)


class MultiWorkerTest(tf.test.TestCase):
  """MultiWorkerMirroredStrategy with 2 worker processes on localhost (TF_CONFIG): a full run,
  a preemption notice (SIGTERM) to one worker, and a worker killed without notice (SIGKILL)."""

  def _start(self, model_dir, args, ports, tag):
    """Starts worker 0 and 1 of `python -m tfmochi.train --strategy=multi_worker ...`.

    Output goes to files (an unread pipe would fill up and block a worker). Returns
    [(process, stdout path, stderr path)] by worker index.
    """
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    logs = self.create_tempdir().full_path
    workers = []
    for index in range(2):
      # GCE_METADATA_IP: the preemption handler asks the Google Cloud metadata server whether it
      # runs on GCP; point it at a closed local port so that no request leaves the machine.
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", GCE_METADATA_IP="127.0.0.1:9",
                 TF_CONFIG=json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": index}}))
      out_path = os.path.join(logs, f"{tag}_{index}.out")
      err_path = os.path.join(logs, f"{tag}_{index}.err")
      with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tfmochi.train", "--strategy=multi_worker",
             f"--model_dir={model_dir}", "--dataset=quickstart", *args],
            cwd=root, env=env, stdout=out, stderr=err, text=True)
      self.addCleanup(proc.kill)
      workers.append((proc, out_path, err_path))
    return workers

  def _finish(self, workers, timeout=300):
    """Waits for the workers; returns [(returncode, stdout, stderr)]. A hang fails the test."""
    import subprocess
    results = []
    for proc, out_path, err_path in workers:
      try:
        proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        proc.kill()
        self.fail(f"a worker hung for {timeout}s: {open(err_path).read()[-2000:]}")
      results.append((proc.returncode, open(out_path).read(), open(err_path).read()))
    return results

  def _wait_until(self, condition, workers, timeout=240):
    import time
    deadline = time.time() + timeout
    while not condition():
      for proc, _, err_path in workers:
        self.assertIsNone(proc.poll(), f"a worker ended early: {open(err_path).read()[-2000:]}")
      self.assertLess(time.time(), deadline, f"not reached in {timeout}s")
      time.sleep(0.2)

  @pytest.mark.heavy
  def test_preemption_a_killed_worker_and_resumes(self):
    """One job, three generations of the same 2-worker command (the order a real job sees):

    1. SIGTERM to worker 1 mid-run: both workers checkpoint at the same step N, exit 0.
    2. The same command resumes at N; worker 0 (the chief, which also hosts the coordination
       service) is then killed without notice: worker 1 stops within seconds with one message
       and exit status 2, no hang, no traceback.
    3. The same command resumes at N again and finishes with identical weights on both workers.
    """
    import re
    import signal
    model_dir = self.create_tempdir().full_path
    steps = 100
    # No periodic checkpoint before the end: the only one on disk is the preemption's.
    args = [*_MW_TINY, f"--train_steps={steps}", "--checkpoint_every_steps=1000"]
    ports = _free_ports(2)
    metrics = os.path.join(model_dir, "metrics.jsonl")

    def logged_steps():
      if not os.path.exists(metrics):
        return []
      with open(metrics) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]

    # 1. Preemption notice to one worker.
    workers = self._start(model_dir, args, ports, "first")
    self._wait_until(logged_steps, workers)
    workers[1][0].send_signal(signal.SIGTERM)  # the non-chief: the chief must follow it
    saved = []
    for code, out, err in self._finish(workers):
      self.assertEqual(code, 0, err[-3000:])
      found = re.findall(r"checkpointed at step (\d+) and stopped\. Run the same command", out)
      self.assertLen(found, 1, out[-2000:])
      saved.append(int(found[0]))
    self.assertIn("Received SIGTERM", open(workers[1][1]).read())
    self.assertIn("Another worker of the cluster was preempted", open(workers[0][1]).read())
    step = saved[0]
    self.assertEqual(saved, [step, step])
    self.assertLess(step, steps - 10)
    chief = rundir.RunDir(model_dir).list_checkpoints()
    self.assertEqual([rundir.checkpoint_step(p) for p in chief], [step])
    other = tf.train.latest_checkpoint(os.path.join(model_dir, "worker_tmp_1"))
    self.assertEqual(rundir.checkpoint_step(other), step)
    _same_variables(self, chief[0], other)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "summary.json")))
    # Every 5-step block up to N was trained once: the chief logs each block.
    self.assertEqual(logged_steps(), list(range(5, step + 1, 5)))

    # 2. Resume, then kill the chief without notice.
    workers = self._start(model_dir, args, ports, "second")
    self._wait_until(lambda: len(logged_steps()) > step // 5, workers)
    self.assertEqual(logged_steps()[step // 5], step + 5)  # resumed at N, not at 0
    workers[0][0].send_signal(signal.SIGKILL)
    code, _, err = self._finish(workers[1:], timeout=120)[0]
    self.assertEqual(code, 2, err[-3000:])
    self.assertIn("Worker 1 lost contact with the rest of the cluster", err)
    self.assertIn("Restart every worker with the same command", err)
    self.assertNotIn("Traceback", err)
    self.assertEqual(rundir.checkpoint_step(rundir.RunDir(model_dir).list_checkpoints()[0]),
                     step)

    # 3. Restart both: resume at N and finish.
    before = len(logged_steps())
    workers = self._start(model_dir, args, ports, "third")
    for code, out, err in self._finish(workers):
      self.assertEqual(code, 0, err[-3000:])
      self.assertIn(f"(step {step}/{steps})", out)  # "Resumed from .../ckpt-N (step N/T)."
    self.assertEqual(logged_steps()[before:], list(range(step + 5, steps + 1, 5)))
    self.assertEqual(json.load(open(os.path.join(model_dir, "summary.json")))["global_step"],
                     steps)
    chief = rundir.RunDir(model_dir).list_checkpoints()[0]
    other = tf.train.latest_checkpoint(os.path.join(model_dir, "worker_tmp_1"))
    self.assertEqual(rundir.checkpoint_step(chief), steps)
    self.assertEqual(rundir.checkpoint_step(other), steps)
    _same_variables(self, chief, other)


def _cli(model_dir, *extra):
  import sys
  return [sys.executable, "-m", "tfmochi.train", f"--model_dir={model_dir}",
          "--dataset=quickstart", "--arch=resnet10_tiny", "--image_size=16", "--batch_size=16",
          "--queue_size=64", "--bn_splits=2", "--embedding_dim=16", "--steps_per_loop=1",
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
    while not any(rundir.checkpoint_step(p) >= step
                  for p in rundir.RunDir(model_dir).list_checkpoints()):
      self.assertIsNone(proc.poll(), "the run ended before the checkpoint")
      self.assertLess(time.time(), deadline, f"no ckpt-{step} after {timeout}s")
      time.sleep(0.2)

  @pytest.mark.heavy
  def test_sigkill_and_restart_repeats_the_uninterrupted_run(self):
    import signal
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # The kill lands at step >= 6 (within 0.2 s of ckpt-6), mid-run: the 34 steps and 17
    # checkpoints left take seconds even with resnet10_tiny; the resumed run replays the rest.
    steps = 40
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
      self.assertLess(rundir.checkpoint_step(rundir.RunDir(killed).list_checkpoints()[0]), steps)
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
    newest = rundir.RunDir(model_dir).list_checkpoints()[0]
    last_logged = max(_losses(model_dir))
    self.assertEqual(rundir.checkpoint_step(newest), last_logged)
    self.assertLess(last_logged, 1000)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "summary.json")))

  @pytest.mark.heavy
  def test_soak_1000_steps_with_frequent_checkpoints_keeps_memory_flat(self):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = self.create_tempdir().full_path
    # A fresh process, so that its resident memory is this run's alone; the smallest model
    # (resnet10_tiny, 8 px, batch 8) keeps 1,000 steps and 20 checkpoints (every 50 steps, each
    # also a metrics record) under a minute on 2 cores.
    args = [sys.executable, "-m", "tfmochi.train", f"--model_dir={model_dir}",
            "--dataset=quickstart", "--arch=resnet10_tiny", "--image_size=8", "--batch_size=8",
            "--queue_size=32", "--bn_splits=2", "--embedding_dim=8", "--mochi_num_hard=8",
            "--mochi_num_mix=4", "--mochi_num_query_mix=2", "--train_steps=1000",
            "--steps_per_loop=50", "--checkpoint_every_steps=50", "--keep_checkpoints=2",
            "--export_format=none", "--noknn_eval", "--noverbose"]
    proc = subprocess.run(args, cwd=root, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    records = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
    self.assertEqual([r["step"] for r in records], list(range(50, 1001, 50)))
    self.assertEqual(len(os.listdir(os.path.join(model_dir, "checkpoints"))), 1 + 2 * 2)
    first, end = records[0]["rss_mb"], records[-1]["rss_mb"]
    peak = max(r["rss_mb"] for r in records)
    print(f"\nsoak: resident memory {first:.1f} MB after 50 steps, {end:.1f} MB after 1000 "
          f"(peak {peak:.1f} MB, {100 * (end - first) / first:+.1f}%)", flush=True)
    self.assertLessEqual(end, 1.05 * first)

  def test_unreadable_newest_checkpoint_falls_back_and_the_run_continues(self):
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
    queue_restored = t.moco.queue.keys.numpy()
    self.assertFalse(np.allclose(queue_restored[:48],
                                 trainer.Trainer(tiny(self.create_tempdir().full_path))
                                 .moco.queue.keys.numpy()[:48]))  # queue restored, not re-init
    summary = t.run()  # continues from step 3 and writes a readable ckpt-6 over the broken one
    self.assertEqual(summary["global_step"], 6)
    self.assertEqual(rundir.checkpoint_step(rundir.RunDir(model_dir).list_checkpoints()[0]), 6)

if __name__ == "__main__":
  tf.test.main()
