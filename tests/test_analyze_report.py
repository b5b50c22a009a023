"""Tests for tfmochi.analyze.report: the measures on arrays whose answer is known.

The arrays are built so that the answer is known by construction (a planted false-negative rate,
one overwhelming negative, identical views, NumPy's percentiles).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmochi import analyze
from tfmochi import losses as losses_lib
from tfmochi import mixing
import eval_fixtures as fx  # tests/ is on sys.path under pytest


class NegativesReportTest(tf.test.TestCase):

  def test_planted_false_negative_rates(self):
    q, queue, q_labels, queue_labels = fx.planted()
    report = analyze.negatives_report(q, q, queue, q_labels, queue_labels, 0.2, mochi=None)
    fn = report["false_negatives"]
    self.assertAllClose([fn["hardest_0.1pct"], fn["hardest_1pct"], fn["hardest_5pct"],
                         fn["overall"], fn["chance"]], [1.0, 0.25, 0.25, 5 / 400, 5 / 400])
    # Per band: [0, 0.1%) = rank 0; [0.1, 1%) = ranks 1-3 (none); [1, 5%) = ranks 4-19 (4 of 16).
    self.assertAllClose(report["gradient_share"]["false_negative_share"][:3], [1.0, 0.0, 0.25])

  def test_identical_views_align_perfectly(self):
    q, queue, q_labels, queue_labels = fx.planted()
    report = analyze.negatives_report(q, q.copy(), queue, q_labels, queue_labels, 0.2)
    self.assertAllClose(report["alignment"], 0.0, atol=1e-7)
    self.assertEqual(report["proxy_top1"], 100.0)  # q·q = 1 beats every cosine <= 0.9
    self.assertAllClose(report["positives"]["mean"], 1.0)
    expected = float(losses_lib.uniformity(tf.constant(q), t=2.0))
    self.assertAllClose(report["uniformity"], expected)

  def test_gradient_shares_sum_to_one_and_follow_a_planted_hard_negative(self):
    rng = np.random.default_rng(1)
    q = fx.unit(rng.normal(size=[8, 32])).astype(np.float32)
    k = fx.unit(q + 0.1 * rng.normal(size=q.shape)).astype(np.float32)
    queue = fx.unit(rng.normal(size=[1000, 32])).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    queue_labels = rng.integers(0, 5, size=1000)
    report = analyze.negatives_report(q, k, queue, labels, queue_labels, 0.2)
    self.assertAllClose(sum(report["gradient_share"]["share"]), 1.0)
    desc = -np.sort(-(q @ queue.T), axis=1)
    shares = analyze.band_gradient_shares(desc, np.full([8], 1000), 0.2)
    self.assertAllClose(shares.sum(axis=1), np.ones(8))

    # One negative equal to the query, the rest orthogonal: it carries ~all the gradient.
    q1 = np.eye(1, 32, dtype=np.float32)
    queue1 = fx.unit(rng.normal(size=[999, 32]))
    queue1[:, 0] = 0.0
    queue1 = np.concatenate([fx.unit(queue1), q1]).astype(np.float32)
    report = analyze.negatives_report(q1, q1, queue1, [0], np.ones(1000, np.int64), 0.05)
    share = report["gradient_share"]["share"]
    self.assertGreater(share[0], 0.9999)  # e^20 against 999 · e^0
    self.assertAllClose(sum(share), 1.0)
    self.assertGreater(report["gradient_share"]["hardest_5pct"], 0.9999)
    self.assertAllClose(report["negatives"]["max"], 1.0)

  def test_percentiles_match_numpy(self):
    rng = np.random.default_rng(2)
    q = fx.unit(rng.normal(size=[70, 16])).astype(np.float32)  # > one chunk of 64
    queue = fx.unit(rng.normal(size=[333, 16])).astype(np.float32)
    ids = np.arange(70)  # queries 0..69 are queue entries 0..69: their own key is masked
    report = analyze.negatives_report(q, q, queue, np.zeros(70), np.ones(333), 0.2, q_ids=ids,
                                      queue_ids=np.arange(333))
    sims = q.astype(np.float64) @ queue.T.astype(np.float64)
    rows = [np.delete(sims[i], i) for i in range(70)]
    for p in (50.0, 90.0, 99.0, 99.9):
      expected = np.mean([np.percentile(r, p) for r in rows])
      self.assertAllClose(report["negatives"][f"p{p:g}"], expected, atol=1e-6)
    self.assertAllClose(report["negatives"]["max"], np.mean([r.max() for r in rows]), atol=1e-6)
    self.assertAllClose(report["negatives"]["mean"], np.mean([r.mean() for r in rows]), atol=1e-6)
    self.assertEqual(report["duplicates_masked"], 70)
    self.assertEqual(report["negatives_per_query"], {"min": 332, "max": 332})
    self.assertEqual(report["false_negatives"]["overall"], 0.0)  # labels 0 vs 1

    # The helper on ragged rows.
    values = rng.normal(size=[5, 50])
    counts = np.array([1, 2, 7, 33, 50])
    desc = -np.sort(-values, axis=1)
    got = analyze.row_percentiles(desc, counts, [0, 12.5, 50, 99.9, 100])
    for i, n in enumerate(counts):
      self.assertAllClose(got[i], np.percentile(desc[i, :n], [0, 12.5, 50, 99.9, 100]))

  def test_proxy_accuracy_and_loss_match_losses_module(self):
    rng = np.random.default_rng(3)
    q = fx.unit(rng.normal(size=[20, 8])).astype(np.float32)
    k = fx.unit(q + 0.5 * rng.normal(size=q.shape)).astype(np.float32)
    queue = fx.unit(rng.normal(size=[50, 8])).astype(np.float32)
    report = analyze.negatives_report(q, k, queue, np.zeros(20), np.zeros(50), 0.1)
    l_pos = tf.constant(np.sum(q * k, 1))
    l_neg = tf.constant(q @ queue.T)
    acc = losses_lib.proxy_accuracy(l_pos, l_neg)
    self.assertAllClose(report["proxy_top1"], 100 * float(tf.reduce_mean(acc[1])))
    self.assertAllClose(report["proxy_top5"], 100 * float(tf.reduce_mean(acc[5])))
    self.assertAllClose(report["infonce_loss"],
                        float(tf.reduce_mean(losses_lib.info_nce(l_pos, l_neg, 0.1))), atol=1e-5)
    self.assertEqual(report["false_negatives"]["overall"], 1.0)  # every label is 0

  def test_mochi_section(self):
    q, queue, q_labels, queue_labels = fx.planted()
    config = mixing.MochiConfig(num_hard=8, num_mix=64, num_query_mix=32)
    report = analyze.negatives_report(q, q, queue, q_labels, queue_labels, 0.2, mochi=config)
    mo = report["mochi"]
    self.assertEqual((mo["num_hard"], mo["num_mix"], mo["num_query_mix"]), (8, 64, 32))
    self.assertLess(mo["logit_vs_feature_max_abs_diff"], 1e-5)
    # Top-8 of block i holds ranks 0 and 4 of class i: 2 / 8 same class.
    self.assertAllClose(mo["false_negatives"]["top_n"], 0.25)
    self.assertBetween(mo["false_negatives"]["type1_any_source"], 0.0, 1.0)
    self.assertGreaterEqual(mo["false_negatives"]["type1_any_source"],
                            mo["false_negatives"]["type1_both_sources"])
    # Mixing the query in (β > 0) always raises the cosine above the source's: q·h' > q·n_j.
    self.assertGreater(mo["similarity"]["type2"]["mean"], mo["similarity"]["queue_top_n"]["mean"])
    # A type-1 point lies between two cosines <= 0.9 of orthogonal noise: it can beat the hardest.
    for name in ("type1", "type2", "all"):
      self.assertBetween(mo["harder_than_hardest_real"][name], 0.0, 1.0)
    self.assertAllClose(mo["similarity"]["queue_top_n"]["max"], 0.9)
    hists = report["histograms"]
    self.assertEqual(sum(hists["mochi_type1"]), 4 * 64)
    self.assertEqual(sum(hists["mochi_type2"]), 4 * 32)
    self.assertEqual(sum(hists["negatives_all"]), 4 * 400)
    self.assertEqual(sum(hists["negatives_hardest_1pct"]), 4 * 4)

  def test_shapes_are_checked(self):
    with self.assertRaisesRegex(analyze.AnalyzeError, "Shapes disagree"):
      analyze.negatives_report(np.ones([2, 4]), np.ones([2, 4]), np.ones([5, 3]), [0, 0],
                               np.zeros(5), 0.2)

  def test_semantic_similarity_with_an_injected_function(self):
    # Classes 2j and 2j+1 are siblings (similarity 1), everything else 0. Each query's hardest
    # negatives are of its sibling class, the rest of unrelated classes.
    rng = np.random.default_rng(4)
    q = np.eye(2, 32, dtype=np.float32)
    close = fx.unit(np.eye(1, 32, 0) * 0.9 + np.eye(1, 32, 5) * 0.1 * rng.random([20, 1]))
    close2 = fx.unit(np.eye(1, 32, 1) * 0.9 + np.eye(1, 32, 6) * 0.1 * rng.random([20, 1]))
    far = rng.normal(size=[360, 32])
    far[:, :2] = 0.0
    queue = np.concatenate([close, close2, fx.unit(far)]).astype(np.float32)
    queue_labels = np.concatenate([np.full(20, 1), np.full(20, 0), rng.integers(4, 10, 360)])
    similarity = lambda a, b: 1.0 if a // 2 == b // 2 else 0.0  # noqa: E731
    report = analyze.negatives_report(q, q, queue, [0, 1], queue_labels, 0.2,
                                      class_similarity=similarity)
    sem = report["semantic_similarity"]
    self.assertEqual(sem["available"], True)
    self.assertEqual(sem["hardest_1pct"], 1.0)  # 4 hardest of 400: all of the sibling class
    self.assertEqual(sem["hardest_1pct_pairs"], 8)
    self.assertLess(sem["random"], 0.3)
    self.assertEqual(sem["measure"], "custom")


if __name__ == "__main__":
  tf.test.main()
