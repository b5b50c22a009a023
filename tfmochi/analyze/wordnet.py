"""WordNet similarity between ImageNet classes, for the semantic part of the negatives report.

Are a query's hardest negatives of classes close to its own (a dog's hardest negatives other
dogs)? For ImageNet labels (imagenet2012, imagenet100) the Wu-Palmer similarity of the classes'
WordNet synsets answers it, when nltk and its wordnet corpus are installed; otherwise the report
says how to install them.
"""

from __future__ import annotations

from collections.abc import Sequence

from tfmochi import data as data_lib
from tfmochi.analyze.report import ClassSimilarity

IMAGENET_DATASETS = ("imagenet2012", "imagenet100")
WORDNET_MISSING = ("WordNet data not available: pip install nltk && python -m nltk.downloader "
                   "wordnet")


class WordNetUnavailable(RuntimeError):
  """nltk or its wordnet corpus is missing; the message says how to install them."""


def wordnet_class_similarity(wnids: Sequence[str]) -> ClassSimilarity:
  """Wu-Palmer similarity between classes given by WordNet ids ("n01440764"), via nltk.

  Raises:
    WordNetUnavailable: nltk or its wordnet corpus is not installed (with the install command).
  """
  try:
    from nltk.corpus import wordnet as wn  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WordNetUnavailable(f"{WORDNET_MISSING} (nltk is not installed).") from None
  try:
    synsets = [wn.synset_from_pos_and_offset(w[0], int(w[1:])) for w in wnids]
  except LookupError:
    raise WordNetUnavailable(f"{WORDNET_MISSING} (nltk's wordnet corpus is missing).") from None
  except (ValueError, IndexError) as e:
    raise WordNetUnavailable(f"Some class ids are not WordNet ids ({e}).") from None

  def similarity(a: int, b: int) -> float:
    return synsets[a].wup_similarity(synsets[b])

  similarity.measure = "wup"
  return similarity


def class_wnids(dataset: str, data_dir: str | None = None) -> list[str] | None:
  """The WordNet id of each class index of an ImageNet data set (None for other data sets)."""
  if dataset == "imagenet100":
    return sorted(data_lib.imagenet100_wnids())  # data.load relabels in sorted-wnid order
  if dataset == "imagenet2012":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return list(tfds.builder("imagenet2012", data_dir=data_dir).info.features["label"].names)
  return None


def semantic_similarity_fn(dataset: str, data_dir: str | None = None
                           ) -> tuple[ClassSimilarity | None, str | None]:
  """(similarity function, None), or (None, the reason it is not available)."""
  if dataset not in IMAGENET_DATASETS:
    return None, (f"WordNet similarity applies to ImageNet labels ({', '.join(IMAGENET_DATASETS)})"
                  f"; the data set is {dataset}.")
  try:
    return wordnet_class_similarity(class_wnids(dataset, data_dir)), None
  except WordNetUnavailable as e:
    return None, str(e)
  except Exception as e:  # pylint: disable=broad-except  (optional part: never fail the report)
    return None, f"WordNet similarity skipped: cannot read the {dataset} class ids ({e})."

