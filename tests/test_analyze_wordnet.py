"""Tests for tfmochi.analyze.wordnet: without nltk, without its corpus, and with a stub synset."""

from __future__ import annotations

import re
import sys
import types
from unittest import mock

import tensorflow as tf

from tfmochi import analyze


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


if __name__ == "__main__":
  tf.test.main()
