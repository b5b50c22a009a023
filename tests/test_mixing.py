"""Tests of tfmochi.mixing (MoCHi): per-query top-N, logit space == feature space, gradients,
XLA agreement, seeding, warm-up, bad input (the top-N selection itself: tests/test_topn.py)."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfmochi import distribute
from tfmochi import mixing
from tfmochi import topn


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(b=6, k=40, d=8, seed=0):
  """Queries whose hardest negatives differ from query to query (the maugrim-bug trap)."""
  rng = np.random.default_rng(seed)
  q = _normalize(rng.normal(size=(b, d))).astype(np.float32)
  queue = _normalize(rng.normal(size=(k, d))).astype(np.float32)
  return tf.constant(q), tf.constant(queue), tf.constant(q @ queue.T)


class WorkedExampleTest(tf.test.TestCase):
  """docs/ALGORITHMS.md §10, E2."""

  def test_e2_synthetic_logits(self):
    q = _normalize([1, 0.2, 0])
    n = _normalize([[0.9, 0.3, 0.1], [0.7, -0.5, 0.5], [0.1, 1, 0], [-0.8, 0.2, 0.5],
                    [0.5, 0.6, 0.7], [0, 0, 1]])
    z = n @ q
    # Top-3 set of the worked example: n0, n1, n4.
    idx = topn.hardest_indices(tf.constant(z[None], tf.float32), 3)
    self.assertAllEqual(idx, [[0, 1, 4]])
    h = mixing.mix_pair_logits(z[0], z[4], n[0] @ n[4], 0.3)
    self.assertAllClose(h, 0.750759, atol=1e-6)
    h2 = mixing.mix_query_logits(q @ q, z[1], 0.2)
    self.assertAllClose(h2, 0.721909, atol=1e-6)
    # Explicit features agree.
    hf = _normalize(0.3 * n[0] + 0.7 * n[4])
    self.assertAllClose(hf, [0.659765, 0.529310, 0.533424], atol=1e-6)
    self.assertAllClose(_normalize(0.2 * q + 0.8 * n[1]), [0.814031, -0.389128, 0.431199],
                        atol=1e-6)


class SynthesizeTest(tf.test.TestCase, parameterized.TestCase):

  CFG = mixing.MochiConfig(num_hard=5, num_mix=16, num_query_mix=8, beta_max=0.5)

  def test_each_query_mixes_only_its_own_top_n(self):
    q, queue, l_neg = _problem()
    out = mixing.synthesize(q, queue, l_neg, tf.constant([3, 4]), self.CFG)
    top = np.argsort(-l_neg.numpy(), axis=1)[:, :5]
    self.assertAllEqual(np.sort(out.hard_indices.numpy(), 1), np.sort(top, 1))
    # The top-N sets really differ between queries, so a shared set would be caught.
    self.assertGreater(len({tuple(sorted(r)) for r in top}), 1)
    for b in range(q.shape[0]):
      own = set(top[b])
      self.assertTrue(set(out.mix_indices[b].numpy().ravel()) <= own, b)
      self.assertTrue(set(out.query_mix_indices[b].numpy()) <= own, b)

  def test_logit_space_equals_feature_space(self):
    q, queue, l_neg = _problem()
    out = mixing.synthesize(q, queue, l_neg, tf.constant([3, 4]), self.CFG, return_features=True)
    feats = out.features.numpy()
    self.assertEqual(feats.shape, (6, 24, 8))
    self.assertAllClose(np.linalg.norm(feats, axis=-1), np.ones((6, 24)), atol=1e-5)
    self.assertAllClose(out.logits, np.einsum("bd,bsd->bs", q.numpy(), feats), atol=1e-5)
    # And both equal a NumPy construction from the drawn indices and coefficients.
    qn, qu = q.numpy(), queue.numpy()
    a = out.alpha.numpy()[..., None]
    ij = out.mix_indices.numpy()
    h = _normalize(a * qu[ij[..., 0]] + (1 - a) * qu[ij[..., 1]])
    bt = out.beta.numpy()[..., None]
    h2 = _normalize(bt * qn[:, None, :] + (1 - bt) * qu[out.query_mix_indices.numpy()])
    self.assertAllClose(feats, np.concatenate([h, h2], 1), atol=1e-5)

  def test_coefficient_ranges_and_uniform_draws(self):
    q, queue, l_neg = _problem(b=4)
    cfg = mixing.MochiConfig(num_hard=5, num_mix=2000, num_query_mix=2000, beta_max=0.3)
    out = mixing.synthesize(q, queue, l_neg, tf.constant([0, 9]), cfg)
    alpha, beta = out.alpha.numpy(), out.beta.numpy()
    self.assertTrue(np.all((alpha >= 0) & (alpha < 1)))
    self.assertTrue(np.all((beta >= 0) & (beta < 0.3)))
    self.assertAllClose(alpha.mean(), 0.5, atol=0.02)
    self.assertAllClose(beta.mean(), 0.15, atol=0.01)
    # i and j are independent and uniform over the N = 5 positions (with replacement).
    counts = np.unique(out.mix_indices[0].numpy(), return_counts=True)[1]
    self.assertLen(counts, 5)
    self.assertAllClose(counts / counts.sum(), [0.2] * 5, atol=0.03)
    same = np.mean(out.mix_indices[0, :, 0].numpy() == out.mix_indices[0, :, 1].numpy())
    self.assertAllClose(same, 0.2, atol=0.04)

  def test_no_gradient_reaches_synthetic_points_or_queue(self):
    q, queue, _ = _problem()
    with tf.GradientTape(persistent=True) as tape:
      tape.watch([q, queue])
      l_neg = tf.matmul(q, tf.stop_gradient(queue), transpose_b=True)
      out = mixing.synthesize(q, queue, l_neg, tf.constant([1, 2]), self.CFG,
                              return_features=True)
      total = tf.reduce_sum(out.logits)
    # Through a tf.function, an unconnected input gets zeros rather than None.
    for grad in (tape.gradient(total, queue), tape.gradient(out.features, q)):
      self.assertTrue(grad is None or not np.any(grad.numpy()))
    # d Σ_s q·h_s / dq = Σ_s h_s: the synthetic points act as constants.
    self.assertAllClose(tape.gradient(total, q), tf.reduce_sum(out.features, 1), atol=1e-5)

  def test_eager_function_and_xla_agree(self):
    q, queue, l_neg = _problem()
    seed = tf.constant([5, 6])
    runs = [mixing.synthesize(q, queue, l_neg, seed, self.CFG, jit_compile=j,
                              return_features=True) for j in (None, False, True)]
    for other in runs[1:]:
      for a, b in zip(runs[0], other):
        self.assertAllClose(a, b, atol=1e-5)

  def test_seeding(self):
    q, queue, l_neg = _problem()
    draw = lambda step, replica=0: mixing.synthesize(
        q, queue, l_neg, mixing.step_seed(7, step, replica), self.CFG)
    a, b, c, d = draw(10), draw(10), draw(11), draw(10, replica=1)
    self.assertAllEqual(a.mix_indices, b.mix_indices)
    self.assertAllEqual(a.alpha, b.alpha)
    self.assertNotAllClose(a.alpha, c.alpha)
    self.assertNotAllClose(a.alpha, d.alpha)

  def test_global_draws_are_replica_count_invariant(self):
    """Rows [2:4] drawn as a replica of a global batch of 6 equal rows 2..3 of the full draw."""
    q, queue, l_neg = _problem()
    seed = tf.constant([4, 4])
    full = mixing.synthesize(q, queue, l_neg, seed, self.CFG, global_rows=6)
    part = mixing.synthesize(q[2:4], queue, l_neg[2:4], seed, self.CFG, row_offset=2,
                             global_rows=6)
    for a, b in zip(full[:-1], part[:-1]):
      self.assertAllClose(a[2:4], b)

  def test_warmup_masks_without_retracing(self):
    q, queue, l_neg = _problem()
    mixing._compiled.cache_clear()
    on = mixing.synthesize(q, queue, l_neg, tf.constant([1, 1]), self.CFG, enabled=True)
    off = mixing.synthesize(q, queue, l_neg, tf.constant([1, 1]), self.CFG,
                            enabled=tf.constant(False))
    self.assertTrue(np.all(np.isfinite(on.logits)))
    self.assertTrue(np.all(np.isneginf(off.logits)))
    fn = mixing._compiled(5, 16, 8, 0.5, None, False, topn.host_xla_available())
    self.assertEqual(fn.experimental_get_tracing_count(), 1)

  def test_absent_sources_give_absent_synthetics(self):
    q, queue, l_neg = _problem(k=8)
    masked = l_neg.numpy().copy()
    masked[:, 3:] = -np.inf  # only 3 present entries, N = 5 picks absent ones too
    out = mixing.synthesize(q, queue, tf.constant(masked), tf.constant([1, 2]), self.CFG)
    present = np.zeros((6, 8), bool)
    present[:, :3] = True
    rows = np.arange(6)[:, None]
    ok1 = present[rows, out.mix_indices[..., 0].numpy()] & present[
        rows, out.mix_indices[..., 1].numpy()]
    ok2 = present[rows, out.query_mix_indices.numpy()]
    self.assertAllEqual(np.isfinite(out.logits), np.concatenate([ok1, ok2], 1))
    self.assertTrue(np.any(~ok1))

  def test_works_inside_mirrored_strategy(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    q, queue, l_neg = _problem(b=4)

    @tf.function
    def step():
      def replica_fn():
        ctx = tf.distribute.get_replica_context()
        seed = mixing.step_seed(1, 0, ctx.replica_id_in_sync_group)
        return mixing.synthesize(q, queue, l_neg, seed, self.CFG).logits
      return strategy.run(replica_fn)

    per_replica = strategy.experimental_local_results(step())
    self.assertLen(per_replica, 2)
    self.assertNotAllClose(per_replica[0], per_replica[1])  # replicas draw differently


class ConfigTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      (dict(num_hard=50), 40, r"mochi_num_hard \(N\) must be in \[0, K\]"),
      (dict(num_mix=-1), 40, r"mochi_num_mix \(s\) must be an integer >= 0"),
      (dict(num_query_mix=-2), 40, r"mochi_num_query_mix \(s'\) must be an integer >= 0"),
      (dict(beta_max=0.0), 40, r"mochi_beta_max .*\(0, 0.5\]"),
      (dict(beta_max=0.6), 40, r"mochi_beta_max .*\(0, 0.5\]"),
      (dict(num_hard=0), 40, r"need --mochi_num_hard \(N\) > 0"),
  )
  def test_bad_values(self, override, k, pattern):
    base = dict(num_hard=5, num_mix=4, num_query_mix=4, beta_max=0.5)
    base.update(override)
    with self.assertRaisesRegex(ValueError, pattern):
      mixing.MochiConfig(**base).validate(queue_size=k)

  def test_synthesize_rejects_n_above_k(self):
    q, queue, l_neg = _problem(k=8)
    with self.assertRaisesRegex(ValueError, r"\[0, K\] = \[0, 8\]"):
      mixing.synthesize(q, queue, l_neg, tf.constant([0, 0]), mixing.MochiConfig(9, 2, 2))

  def test_disabled(self):
    cfg = mixing.MochiConfig(0, 0, 0)
    self.assertFalse(cfg.enabled)
    self.assertEqual(cfg.num_synthetic, 0)
    self.assertEqual(mixing.MochiConfig(8, 4, 2).num_synthetic, 6)

class SynthesisTopNTest(tf.test.TestCase):
  """The synthesis takes each query's top-N from `tfmochi.topn` as the config asks, with and
  without XLA."""

  def test_synthesize_draws_the_same_with_and_without_xla(self):
    rng = np.random.default_rng(2)
    q = tf.math.l2_normalize(rng.normal(size=(3, 8)).astype(np.float32), axis=1)
    queue = tf.math.l2_normalize(rng.normal(size=(40, 8)).astype(np.float32), axis=1)
    l_neg = tf.matmul(q, queue, transpose_b=True)
    cfg = mixing.MochiConfig(5, 16, 8)  # K = 8·N: the chunked top-N runs outside XLA
    runs = [mixing.synthesize(q, queue, l_neg, tf.constant([3, 4]), cfg, jit_compile=j)
            for j in (None, False, True)]
    for run in runs:
      self.assertAllEqual(run.hard_indices, topn.hardest_indices(l_neg, 5, method="top_k"))
      self.assertAllEqual(run.mix_indices, runs[0].mix_indices)
      self.assertAllClose(run.logits, runs[0].logits, atol=1e-6)

  def test_inside_xla_the_synthesis_joins_the_compiled_function(self):
    """Under --jit_compile (or a TPU) the synthesis must be part of the step's XLA computation: as
    a nested jit_compile function XLA would take its inputs as compile-time constants and
    recompile it at every step (measured: 35 s per step on a tiny ResNet)."""
    rng = np.random.default_rng(5)
    q = tf.math.l2_normalize(rng.normal(size=(3, 8)).astype(np.float32), axis=1)
    queue = tf.math.l2_normalize(rng.normal(size=(40, 8)).astype(np.float32), axis=1)
    l_neg = tf.matmul(q, queue, transpose_b=True)
    step = tf.function(lambda q, queue, l_neg: mixing.synthesize(
        q, queue, l_neg, tf.constant([3, 4]), mixing.MochiConfig(5, 16, 8)).logits,
                       jit_compile=True)
    graph = step.get_concrete_function(q, queue, l_neg).graph
    calls = [op.type for op in graph.get_operations() if "PartitionedCall" in op.type]
    self.assertEmpty(calls)

  def test_approx_top_n_in_the_synthesis(self):
    x = np.random.default_rng(4).normal(size=(16, 512)).astype(np.float32)
    # The synthesis follows the config's choice, inside and outside XLA.
    q = tf.math.l2_normalize(x[:3, :8], axis=1)
    queue = tf.math.l2_normalize(x[3:43, :8], axis=1)
    l_neg = tf.matmul(q, queue, transpose_b=True)
    cfg = mixing.MochiConfig(5, 16, 8, top_n="approx", top_n_recall=0.9)
    for jit in (None, True):
      run = mixing.synthesize(q, queue, l_neg, tf.constant([3, 4]), cfg, jit_compile=jit)
      self.assertAllEqual(run.hard_indices, topn.hardest_indices(l_neg, 5, method="top_k"))
    with self.assertRaisesRegex(ValueError, "mochi_topn must be one of exact, approx"):
      mixing.MochiConfig(4, 2, 2, top_n="fast").validate()
    with self.assertRaisesRegex(ValueError, r"mochi_topn_recall must be in \(0, 1\]"):
      mixing.MochiConfig(4, 2, 2, top_n_recall=1.5).validate()


if __name__ == "__main__":
  tf.test.main()
