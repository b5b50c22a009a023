"""Tests of tfmochi.objective: masks (duplicates, class oracle, Cai), SupCon, MoCHi combination."""

import re

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfmochi import objective
from tfmochi import losses
from tfmochi import mixing


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(b=4, k=24, d=8):
  rng = np.random.default_rng(1)
  q = _normalize(rng.normal(size=(b, d))).astype(np.float32)
  key = _normalize(q + 0.5 * rng.normal(size=(b, d))).astype(np.float32)
  queue = _normalize(rng.normal(size=(k, d))).astype(np.float32)
  return q, key, queue


class HeadTest(tf.test.TestCase, parameterized.TestCase):

  def test_plain_infonce_equals_loss_module(self):
    q, k, queue = _data()
    out = objective.contrastive_objective(q, k, queue, objective.ObjectiveConfig(temperature=0.2))
    self.assertAllClose(out.loss, losses.info_nce((q * k).sum(1), q @ queue.T, 0.2), atol=1e-6)
    self.assertIsNone(out.synthesis)
    self.assertEqual(out.l_neg.shape, (4, 24))

  def test_duplicate_mask(self):
    q, k, queue = _data()
    queue_ids = np.arange(24) % 12
    query_ids = np.array([0, 5, 30, -1])  # 0 and 5 sit twice in the queue; 30 and -1 never match
    cfg = objective.ObjectiveConfig(mask_duplicates=True)
    out = objective.contrastive_objective(q, k, queue, cfg, query_ids=query_ids,
                                          queue_ids=queue_ids)
    absent = np.isneginf(out.l_neg.numpy())
    self.assertAllEqual(absent.sum(1), [2, 2, 0, 0])
    self.assertTrue(absent[0, 0] and absent[0, 12] and absent[1, 5] and absent[1, 17])

  def test_class_oracle_removes_exactly_same_label_entries(self):
    q, k, queue = _data()
    queue_labels = np.array([0, 1, 2, -1] * 6)
    query_labels = np.array([0, 2, -1, 7])
    cfg = objective.ObjectiveConfig(label_mode="oracle", mochi=mixing.MochiConfig(6, 8, 4))
    out = objective.contrastive_objective(q, k, queue, cfg, seed=tf.constant([1, 1]),
                                          query_labels=query_labels, queue_labels=queue_labels)
    absent = np.isneginf(out.l_neg.numpy()[:, :24])
    expected = (query_labels[:, None] == queue_labels[None, :]) & (query_labels[:, None] >= 0)
    self.assertAllEqual(absent, expected)
    self.assertAllEqual(out.removed_same_class, expected.sum(1))
    # MoCHi never mixes a removed (same-class) entry.
    for b in range(4):
      used = set(out.synthesis.mix_indices[b].numpy().ravel()) | set(
          out.synthesis.query_mix_indices[b].numpy())
      self.assertFalse(any(expected[b, j] for j in used))

  def test_supcon_mode(self):
    q, k, queue = _data()
    queue_labels = np.array([0, 1, 2, -1] * 6)
    query_labels = np.array([0, 2, -1, 7])
    cfg = objective.ObjectiveConfig(label_mode="supcon", temperature=0.1)
    out = objective.contrastive_objective(q, k, queue, cfg, query_labels=query_labels,
                                          queue_labels=queue_labels)
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], 1) / 0.1
    lse = np.log(np.exp(logits).sum(1))
    for b in range(4):
      pos = [0] + [1 + j for j in range(24)
                   if query_labels[b] >= 0 and queue_labels[j] == query_labels[b]]
      self.assertAllClose(out.loss[b], -np.mean(logits[b, pos] - lse[b]), atol=1e-5)
    # No same-class entries -> InfoNCE.
    self.assertAllClose(out.loss[2:], losses.info_nce((q * k).sum(1), q @ queue.T, 0.1)[2:],
                        atol=1e-5)

  @parameterized.parameters(dict(drop_hardest=10.0), dict(keep_hardest=50.0))
  def test_cai_combined_with_mochi(self, **kw):
    q, k, queue = _data()
    cfg = objective.ObjectiveConfig(mochi=mixing.MochiConfig(4, 6, 3), **kw)
    out = objective.contrastive_objective(q, k, queue, cfg, seed=tf.constant([2, 2]))
    absent = np.isneginf(out.l_neg.numpy()[:, :24])
    self.assertAllEqual(absent.sum(1), [3] * 4 if "drop_hardest" in kw else [12] * 4)
    # Mixing draws only from what survived the removal.
    for b in range(4):
      self.assertFalse(np.any(absent[b, out.synthesis.hard_indices[b].numpy()]))
    self.assertEqual(out.l_neg.shape, (4, 24 + 9))

  @parameterized.parameters("infonce", "debiased", "hard")
  def test_mochi_with_each_loss(self, loss):
    q, k, queue = _data()
    cfg = objective.ObjectiveConfig(loss=loss, mochi=mixing.MochiConfig(4, 6, 3))
    on = objective.contrastive_objective(q, k, queue, cfg, seed=tf.constant([2, 2]))
    off = objective.contrastive_objective(q, k, queue, cfg, seed=tf.constant([2, 2]),
                                          mochi_enabled=False)
    plain = losses.contrastive_loss((q * k).sum(1), q @ queue.T, loss=loss, temperature=0.2)
    self.assertAllClose(off.loss, plain, atol=1e-5)  # warm-up == no synthesis
    self.assertTrue(np.all(on.loss.numpy() > off.loss.numpy()))  # harder negatives, higher loss

  @parameterized.named_parameters(
      ("warmup", dict(mochi=mixing.MochiConfig(4, 6, 3)), False),
      ("duplicates", dict(mask_duplicates=True), True),
      ("oracle", dict(label_mode="oracle", mochi=mixing.MochiConfig(4, 6, 3)), True),
      ("drop_hardest", dict(drop_hardest=10.0), True),
      ("keep_hardest", dict(keep_hardest=20.0, mochi=mixing.MochiConfig(4, 6, 3)), True))
  def test_hard_with_beta_zero_is_debiased(self, kw, mochi_enabled):
    q, k, queue = _data()
    ids, labels = np.arange(24) % 6, np.array([0, 1, 2, -1] * 6)
    # Row 0 has every queue entry removed (its id and its label are everywhere).
    query_ids, query_labels = np.array([0, 1, 30, -1]), np.array([0, 2, -1, 7])
    if kw.get("mask_duplicates"):
      ids = np.where(np.arange(24) < 12, 0, ids)
    outs = [objective.contrastive_objective(
        q, k, queue, objective.ObjectiveConfig(loss=loss, hard_beta=0.0, tau_plus=0.1, **kw),
        seed=tf.constant([2, 2]), mochi_enabled=mochi_enabled, query_ids=query_ids,
        queue_ids=ids, query_labels=query_labels, queue_labels=labels)
            for loss in ("hard", "debiased")]
    self.assertTrue(np.any(np.isneginf(outs[0].l_neg.numpy())))
    self.assertTrue(np.all(np.isfinite(outs[0].loss.numpy())))
    self.assertAllEqual(outs[0].loss, outs[1].loss)

  def test_fully_masked_queue_row(self):
    q, k, queue = _data()
    cfg = objective.ObjectiveConfig(loss="hard", hard_beta=0.0, tau_plus=0.0, mask_duplicates=True)
    ids = np.zeros(24, np.int64)  # query 0's image fills the whole queue
    out = objective.contrastive_objective(q, k, queue, cfg, query_ids=np.array([0, 1, 2, 3]),
                                          queue_ids=ids)
    self.assertTrue(np.all(np.isneginf(out.l_neg.numpy()[0])))
    ref = losses.debiased(out.l_pos, out.l_neg, 0.2, 0.0)
    # The objective is compiled by XLA, which may sum in another order: equal to rounding.
    self.assertAllClose(out.loss, ref, rtol=1e-6, atol=0)
    self.assertTrue(np.all(np.isfinite(out.loss.numpy())))

  def test_proxy_accuracy_counts_synthetic_negatives(self):
    """Acc@k over the row the loss sees (queue + MoCHi, masks applied), as MoCo/MoCHi report."""
    q, k, queue = _data(b=16)
    # s' = 8 query mixes with β up to 0.5 sit close to the query: some beat its positive.
    cfg = objective.ObjectiveConfig(mochi=mixing.MochiConfig(6, 4, 8, 0.5), mask_duplicates=True)
    out = objective.contrastive_objective(q, k, queue, cfg, seed=tf.constant([5, 5]),
                                          query_ids=np.arange(16), queue_ids=np.arange(24) % 8)
    full = losses.proxy_accuracy(out.l_pos, out.l_neg)
    queue_only = losses.proxy_accuracy(out.l_pos, out.l_neg[:, :24])
    for topk in (1, 5):
      self.assertAllEqual(out.accuracy[topk], full[topk])
      self.assertAllEqual(out.accuracy_queue[topk], queue_only[topk])
    self.assertLess(float(tf.reduce_sum(out.accuracy[1])),
                    float(tf.reduce_sum(out.accuracy_queue[1])))
    # Without MoCHi the two are the same figure.
    plain = objective.contrastive_objective(q, k, queue, objective.ObjectiveConfig())
    self.assertAllEqual(plain.accuracy[1], plain.accuracy_queue[1])

  @parameterized.named_parameters(
      ("infonce", dict()),
      ("debiased", dict(loss="debiased", tau_plus=0.1)),
      ("hard", dict(loss="hard", tau_plus=0.1, hard_beta=1.0)),
      ("duplicates", dict(mask_duplicates=True)),
      ("oracle", dict(label_mode="oracle")),
      ("supcon", dict(label_mode="supcon")),
      ("drop_hardest", dict(drop_hardest=10.0)),
      ("keep_hardest", dict(keep_hardest=25.0)),
      ("mochi", dict(mochi=mixing.MochiConfig(6, 4, 3, 0.5))),
      ("mochi_supcon_duplicates", dict(mochi=mixing.MochiConfig(6, 4, 3, 0.5),
                                       label_mode="supcon", mask_duplicates=True)),
      ("mochi_hard", dict(mochi=mixing.MochiConfig(6, 4, 3, 0.5), loss="hard")),
  )
  def test_compiled_objective_matches_plain_ops_and_its_gradient(self, kw):
    """The XLA path computes q's gradient with the loss (J, rows independent): it equals
    autodiff through plain TensorFlow ops, for an upstream gradient that differs per row."""
    q, k, queue = _data(b=6)
    cfg = objective.ObjectiveConfig(**kw)
    extra = dict(query_ids=np.arange(6), queue_ids=np.arange(24) % 9,
                 query_labels=np.arange(6) % 3, queue_labels=np.arange(24) % 3,
                 seed=tf.constant([3, 4]))
    weights = tf.constant([1.0, -2.0, 0.5, 3.0, 0.25, 1.5])

    @tf.function
    def run(q, jit_compile):
      with tf.GradientTape() as tape:
        tape.watch(q)
        out = objective.contrastive_objective(q, k, queue, cfg, jit_compile=jit_compile, **extra)
        total = tf.reduce_sum(weights * out.loss)
      return out, tape.gradient(total, q)

    q = tf.constant(q)
    (compiled, g_compiled), (plain, g_plain) = run(q, True), run(q, False)
    self.assertAllClose(compiled.loss, plain.loss, rtol=1e-5, atol=1e-6)
    # Each entry of q's gradient sums terms of the size of its largest entries (up to 6 here,
    # with weights up to 3), so its float32 rounding scales with them, not with the entry: on an
    # AVX2-only AMD Zen 3 an entry of 0.02 differed by 3.1e-6 between the two summation orders.
    scale = float(tf.reduce_max(tf.abs(g_plain)))
    self.assertAllClose(g_compiled, g_plain, rtol=1e-4, atol=1e-6 * max(1.0, scale))
    self.assertGreater(scale, 1e-3)  # a gradient to compare
    self.assertAllClose(compiled.l_neg, plain.l_neg, rtol=1e-6, atol=1e-6)
    for t in (1, 5):
      self.assertAllEqual(compiled.accuracy[t], plain.accuracy[t])
      self.assertAllEqual(compiled.accuracy_queue[t], plain.accuracy_queue[t])

  @parameterized.named_parameters(("moco", 0), ("mochi", 4))
  def test_compiled_tail_copies_no_row(self, num_mix):
    """The compiled loss takes the row [l_pos | queue | synthetic] as blocks: its HLO has no
    [B, 1 + K (+ s + s')] or [B, K + s + s'] tensor (a concatenated copy of the [B, K] logits,
    64 MB per pass at B = 256, K = 65,536), only [B, K] ones."""
    q, k, queue = (tf.constant(x) for x in _data(b=6))
    cfg = objective.ObjectiveConfig(mochi=mixing.MochiConfig(6 if num_mix else 0, num_mix,
                                                             3 if num_mix else 0, 0.5))
    front, tail = objective._parts(cfg, None, False, True)
    l_pos, l_neg, _, _ = front(q, k, queue, None, None, None, None)
    hard = mixing.hardest_indices(l_neg, cfg.mochi, inside_xla=True) if num_mix else None
    fn = tf.function(lambda *a: tail(*a[:5], None, hard, a[5], tf.constant(True),
                                     tf.constant(0)), jit_compile=True)
    hlo = fn.experimental_get_compiler_ir(q, k, queue, l_pos, l_neg,
                                          tf.constant([1, 2], tf.int64))(stage="hlo")
    widths = {int(w) for w in re.findall(r"f32\[6,(\d+)\]", hlo)}
    self.assertIn(24, widths)  # the queue logits themselves
    forbidden = {25} | ({24 + num_mix + 3, 25 + num_mix + 3} if num_mix else set())
    self.assertFalse(forbidden & widths, widths)

  def test_compiled_objective_under_two_replicas(self):
    """Each replica's rows carry their own gradient (MirroredStrategy on 2 logical CPUs)."""
    q, k, queue = _data(b=8)
    cfg = objective.ObjectiveConfig(mochi=mixing.MochiConfig(6, 4, 3, 0.5))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def replica_fn(jit_compile):
      ctx = tf.distribute.get_replica_context()
      rows = tf.reshape(tf.range(4) + 4 * ctx.replica_id_in_sync_group, [4])
      q_r = tf.gather(tf.constant(q), rows)
      with tf.GradientTape() as tape:
        tape.watch(q_r)
        out = objective.contrastive_objective(
            q_r, tf.gather(tf.constant(k), rows), tf.constant(queue), cfg,
            seed=tf.constant([1, 2]), row_offset=4 * ctx.replica_id_in_sync_group,
            global_rows=8, jit_compile=jit_compile)
        total = tf.reduce_sum(out.loss) / 8
      return tape.gradient(total, q_r)

    grads = {}
    for jit in (True, False):
      per_replica = strategy.run(tf.function(lambda jit=jit: replica_fn(jit)))
      grads[jit] = tf.concat(strategy.experimental_local_results(per_replica), axis=0)
    self.assertAllClose(grads[True], grads[False], rtol=1e-4, atol=1e-7)

  @parameterized.parameters(
      (dict(temperature=0.0), r"temperature \(T\)"),
      (dict(tau_plus=1.0), r"tau_plus"),
      (dict(drop_hardest=0.0), r"drop_hardest.*\(0, 100\)"),
      (dict(keep_hardest=100.0), r"keep_hardest.*\(0, 100\)"),
      (dict(label_mode="weak"), "label_mode must be one of none, oracle, supcon"),
      (dict(mochi=mixing.MochiConfig(30, 1, 1)), r"\[0, K\] = \[0, 24\]"),
      (dict(label_mode="supcon", loss="hard"), "use --loss=infonce"),
  )
  def test_bad_config(self, kw, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      objective.ObjectiveConfig(**kw).validate(queue_size=24)


  def test_errors_name_the_flag_of_the_field(self):
    # The config is the branch of the training config: its messages name the flags.
    with self.assertRaisesRegex(ValueError, r"^--temperature \(T\)"):
      objective.ObjectiveConfig(temperature=0.0)
    with self.assertRaisesRegex(ValueError, r"^--mochi_num_hard \(N\) must be in \[0, K\]"):
      objective.ObjectiveConfig(mochi=mixing.MochiConfig(30, 1, 1)).validate(queue_size=24)


if __name__ == "__main__":
  tf.test.main()
