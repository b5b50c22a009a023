"""Tests of tfmochi.losses against NumPy references and the worked numbers of
docs/ALGORITHMS.md §10."""

import math
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import testdata  # tests/testdata.py

from tfmochi import losses


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- NumPy references written in probability space, exactly as the authors' code reads.
def np_info_nce(l_pos, l_neg, t):
  logits = np.concatenate([l_pos[:, None], l_neg], 1) / t
  m = logits.max(1, keepdims=True)
  return (np.log(np.exp(logits - m).sum(1)) + m[:, 0]) - l_pos / t


def np_debiased(l_pos, l_neg, t, tau_plus, beta=None):
  pos = np.exp(l_pos / t)
  neg = np.exp(l_neg / t)
  n = l_neg.shape[1]
  if beta is None:
    sum_neg = neg.sum(1)
  else:  # HCL: reweight_neg = Σ w·neg / mean(w), w = neg^β
    w = neg ** beta
    sum_neg = (w * neg).sum(1) / w.mean(1)
  ng = (-tau_plus * n * pos + sum_neg) / (1 - tau_plus)
  ng = np.maximum(ng, n * math.exp(-1 / t))
  return -np.log(pos / (pos + ng))


def simclr_pairs(out1, out2):
  """l_pos [2B] and l_neg [2B, 2B−2] of the DCL/HCL reference code's SimCLR batch."""
  out = np.concatenate([out1, out2], 0)
  b = len(out1)
  sim = out @ out.T
  l_pos = np.concatenate([(out1 * out2).sum(1)] * 2)
  l_neg = []
  for a in range(2 * b):
    partner = (a + b) % (2 * b)
    l_neg.append([sim[a, j] for j in range(2 * b) if j not in (a, partner)])
  return l_pos, np.array(l_neg)


E2_Q = _normalize([[1, 0.2, 0]])
E2_K = _normalize([[0.9, 0.1, 0.2]])
E2_QUEUE = _normalize([[0.9, 0.3, 0.1], [0.7, -0.5, 0.5], [0.1, 1, 0], [-0.8, 0.2, 0.5],
                       [0.5, 0.6, 0.7], [0, 0, 1]])


class WorkedExamplesTest(tf.test.TestCase):
  """docs/ALGORITHMS.md §10, tolerance 1e-6 (float32 computation, so 1e-5 relative)."""

  def test_e1_infonce(self):
    q, k = np.array([[1.0, 0, 0]]), np.array([[0.8, 0.6, 0]])
    queue = np.array([[0, 1, 0], [0, 0, 1], [0.6, 0, 0.8], [-1, 0, 0.0]])
    l_pos, l_neg = (q * k).sum(1), q @ queue.T
    self.assertAllClose(l_neg[0] / 0.2, [0, 0, 3, -5])
    self.assertAllClose(losses.info_nce(l_pos, l_neg, 0.2), [0.339777], atol=1e-6)
    self.assertAllClose(losses.info_nce(l_pos, l_neg, 0.07), [0.055864], atol=1e-6)

  def test_e2_moco_loss(self):
    l_pos, l_neg = (E2_Q * E2_K).sum(1), E2_Q @ E2_QUEUE.T
    self.assertAllClose(l_neg[0], [0.986811, 0.591312, 0.292714, -0.772779, 0.579667, 0],
                        atol=1e-6)
    self.assertAllClose(losses.info_nce(l_pos, l_neg, 0.2), [0.876449], atol=1e-6)
    # With the worked synthetic logits appended: MoCHi(3, 1, 0) and MoCHi(3, 1, 1).
    h, h2 = 0.750759, 0.721909
    self.assertAllClose(losses.info_nce(l_pos, np.concatenate([l_neg, [[h]]], 1), 0.2),
                        [1.004980], atol=1e-6)
    self.assertAllClose(losses.info_nce(l_pos, np.concatenate([l_neg, [[h, h2]]], 1), 0.2),
                        [1.104292], atol=1e-6)

  def test_e3_debiased_and_hard(self):
    out1 = np.array([[1.0, 0, 0], [0, 1, 0]])
    out2 = np.array([[0.8, 0.6, 0], [0, 0.8, 0.6]])
    l_pos, l_neg = simclr_pairs(out1, out2)
    t = 0.5
    self.assertAllClose(np.exp(l_pos / t), [4.953032] * 4, atol=1e-6)
    self.assertAllClose(np.exp(l_neg / t), [[1, 1], [1, 3.320117], [3.320117, 2.611696],
                                            [1, 2.611696]], atol=1e-6)
    mean = lambda x: float(np.mean(x))
    self.assertAllClose(mean(losses.info_nce(l_pos, l_neg, t)), 0.575331, atol=1e-6)
    self.assertAllClose(mean(losses.debiased(l_pos, l_neg, t, 0.1)), 0.492596, atol=1e-6)
    self.assertAllClose(mean(losses.debiased(l_pos, l_neg, t, 0.5)), 0.123169, atol=1e-6)
    self.assertAllClose(mean(losses.hard(l_pos, l_neg, t, 0.1, 1.0)), 0.556134, atol=1e-6)
    self.assertAllClose(mean(losses.hard(l_pos, l_neg, t, 0.0, 1.0)), 0.628944, atol=1e-6)

  def test_e4_cai_removal(self):
    l_pos, l_neg = (E2_Q * E2_K).sum(1), E2_Q @ E2_QUEUE.T
    ln = tf.constant(l_neg, tf.float32)
    # K = 6: 10% -> ⌈0.6⌉ = 1 negative dropped (n0); 50% -> the 3 hardest kept (n0, n1, n4).
    drop = losses.hardest_negatives_mask(ln, drop_hardest=10)
    keep = losses.hardest_negatives_mask(ln, keep_hardest=50)
    self.assertAllEqual(drop, [[True, False, False, False, False, False]])
    self.assertAllEqual(keep, [[False, False, True, True, False, True]])
    self.assertAllClose(losses.info_nce(l_pos, losses.apply_mask(ln, drop), 0.2), [0.285006],
                        atol=1e-6)
    self.assertAllClose(losses.info_nce(l_pos, losses.apply_mask(ln, keep), 0.2), [0.859133],
                        atol=1e-6)

  def test_e5_alignment_uniformity(self):
    x = np.array([[1.0, 0], [0, 1], [-1, 0]])
    y = np.array([[0.8, 0.6], [0.6, 0.8], [-0.8, -0.6]])
    self.assertAllClose(losses.alignment(x, y), 0.4, atol=1e-6)
    self.assertAllClose(losses.uniformity(x), -4.396349, atol=1e-6)
    self.assertAllClose(losses.uniformity(y), -1.257757, atol=1e-6)
    self.assertAllClose(losses.alignment(x, x), 0.0)

  def test_e6_supcon(self):
    features = np.array([[[1, 0], [0.8, 0.6]], [[0.6, 0.8], [0, 1]], [[-1, 0], [-0.6, -0.8]]])
    labels = np.array([0, 0, 1])
    self.assertAllClose(losses.supcon_batch(features, labels, 0.1, 0.07), 2.572221, atol=1e-5)
    self.assertAllClose(losses.supcon_batch(features, labels, 0.1, 0.1), 1.800554, atol=1e-5)
    self.assertAllClose(losses.supcon_batch(features, None, 0.1, 0.1), 0.644999, atol=1e-5)


class LossFamilyTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    q = _normalize(rng.normal(size=(5, 8)))
    k = _normalize(q + 0.3 * rng.normal(size=(5, 8)))
    queue = _normalize(rng.normal(size=(32, 8)))
    self.l_pos, self.l_neg = (q * k).sum(1), q @ queue.T

  @parameterized.parameters(0.07, 0.2, 0.5, 1.0)
  def test_infonce_matches_numpy(self, t):
    self.assertAllClose(losses.info_nce(self.l_pos, self.l_neg, t),
                        np_info_nce(self.l_pos, self.l_neg, t), rtol=1e-5, atol=1e-5)

  @parameterized.product(t=(0.2, 0.5), tau_plus=(0.0, 0.05, 0.1, 0.3))
  def test_debiased_matches_numpy(self, t, tau_plus):
    self.assertAllClose(losses.debiased(self.l_pos, self.l_neg, t, tau_plus),
                        np_debiased(self.l_pos, self.l_neg, t, tau_plus), rtol=1e-5, atol=1e-5)

  @parameterized.product(t=(0.2, 0.5), tau_plus=(0.0, 0.1), beta=(0.0, 0.5, 1.0, 2.0))
  def test_hard_matches_numpy(self, t, tau_plus, beta):
    self.assertAllClose(losses.hard(self.l_pos, self.l_neg, t, tau_plus, beta),
                        np_debiased(self.l_pos, self.l_neg, t, tau_plus, beta),
                        rtol=1e-5, atol=1e-5)

  def test_reductions(self):
    # Debiased with τ+ = 0 is InfoNCE; hard with β = 0 is debiased.
    self.assertAllClose(losses.debiased(self.l_pos, self.l_neg, 0.2, 0.0),
                        losses.info_nce(self.l_pos, self.l_neg, 0.2), atol=1e-6)
    self.assertAllClose(losses.hard(self.l_pos, self.l_neg, 0.2, 0.1, 0.0),
                        losses.debiased(self.l_pos, self.l_neg, 0.2, 0.1), atol=1e-6)

  def test_absent_negatives_are_ignored(self):
    """-inf entries behave exactly as if the column did not exist, N included."""
    ln = self.l_neg.copy()
    ln_masked = ln.copy()
    ln_masked[:, 10:] = -np.inf
    for fn in (lambda a, b: losses.info_nce(a, b, 0.2),
               lambda a, b: losses.debiased(a, b, 0.2, 0.1),
               lambda a, b: losses.hard(a, b, 0.2, 0.1, 1.0)):
      self.assertAllClose(fn(self.l_pos, ln_masked), fn(self.l_pos, ln[:, :10]), atol=1e-6)

  @parameterized.parameters(0.0, 0.1)
  def test_hard_beta_zero_is_debiased_under_every_mask(self, tau_plus):
    """β = 0 equals the debiased loss exactly, with -inf entries (β·(-inf) used to give NaN)."""
    ln = self.l_neg.copy()
    ln[0, :] = -np.inf  # a fully masked row
    ln[1, 3] = ln[1, 17] = -np.inf  # scattered (duplicates, class oracle)
    ln[2, :16] = -np.inf  # keep-hardest style: half the row gone
    ln[3, 30:] = -np.inf  # trailing columns (MoCHi warm-up: absent synthetic points)
    for l_neg in (ln, self.l_neg):
      hard = losses.hard(self.l_pos, l_neg, 0.2, tau_plus, 0.0).numpy()
      self.assertTrue(np.all(np.isfinite(hard)))
      self.assertAllEqual(hard, losses.debiased(self.l_pos, l_neg, 0.2, tau_plus))

  def test_supcon_single_positive_is_infonce(self):
    logits = np.concatenate([self.l_pos[:, None], self.l_neg], 1)
    mask = np.zeros_like(logits, bool)
    mask[:, 0] = True
    self.assertAllClose(losses.supcon_from_logits(logits, mask, 0.2),
                        losses.info_nce(self.l_pos, self.l_neg, 0.2), atol=1e-6)

  def test_gradients_finite_and_consistent(self):
    """Gradients through the log-space losses equal finite-difference estimates; masked
    entries get zero gradient; no NaN even when the clamp binds (τ+ = 0.5)."""
    l_pos = tf.constant(self.l_pos, tf.float64)
    ln = self.l_neg.copy()
    ln[:, -4:] = -np.inf
    l_neg = tf.constant(ln, tf.float64)
    for fn in (lambda a, b: losses.info_nce(a, b, 0.2),
               lambda a, b: losses.debiased(a, b, 0.2, 0.5),
               lambda a, b: losses.hard(a, b, 0.2, 0.1, 1.0)):
      with tf.GradientTape() as tape:
        tape.watch([l_pos, l_neg])
        value = tf.reduce_sum(fn(tf.cast(l_pos, tf.float32), tf.cast(l_neg, tf.float32)))
      g_pos, g_neg = tape.gradient(value, [l_pos, l_neg])
      self.assertTrue(np.all(np.isfinite(g_pos)) and np.all(np.isfinite(g_neg)))
      self.assertAllEqual(g_neg[:, -4:], np.zeros((5, 4)))
    # Sign: raising the positive lowers the InfoNCE loss, raising a negative raises it.
    with tf.GradientTape() as tape:
      tape.watch([l_pos, l_neg])
      value = tf.reduce_sum(losses.info_nce(l_pos, l_neg, 0.2))
    g_pos, g_neg = tape.gradient(value, [l_pos, l_neg])
    self.assertTrue(np.all(g_pos < 0))
    self.assertTrue(np.all(g_neg[:, :-4] > 0))

  def test_float16_inputs_stay_finite(self):
    """Under mixed precision the logits may arrive as float16: computed in float32, T = 0.07."""
    l_pos = tf.constant(self.l_pos, tf.float16)
    l_neg = tf.constant(np.tile(self.l_neg, (1, 64)), tf.float16)
    value = losses.hard(l_pos, l_neg, 0.07, 0.1, 2.0)
    self.assertEqual(value.dtype, tf.float32)
    self.assertTrue(np.all(np.isfinite(value)))

  def test_cai_mask_counts(self):
    ln = tf.constant(self.l_neg, tf.float32)
    for p, expect in ((5, 2), (50, 16), (0.1, 1)):  # ⌈p·32/100⌉
      drop = losses.hardest_negatives_mask(ln, drop_hardest=p)
      keep = losses.hardest_negatives_mask(ln, keep_hardest=p)
      self.assertAllEqual(tf.reduce_sum(tf.cast(drop, tf.int32), 1), [expect] * 5)
      self.assertAllEqual(tf.reduce_sum(tf.cast(keep, tf.int32), 1), [32 - expect] * 5)
      # The dropped ones are the hardest: every dropped logit >= every kept logit.
      d = np.where(drop, self.l_neg, np.inf).min(1)
      k = np.where(drop, -np.inf, self.l_neg).max(1)
      self.assertTrue(np.all(d >= k))

  def test_proxy_accuracy(self):
    l_pos = np.array([0.9, 0.5, 0.1])
    l_neg = np.array([[0.1, 0.2, 0.3], [0.6, 0.4, 0.0], [0.2, 0.3, 0.4]])
    acc = losses.proxy_accuracy(l_pos, l_neg, topk=(1, 2, 5))
    self.assertAllEqual(acc[1], [1, 0, 0])
    self.assertAllEqual(acc[2], [1, 1, 0])
    self.assertAllEqual(acc[5], [1, 1, 1])

  @testdata.needs_host_xla
  def test_tf_function_and_xla_agree_with_eager(self):
    args = (tf.constant(self.l_pos, tf.float32), tf.constant(self.l_neg, tf.float32))
    fn = lambda a, b: losses.hard(a, b, 0.2, 0.1, 1.0)
    eager = fn(*args)
    self.assertAllClose(tf.function(fn)(*args), eager, atol=1e-6)
    self.assertAllClose(tf.function(fn, jit_compile=True)(*args), eager, atol=1e-5)


class BlocksAndRowSumTest(tf.test.TestCase, parameterized.TestCase):
  """The row as blocks (MoCHi's synthetic logits beside the queue's) and `row_sum`'s
  matrix-vector sums: the same values as one concatenated row and tf.reduce_sum."""

  @parameterized.parameters((5,), (3, 7), (2, 4096), (2, 6000), (3, 4099), (2, 3, 128))
  def test_row_sum_matches_reduce_sum(self, *shape):
    """Short rows, rows summed in pieces of a divisor (4096, 6000), a prime length (4099: one
    product over the whole row), a batch of rows ([2, 3, 128]); eager, tf.function and XLA."""
    x = tf.constant(np.random.default_rng(1).normal(size=shape), tf.float32)
    expect = np.asarray(x, np.float64).sum(-1)
    for fn in (losses.row_sum, tf.function(losses.row_sum),
               tf.function(losses.row_sum, jit_compile=True)):
      got = fn(x)
      self.assertEqual(got.shape, expect.shape)
      self.assertAllClose(got, expect, rtol=1e-5, atol=1e-4)
    # A length unknown when tracing (a queue of dynamic shape): tf.reduce_sum's value.
    dynamic = tf.function(losses.row_sum, input_signature=[
        tf.TensorSpec([None] * len(shape), tf.float32)])
    self.assertAllClose(dynamic(x), expect, rtol=1e-5, atol=1e-4)

  def test_row_sum_is_a_reduction_where_an_accelerator_is_visible(self):
    """On a TPU (bfloat16 passes) or a TensorFloat-32 GPU a product with ones would round every
    summand: there `row_sum` is `tf.reduce_sum`; on a CPU-only host, matrix-vector products."""
    def op_types(accelerator):
      with mock.patch.object(losses.distribute, "accelerator_visible", lambda: accelerator):
        graph = tf.function(losses.row_sum).get_concrete_function(
            tf.TensorSpec([4, 4096], tf.float32)).graph
      return {op.type for op in graph.get_operations()}
    self.assertIn("MatMul", op_types(False))
    accelerated = op_types(True)
    self.assertIn("Sum", accelerated)
    self.assertFalse({"MatMul", "BatchMatMulV2", "BatchMatMulV3"} & accelerated)

  def _split(self):
    """l_neg with absent entries, and its two blocks [5, 20] and [5, 12]."""
    l_neg = self.l_neg.copy()
    l_neg[0, 3] = l_neg[2, 25] = -np.inf
    l_neg[4, :] = -np.inf  # a row without any negative
    l_neg = tf.constant(l_neg, tf.float32)
    return l_neg, (l_neg[:, :20], l_neg[:, 20:])

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.l_pos = rng.uniform(-1, 1, size=5).astype(np.float32)
    self.l_neg = rng.uniform(-1, 1, size=(5, 32)).astype(np.float32)

  def test_blocks_equal_the_concatenated_row(self):
    l_neg, blocks = self._split()
    l_pos = tf.constant(self.l_pos)
    fns = {"infonce": lambda n: losses.info_nce(l_pos, n, 0.2),
           "debiased": lambda n: losses.debiased(l_pos, n, 0.2, 0.1),
           "hard": lambda n: losses.hard(l_pos, n, 0.2, 0.1, 1.5),
           "rank": lambda n: losses.proxy_rank(l_pos, n),
           "count": losses.count_negatives}
    for name, fn in fns.items():
      whole = fn(l_neg)
      for run in (fn, tf.function(fn), tf.function(fn, jit_compile=True)):
        self.assertAllClose(run(blocks), whole, rtol=1e-6, atol=1e-6, msg=name)

  def test_gradient_is_the_softmax_and_zero_on_an_empty_row(self):
    """The log-sum-exp's own gradient (computed afresh from the logits) equals autodiff through
    tf.reduce_logsumexp, per block; a row of -inf only gets a zero gradient, not NaN."""
    l_neg, blocks = self._split()
    l_pos = tf.constant(self.l_pos)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch([l_pos, l_neg] + list(blocks))
      ours = tf.reduce_sum(losses.info_nce(l_pos, blocks, 0.2))
      logits = tf.concat([l_pos[:, None], l_neg], axis=1) / 0.2
      reference = tf.reduce_sum(tf.reduce_logsumexp(logits, axis=1) - l_pos / 0.2)
      hard = tf.reduce_sum(losses.hard(l_pos, blocks[0], 0.2, 0.0001, 2.0))
    g_ours = tape.gradient(ours, [l_pos] + list(blocks))
    g_ref = tape.gradient(reference, [l_pos, l_neg])
    self.assertAllClose(g_ours[0], g_ref[0], atol=1e-6)
    self.assertAllClose(tf.concat(g_ours[1:], axis=1), g_ref[1], atol=1e-6)
    g_hard = tape.gradient(hard, blocks[0])
    self.assertTrue(np.all(np.isfinite(g_hard)))
    self.assertAllEqual(g_hard[4], np.zeros(20))  # the empty row


class BadInputTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(0, -0.1, float("inf"), float("nan"))
  def test_temperature(self, t):
    with self.assertRaisesRegex(ValueError, r"temperature \(T\).*> 0"):
      losses.contrastive_loss(np.zeros(2), np.zeros((2, 3)), temperature=t)

  @parameterized.parameters(-0.1, 1.0, 1.5)
  def test_tau_plus(self, tau):
    with self.assertRaisesRegex(ValueError, r"tau_plus.*\[0, 1\)"):
      losses.contrastive_loss(np.zeros(2), np.zeros((2, 3)), loss="debiased", tau_plus=tau)

  @parameterized.parameters(0, 100, -5, 150)
  def test_percent(self, p):
    with self.assertRaisesRegex(ValueError, r"drop_hardest.*\(0, 100\)"):
      losses.hardest_negatives_mask(tf.zeros([2, 8]), drop_hardest=p)
    with self.assertRaisesRegex(ValueError, r"keep_hardest.*\(0, 100\)"):
      losses.hardest_negatives_mask(tf.zeros([2, 8]), keep_hardest=p)

  def test_unknown_loss_and_exclusive_options(self):
    with self.assertRaisesRegex(ValueError, "infonce, debiased, hard"):
      losses.contrastive_loss(np.zeros(2), np.zeros((2, 3)), loss="nce")
    with self.assertRaisesRegex(ValueError, "exclusive"):
      losses.hardest_negatives_mask(tf.zeros([2, 8]), drop_hardest=5, keep_hardest=5)
    with self.assertRaisesRegex(ValueError, "hard_beta"):
      losses.contrastive_loss(np.zeros(2), np.zeros((2, 3)), loss="hard", hard_beta=-1)


if __name__ == "__main__":
  tf.test.main()
