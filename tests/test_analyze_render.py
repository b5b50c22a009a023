"""Tests for tfmochi.analyze.render: the plots and the HTML page of a report."""

from __future__ import annotations

import tensorflow as tf

from tfmochi import analyze
from tfmochi import mixing
import eval_fixtures as fx  # tests/ is on sys.path under pytest


class RenderTest(tf.test.TestCase):

  def test_html_shows_the_message(self):
    q, queue, q_labels, queue_labels = fx.planted()
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


if __name__ == "__main__":
  tf.test.main()
