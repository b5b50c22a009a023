"""Tests of tfmochi.topn: the exact chunked top-N equals top_k's set on every kind of row, the
method checks, and the approximate top-N."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import testdata  # tests/testdata.py

from tfmochi import topn


def _reference_top_n(x, n):
  """Each row's n largest (ties: lower index first), as sorted index lists (NumPy)."""
  order = np.lexsort((np.broadcast_to(np.arange(x.shape[1]), x.shape), -x), axis=1)
  return np.sort(order[:, :n], axis=1)


class ChunkedTopNTest(tf.test.TestCase, parameterized.TestCase):
  """`hardest_indices(method="chunked")` returns exactly `top_k`'s set, on every input."""

  def _cases(self, b, k, n):
    rng = np.random.default_rng(k + n)
    x = rng.normal(size=(b, k)).astype(np.float32)
    few_finite = x.copy()
    few_finite[:, n // 2:] = -np.inf  # fewer than n finite logits: -inf entries must fill in
    masked = x.copy()
    masked[:, ::3] = -np.inf  # masked duplicates / class oracle
    return {
        "normal": x,
        "sorted": np.sort(x, axis=1),  # the top-n all in the last chunks
        "ties": np.round(x * 4) / 4,  # many exact ties, also at the n-th value
        "constant": np.zeros_like(x),
        "masked": masked,
        "few_finite": few_finite,
        "repeated_chunks": np.repeat(x[:, :k // 8], 8, axis=1),
        "tiny_values": x * np.float32(1e-30),
    }

  @parameterized.parameters((3, 40, 5), (2, 16384, 1024))
  def test_equals_top_k_on_every_kind_of_row(self, b, k, n):
    fn = tf.function(lambda x: topn.hardest_indices(x, n, method="chunked"))
    for name, x in self._cases(b, k, n).items():
      got = fn(tf.constant(x)).numpy()
      self.assertEqual(got.dtype, np.int32)
      self.assertAllEqual(got, _reference_top_n(x, n), msg=name)
      self.assertAllEqual(got, topn.hardest_indices(x, n, method="top_k"), msg=name)

  def test_typical_logits_take_the_fast_path(self):
    """On query·queue logits every check passes, so the top_k fallback is not what runs."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 16)).astype(np.float32)
    queue = rng.normal(size=(16384, 16)).astype(np.float32)
    x = tf.constant(q @ queue.T)
    n, k = 1024, 16384
    c = topn._chunk_size(k, n)
    slack, cap = 64, n + n // 2 + 64  # as _chunked_top_n chooses them
    select_chunks, candidates, exact, _ = topn._chunked_stages(k, n, c, slack, cap)
    chunk_mask, t1, count1, ok1 = select_chunks(x)
    cand, mask, count, _, ok3 = candidates(x, topn._compact_true(chunk_mask, count1, n + slack),
                                           t1)
    _, _, ok4 = exact(cand, topn._compact_true(mask, count, cap), t1, count)
    self.assertTrue(ok1 and ok3 and ok4)
    self.assertAllEqual(topn.hardest_indices(x, n, method="chunked"), _reference_top_n(x, n))

  @parameterized.parameters(1, 2, 5)
  def test_compaction_eagerly_and_in_blocks(self, rows):
    """`_compact_true` packs each row's True positions left (flat, ascending, -1 padding, cut at
    the width), eagerly in one `Where` and in a graph in row blocks (any number of rows)."""
    rng = np.random.default_rng(rows)
    mask = rng.random((rows, 12)) < 0.4
    mask[0, :] = True  # more than the width: cut
    if rows > 1:
      mask[1, :] = False  # none: all padding
    width = 6
    expect = np.full((rows, width), -1)
    for r in range(rows):
      flat = np.flatnonzero(mask[r])[:width] + r * 12
      expect[r, :len(flat)] = flat
    counts = tf.constant(mask.sum(1), tf.int32)
    mask = tf.constant(mask)
    self.assertAllEqual(topn._compact_true(mask, counts, width), expect)
    self.assertAllEqual(tf.function(lambda m, c: topn._compact_true(m, c, width))(mask, counts),
                        expect)

  def test_dynamic_batch(self):
    x = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
    fn = tf.function(lambda x: topn.hardest_indices(x, 5, method="chunked"),
                     input_signature=[tf.TensorSpec([None, 40], tf.float32)])
    self.assertAllEqual(fn(x), _reference_top_n(x, 5))

  def test_method_checks(self):
    x = tf.zeros([2, 16])
    with self.assertRaisesRegex(ValueError, "method must be"):
      topn.hardest_indices(x, 4, method="fast")
    with self.assertRaisesRegex(ValueError, r"K >= 8·N"):
      topn.hardest_indices(x, 4, method="chunked")  # K = 16 < 8·4
    self.assertAllEqual(topn.hardest_indices(x, 4), [[0, 1, 2, 3]] * 2)  # auto -> top_k
    # Inside an XLA-compiled function "auto" keeps to top_k (tf.where has no static shape there).
    if not topn.host_xla_available():
      return  # tensorflow-tpu's wheel: no XLA for the CPU to compile with
    y = np.random.default_rng(3).normal(size=(2, 40)).astype(np.float32)
    in_xla = tf.function(lambda y: topn.hardest_indices(y, 5), jit_compile=True)
    self.assertAllEqual(in_xla(y), _reference_top_n(y, 5))

  @testdata.needs_host_xla
  def test_approx_top_n_recall_on_cpu(self):
    """--mochi_topn=approx: tf.math.approx_max_k's set against the exact one. On a CPU both its
    TensorFlow kernel and XLA:CPU return the exact top-N (recall 1 whatever the target); a TPU
    trades recall for speed, about `recall_target` in expectation."""
    x = np.random.default_rng(4).normal(size=(16, 512)).astype(np.float32)  # no ties
    exact = _reference_top_n(x, 32)
    in_xla = tf.function(lambda x: topn.hardest_indices(x, 32, "approx", recall_target=0.5),
                         jit_compile=True)
    for got in (topn.hardest_indices(x, 32, "approx", recall_target=0.95), in_xla(x)):
      got = got.numpy()
      self.assertEqual(got.dtype, np.int32)
      self.assertAllEqual(got, np.sort(got, axis=1))  # ascending, as the exact methods
      recall = np.mean([len(set(g) & set(e)) / 32 for g, e in zip(got, exact)])
      self.assertEqual(recall, 1.0)


if __name__ == "__main__":
  tf.test.main()
