"""Tests for tfmochi.analyze: planted structure on plain arrays, WordNet paths, the CLI.

The metrics are checked on arrays whose answer is known by construction (a planted false-negative
rate, one overwhelming negative, identical views, NumPy's percentiles). The CLI subprocesses (a
full analysis of a quickstart run at 16 px and the error cases) start first and overlap with the
in-process tests.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from tfmochi import analyze
from tfmochi import config as config_lib
from tfmochi import data as data_lib
from tfmochi import losses as losses_lib
from tfmochi import mixing
from tfmochi import models

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PNGS = ("similarities.png", "false_negatives.png", "gradient_share.png", "mochi.png")


# -------------------------------------------------------------------------------------------------
# Helpers


@functools.lru_cache(maxsize=None)
def _workdir() -> str:
  path = tempfile.mkdtemp(prefix="tfmochi-test-analyze-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def _make_run(model_dir: str, checkpoint: bool = True) -> str:
  """A run directory as the trainer leaves it (config.json + a query-encoder checkpoint)."""
  os.makedirs(model_dir, exist_ok=True)
  if checkpoint:
    encoder = models.build_encoder("resnet18", small_stem=True, name="query_encoder")
    ckpt = tf.train.Checkpoint(step=tf.Variable(1, dtype=tf.int64), query_encoder=encoder)
    tf.train.CheckpointManager(ckpt, os.path.join(model_dir, "checkpoints"), max_to_keep=3).save(
        checkpoint_number=1)
  # MoCHi off (explicitly: the defaults turned it on), so the analysis uses its own defaults.
  # head_bn=False: the checkpoint above holds build_encoder's default (MoCo v2) head.
  config = config_lib.TrainConfig(dataset="quickstart", arch="resnet18", small_stem=True,
                                  head_bn=False, image_size=16, model_dir=model_dir,
                                  bn_mode="none",
                                  queue_size=256, batch_size=32, mochi_num_hard=0,
                                  mochi_num_mix=0, mochi_num_query_mix=0)
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    f.write(json.dumps(dataclasses.asdict(config)))
  return model_dir


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _planted(num_queries: int = 4, per_block: int = 100, dim: int = 64, seed: int = 0):
  """Queries e_0..e_{M-1}; queue block i is similar only to query i, with decreasing cosine.

  In block i, the entries of rank 0, 4, 8, 12, 16 (hardest first) have the query's class i; the
  other entries have class M (no query has it). With K = 400: the hardest 0.1% (1 entry) is 100%
  same class, the hardest 1% (4) and 5% (20) are exactly 25%, and overall 5 / 400.
  """
  rng = np.random.default_rng(seed)
  q = np.eye(num_queries, dim, dtype=np.float32)
  queue, labels = [], []
  for i in range(num_queries):
    noise = rng.normal(size=[per_block, dim])
    noise[:, :num_queries] = 0.0  # orthogonal to every query
    noise = _unit(noise)
    cos = 0.9 - 0.004 * np.arange(per_block)  # rank r has cosine 0.9 - 0.004 r
    queue.append(cos[:, None] * q[i][None, :] + np.sqrt(1 - cos[:, None] ** 2) * noise)
    block_labels = np.full([per_block], num_queries)
    block_labels[[0, 4, 8, 12, 16]] = i
    labels.append(block_labels)
  perm = rng.permutation(num_queries * per_block)  # the queue order must not matter
  queue = np.concatenate(queue).astype(np.float32)[perm]
  return q, queue, np.arange(num_queries), np.concatenate(labels)[perm]


_STARTED: list[subprocess.Popen] = []


@atexit.register
def _stop_started() -> None:
  for process in _STARTED:
    if process.poll() is None:
      process.kill()


def _python(*args: str) -> subprocess.Popen:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": _REPO,
         "CUDA_VISIBLE_DEVICES": ""}
  process = subprocess.Popen([sys.executable, "-m", "tfmochi.analyze", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=_workdir())
  _STARTED.append(process)
  return process


@functools.lru_cache(maxsize=None)
def _cli() -> dict:
  """Starts every CLI case at once; returns {name: (Popen, output_dir)}."""
  root = _workdir()
  good = _make_run(os.path.join(root, "run"))
  empty = _make_run(os.path.join(root, "empty"), checkpoint=False)
  blocker = os.path.join(root, "a_file")
  with open(blocker, "w") as f:
    f.write("not a directory")
  out = os.path.join(root, "analysis")
  return {
      "analyze": (_python(f"--model_dir={good}", f"--output_dir={out}", "--num_queries=64"), out),
      "no_checkpoint": (_python(f"--model_dir={empty}", f"--output_dir={root}/x"), None),
      "unwritable": (_python(f"--model_dir={good}", f"--output_dir={blocker}/out"), None),
      "bad_flag": (_python(f"--model_dir={good}", "--num_queries=0"), None),
  }


@functools.lru_cache(maxsize=None)
def _finished(name: str) -> tuple[int, str, str, str | None]:
  process, out = _cli()[name]
  stdout, stderr = process.communicate(timeout=240)
  return process.returncode, stdout, stderr, out


# -------------------------------------------------------------------------------------------------
# Metrics on arrays


class NegativesReportTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # In one process the CLI subprocesses overlap with the in-process tests. Under pytest-xdist
    # the single CLI test starts them itself, so only the worker that runs it pays for them.
    if "PYTEST_XDIST_WORKER" not in os.environ:
      _cli()

  def test_planted_false_negative_rates(self):
    q, queue, q_labels, queue_labels = _planted()
    report = analyze.negatives_report(q, q, queue, q_labels, queue_labels, 0.2, mochi=None)
    fn = report["false_negatives"]
    self.assertAllClose([fn["hardest_0.1pct"], fn["hardest_1pct"], fn["hardest_5pct"],
                         fn["overall"], fn["chance"]], [1.0, 0.25, 0.25, 5 / 400, 5 / 400])
    # Per band: [0, 0.1%) = rank 0; [0.1, 1%) = ranks 1-3 (none); [1, 5%) = ranks 4-19 (4 of 16).
    self.assertAllClose(report["gradient_share"]["false_negative_share"][:3], [1.0, 0.0, 0.25])

  def test_identical_views_align_perfectly(self):
    q, queue, q_labels, queue_labels = _planted()
    report = analyze.negatives_report(q, q.copy(), queue, q_labels, queue_labels, 0.2)
    self.assertAllClose(report["alignment"], 0.0, atol=1e-7)
    self.assertEqual(report["proxy_top1"], 100.0)  # q·q = 1 beats every cosine <= 0.9
    self.assertAllClose(report["positives"]["mean"], 1.0)
    expected = float(losses_lib.uniformity(tf.constant(q), t=2.0))
    self.assertAllClose(report["uniformity"], expected)

  def test_gradient_shares_sum_to_one_and_follow_a_planted_hard_negative(self):
    rng = np.random.default_rng(1)
    q = _unit(rng.normal(size=[8, 32])).astype(np.float32)
    k = _unit(q + 0.1 * rng.normal(size=q.shape)).astype(np.float32)
    queue = _unit(rng.normal(size=[1000, 32])).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    queue_labels = rng.integers(0, 5, size=1000)
    report = analyze.negatives_report(q, k, queue, labels, queue_labels, 0.2)
    self.assertAllClose(sum(report["gradient_share"]["share"]), 1.0)
    desc = -np.sort(-(q @ queue.T), axis=1)
    shares = analyze.band_gradient_shares(desc, np.full([8], 1000), 0.2)
    self.assertAllClose(shares.sum(axis=1), np.ones(8))

    # One negative equal to the query, the rest orthogonal: it carries ~all the gradient.
    q1 = np.eye(1, 32, dtype=np.float32)
    queue1 = _unit(rng.normal(size=[999, 32]))
    queue1[:, 0] = 0.0
    queue1 = np.concatenate([_unit(queue1), q1]).astype(np.float32)
    report = analyze.negatives_report(q1, q1, queue1, [0], np.ones(1000, np.int64), 0.05)
    share = report["gradient_share"]["share"]
    self.assertGreater(share[0], 0.9999)  # e^20 against 999 · e^0
    self.assertAllClose(sum(share), 1.0)
    self.assertGreater(report["gradient_share"]["hardest_5pct"], 0.9999)
    self.assertAllClose(report["negatives"]["max"], 1.0)

  def test_percentiles_match_numpy(self):
    rng = np.random.default_rng(2)
    q = _unit(rng.normal(size=[70, 16])).astype(np.float32)  # > one chunk of 64
    queue = _unit(rng.normal(size=[333, 16])).astype(np.float32)
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
    q = _unit(rng.normal(size=[20, 8])).astype(np.float32)
    k = _unit(q + 0.5 * rng.normal(size=q.shape)).astype(np.float32)
    queue = _unit(rng.normal(size=[50, 8])).astype(np.float32)
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
    q, queue, q_labels, queue_labels = _planted()
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


# -------------------------------------------------------------------------------------------------
# WordNet


class WordNetTest(tf.test.TestCase):

  def test_not_available_without_nltk(self):
    with mock.patch.dict(sys.modules, {"nltk": None, "nltk.corpus": None}):
      with self.assertRaisesRegex(analyze.WordNetUnavailable,
                                  re.escape(analyze.WORDNET_MISSING)):
        analyze.wordnet_class_similarity(["n01440764"])
      fn, message = analyze.semantic_similarity_fn("imagenet100")
    self.assertIsNone(fn)
    self.assertIn("WordNet data not available: pip install nltk && python -m nltk.downloader "
                  "wordnet", message)

  def test_not_available_without_the_corpus(self):
    def missing(*_):
      raise LookupError("Resource wordnet not found.")

    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = types.SimpleNamespace(synset_from_pos_and_offset=missing)
    nltk = types.ModuleType("nltk")
    nltk.corpus = corpus
    with mock.patch.dict(sys.modules, {"nltk": nltk, "nltk.corpus": corpus}):
      with self.assertRaisesRegex(analyze.WordNetUnavailable, "corpus is missing"):
        analyze.wordnet_class_similarity(["n01440764"])

  def test_wordnet_path_with_a_stub_synset(self):
    class Synset:  # Wu-Palmer stand-in: 1 for the same "superclass" (offset // 10), else 0.2

      def __init__(self, offset):
        self.offset = offset

      def wup_similarity(self, other):
        return 1.0 if self.offset // 10 == other.offset // 10 else 0.2

    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = types.SimpleNamespace(
        synset_from_pos_and_offset=lambda pos, offset: Synset(offset))
    nltk = types.ModuleType("nltk")
    nltk.corpus = corpus
    with mock.patch.dict(sys.modules, {"nltk": nltk, "nltk.corpus": corpus}):
      sim = analyze.wordnet_class_similarity(["n00000001", "n00000002", "n00000011"])
    self.assertEqual((sim(0, 1), sim(0, 2), sim.measure), (1.0, 0.2, "wup"))

  def test_semantic_similarity_with_an_injected_function(self):
    # Classes 2j and 2j+1 are siblings (similarity 1), everything else 0. Each query's hardest
    # negatives are of its sibling class, the rest of unrelated classes.
    rng = np.random.default_rng(4)
    q = np.eye(2, 32, dtype=np.float32)
    close = _unit(np.eye(1, 32, 0) * 0.9 + np.eye(1, 32, 5) * 0.1 * rng.random([20, 1]))
    close2 = _unit(np.eye(1, 32, 1) * 0.9 + np.eye(1, 32, 6) * 0.1 * rng.random([20, 1]))
    far = rng.normal(size=[360, 32])
    far[:, :2] = 0.0
    queue = np.concatenate([close, close2, _unit(far)]).astype(np.float32)
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

  def test_html_shows_the_message(self):
    q, queue, q_labels, queue_labels = _planted()
    report = analyze.negatives_report(q, q, queue, q_labels, queue_labels, 0.2,
                                      mochi=mixing.MochiConfig(4, 8, 8))
    report["semantic_similarity"] = {"available": False, "message": analyze.WORDNET_MISSING}
    out = self.create_tempdir().full_path
    plots = analyze.write_plots(report, out)
    path = analyze.write_html(report, out, plots)
    with open(path) as f:
      page = f.read()
    self.assertIn("WordNet data not available: pip install nltk &amp;&amp; python -m "
                  "nltk.downloader wordnet", page)
    for name in plots:
      self.assertIn(f"src='{name}'", page)


# -------------------------------------------------------------------------------------------------
# A run


class RunTest(tf.test.TestCase):

  def test_unlabelled_data_is_refused(self):
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "run"))
    images = np.zeros([8, 8, 8, 3], np.uint8)
    with self.assertRaisesRegex(analyze.AnalyzeError, "has no labels"):
      analyze.analyze_run(model_dir, os.path.join(model_dir, "out"),
                          source=data_lib.from_numpy(images))

  def test_mochi_settings(self):
    on = config_lib.TrainConfig(mochi_num_hard=64, mochi_num_mix=64, mochi_num_query_mix=32)
    mochi, note = analyze.mochi_for_analysis(on, 256)
    self.assertEqual((mochi.num_hard, mochi.num_mix, mochi.num_query_mix), (64, 64, 32))
    self.assertIn("run's", note)
    mochi, _ = analyze.mochi_for_analysis(on, 40)  # N capped by a smaller analysis queue
    self.assertEqual(mochi.num_hard, 40)
    off = dataclasses.replace(on, mochi_num_hard=0, mochi_num_mix=0, mochi_num_query_mix=0)
    mochi, note = analyze.mochi_for_analysis(off, 65536)
    self.assertEqual((mochi.num_hard, mochi.num_mix, mochi.num_query_mix), (1024, 1024, 512))
    self.assertIn("defaults", note)
    self.assertEqual(analyze.mochi_for_analysis(off, 1497)[0].num_hard, 187)

  def test_unwritable_output_dir(self):
    blocker = os.path.join(self.create_tempdir().full_path, "file")
    with open(blocker, "w") as f:
      f.write("x")
    with self.assertRaisesRegex(analyze.AnalyzeError, "--output_dir .* is not writable"):
      analyze.check_output_dir(os.path.join(blocker, "out"))


class CommandLineTest(tf.test.TestCase):

  @pytest.mark.filterwarnings("ignore")
  def test_cli(self):
    """One test, so that under pytest-xdist a single worker starts the subprocesses."""
    import matplotlib.image  # pylint: disable=g-import-not-at-top

    _cli()
    with self.subTest("errors exit 2 without a traceback"):
      expected = {"no_checkpoint": "no checkpoint yet",
                  "unwritable": "is not writable",
                  "bad_flag": "--num_queries must be >= 1"}
      for name, message in expected.items():
        code, _, stderr, _ = _finished(name)
        self.assertEqual(code, 2, msg=f"{name}: {stderr[-2000:]}")
        self.assertIn("tfmochi.analyze: error:", stderr, msg=name)
        self.assertIn(message, stderr, msg=name)
        self.assertNotIn("Traceback", stderr, msg=name)

    with self.subTest("the analysis writes report.json, the plots and index.html"):
      code, stdout, stderr, out = _finished("analyze")
      self.assertEqual(code, 0, msg=stderr[-3000:])
      self.assertIn("Report:", stdout)
      with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
      self.assertEqual(report["checkpoint_step"], 1)
      self.assertEqual((report["queue_size"], report["num_queries"]), (256, 64))
      self.assertTrue(report["run"]["queries_disjoint_from_queue"])
      self.assertIn("query encoder", report["run"]["keys"])  # the checkpoint has no key encoder
      for key in ("negatives", "false_negatives", "gradient_share", "alignment", "uniformity",
                  "proxy_top1", "proxy_top5", "mochi"):
        self.assertIn(key, report)
      self.assertAllClose(sum(report["gradient_share"]["share"]), 1.0)
      # MoCHi was off in the run: the defaults MoCHi(min(1024, K/8), 1024, 512).
      self.assertEqual((report["mochi"]["num_hard"], report["mochi"]["num_mix"],
                        report["mochi"]["num_query_mix"]), (32, 1024, 512))
      self.assertFalse(report["semantic_similarity"]["available"])
      self.assertIn("ImageNet", report["semantic_similarity"]["message"])
      with open(os.path.join(out, "index.html")) as f:
        page = f.read()
      for name in _PNGS:
        image = matplotlib.image.imread(os.path.join(out, name))
        self.assertEqual(image.ndim, 3, msg=name)
        self.assertGreater(image.shape[0], 100, msg=name)
        self.assertIn(f"src='{name}'", page)
        self.assertIn(name, report["plots"])


if __name__ == "__main__":
  tf.test.main()
