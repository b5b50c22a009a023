"""What the negatives of a trained MoCo / MoCHi model look like (the papers' analyses).

`python -m tfmochi.analyze --model_dir=RUN --output_dir=OUT` restores a run's checkpoint, embeds
a labelled data set and writes OUT/report.json, PNG plots and OUT/index.html showing them (OUT
may be gs://). report.json is written last: an analysis is complete once it exists.

Modules, one job each:

  report     the measures on plain arrays (`negatives_report`: similarity distributions, false
             negatives, gradient share per hardness band, MoCHi's synthetic negatives, alignment
             and uniformity, class similarity of the hardest negatives)
  wordnet    WordNet Wu-Palmer similarity of ImageNet classes (optional: nltk)
  render     the PNG plots and index.html
  pipeline   `analyze_run`: restore, embed queue and queries, measure, render, write
  cli        the command line (`tfmochi.cli` conventions: one message and exit status 2 on errors)

Every public name is importable from this package.
"""

from tfmochi import cli as _cli

_cli.quiet_tensorflow_startup()  # before TensorFlow's first import: `python -m` loads this first

# pylint: disable=g-import-not-at-top,g-bad-import-order
from tfmochi.analyze.report import (  # noqa: E402
    DEFAULT_BANDS, FALSE_NEGATIVE_PERCENTS, HARDEST_PERCENT, HIST_EDGES, PERCENTILES,
    UNIFORMITY_MAX_POINTS, WORDNET_PAIRS_PER_QUERY, AnalyzeError, ClassSimilarity,
    band_gradient_shares, band_label, negatives_report, num_in_top, pct_key, percentile_key,
    row_percentiles, sort_hardest_first)
from tfmochi.analyze.wordnet import (  # noqa: E402
    IMAGENET_DATASETS, WORDNET_MISSING, WordNetUnavailable, class_wnids, semantic_similarity_fn,
    wordnet_class_similarity)
from tfmochi.analyze.render import HTML_FILE, PLOT_BINS, write_html, write_plots  # noqa: E402
from tfmochi.analyze.pipeline import (  # noqa: E402
    REPORT_FILE, analyze_run, check_output_dir, mochi_for_analysis)
from tfmochi.evaluate.features import Progress  # noqa: E402
from tfmochi.analyze.cli import main, run  # noqa: E402
