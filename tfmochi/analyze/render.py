"""The negatives report as PNG plots and an HTML page (index.html) that shows them with the numbers.

Plots: similarities.png (histograms of q·n, the hardest 1% and q·k), false_negatives.png,
gradient_share.png, mochi.png (when the report has MoCHi) and semantic_similarity.png (when a
class similarity was available). Files are written through `rundir`, so OUT may be gs://.
matplotlib runs without pyplot (Agg), so no display is needed.
"""

from __future__ import annotations

import html
import io
import math
import os
from collections.abc import Sequence

import numpy as np

from tfmochi import rundir
from tfmochi.analyze.report import HARDEST_PERCENT, pct_key

PLOT_BINS = 80
HTML_FILE = "index.html"
_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:auto}"
          "table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;"
          "text-align:left}img{max-width:100%}.note{color:#a33}")


def _save_figure(fig, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  rundir.write_bytes(path, buffer.getvalue())


def _hist_axes(ax, hists: dict, names: Sequence[tuple[str, str]], title: str) -> None:
  """Density step plots of pooled histograms, zoomed on the occupied range (~PLOT_BINS bins)."""
  edges = np.asarray(hists["edges"])
  series = [(np.asarray(hists.get(key, []), np.float64), label) for key, label in names]
  series = [(c, label) for c, label in series if c.size and c.sum() > 0]
  if series:
    occupied = np.flatnonzero(np.sum([c for c, _ in series], axis=0))
    lo, hi = int(occupied[0]), int(occupied[-1]) + 1
    group = max(1, math.ceil((hi - lo) / PLOT_BINS))
    pad = 2 * group
    lo, hi = max(0, lo - pad), min(len(edges) - 1, hi + pad)
    hi = lo + ((hi - lo) // group) * group
    coarse = edges[lo:hi + 1:group]
    for counts, label in series:
      summed = counts[lo:hi].reshape([-1, group]).sum(axis=1)
      ax.stairs(summed / (counts.sum() * np.diff(coarse)), coarse, label=label)
    ax.legend()
  ax.set_xlabel("cosine similarity to the query")
  ax.set_ylabel("density")
  ax.set_title(title)


def _figure(size: tuple[float, float]):
  """(figure, axes) of a matplotlib Figure without pyplot."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (Agg, no pyplot)

  fig = Figure(figsize=size)
  return fig, fig.subplots()


def _plot_similarities(report: dict, path: str) -> None:
  fig, ax = _figure((7, 4))
  hard = f"negatives_hardest_{pct_key(HARDEST_PERCENT)}"
  _hist_axes(ax, report["histograms"],
             [("negatives_all", "all negatives q·n"),
              (hard, f"hardest {HARDEST_PERCENT:g}% per query"), ("positives", "positives q·k")],
             "Similarity of negatives and positives")
  _save_figure(fig, path)


def _plot_false_negatives(report: dict, path: str) -> None:
  fig, ax = _figure((6, 4))
  fn = report["false_negatives"]
  names = [k for k in fn if k.startswith("hardest_")] + ["overall"]
  values = [100.0 * fn[k] for k in names]
  ax.bar([n.replace("hardest_", "hardest ").replace("pct", "%") for n in names], values,
         color=["C3"] * (len(names) - 1) + ["C7"])
  ax.axhline(100.0 * fn["chance"], color="k", linestyle="--", label="chance (class prior)")
  ax.set_ylabel("same-class negatives (%)")
  ax.set_title("False negatives among the hardest negatives")
  ax.legend()
  _save_figure(fig, path)


def _plot_gradient_share(report: dict, path: str) -> None:
  fig, ax = _figure((7, 4))
  grad = report["gradient_share"]
  bars = ax.bar(grad["bands"], [100.0 * s for s in grad["share"]], color="C0")
  ax.bar_label(bars, fmt="%.1f%%")
  ax.set_xlabel("hardness band (per-query rank of q·n)")
  ax.set_ylabel("share of the negatives' InfoNCE gradient (%)")
  ax.set_title("Which negatives carry the gradient (Cai et al.)")
  _save_figure(fig, path)


def _plot_mochi(report: dict, path: str) -> None:
  fig, ax = _figure((7, 4))
  mo = report["mochi"]
  _hist_axes(ax, report["histograms"],
             [("negatives_all", "queue q·n"),
              ("mochi_queue_top_n", f"queue top-{mo['num_hard']} q·n"),
              ("mochi_type1", f"MoCHi h (s={mo['num_mix']})"),
              ("mochi_type2", f"MoCHi h' (s'={mo['num_query_mix']})")],
             "MoCHi synthetic negatives vs real ones")
  _save_figure(fig, path)


def _plot_semantic_similarity(report: dict, path: str) -> None:
  fig, ax = _figure((5, 4))
  sem = report["semantic_similarity"]
  key = f"hardest_{pct_key(HARDEST_PERCENT)}"
  values = [sem.get(key) or 0.0, sem.get("random") or 0.0]
  ax.bar([f"hardest {HARDEST_PERCENT:g}%", "random"], values, color=["C3", "C7"])
  ax.set_ylabel(f"class similarity ({sem.get('measure')})")
  ax.set_title("Semantic similarity to the query's class")
  _save_figure(fig, path)


def _has_semantic(report: dict) -> bool:
  sem = report.get("semantic_similarity")
  return bool(sem and sem.get("available"))


# (file name, plot, whether the report has what it shows), in the page's order.
_PLOTS = (("similarities.png", _plot_similarities, lambda report: True),
          ("false_negatives.png", _plot_false_negatives, lambda report: True),
          ("gradient_share.png", _plot_gradient_share, lambda report: True),
          ("mochi.png", _plot_mochi, lambda report: bool(report.get("mochi"))),
          ("semantic_similarity.png", _plot_semantic_similarity, _has_semantic))


def write_plots(report: dict, output_dir: str) -> list[str]:
  """Writes the PNG plots of a report into output_dir; returns their file names."""
  written = []
  for name, plot, applies in _PLOTS:
    if applies(report):
      plot(report, os.path.join(output_dir, name))
      written.append(name)
  return written


def _fmt(value, percent: bool = False) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{100.0 * value:.2f}%" if percent else f"{value:.4f}"
  return html.escape(str(value))


def _table(rows: Sequence[tuple[str, str]]) -> str:
  body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
  return f"<table>{body}</table>"



def _html_overview(report: dict) -> list[str]:
  """The page's head, the run and the similarity tables."""
  return [
      "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tfmochi negatives analysis"
      f"</title><style>{_STYLE}</style></head><body>",
      "<h1>Negatives analysis</h1>",
      _table([(k, _fmt(v)) for k, v in report.get("run", {}).items()] + [
          ("queue size K", _fmt(report["queue_size"])),
          ("queries M", _fmt(report["num_queries"])),
          ("temperature T", _fmt(report["temperature"])),
          ("duplicates masked", _fmt(report["duplicates_masked"]))]),
      "<h2>Similarity of negatives</h2>",
      _table([(k, _fmt(v)) for k, v in report["negatives"].items()]
             + [(f"positives {k}", _fmt(v)) for k, v in report["positives"].items()]),
  ]


def _html_gradient(report: dict) -> str:
  grad = report["gradient_share"]
  return _table([(band, f"{_fmt(s, True)} (false negatives {_fmt(fn, True)})")
                 for band, s, fn in zip(grad["bands"], grad["share"],
                                        grad["false_negative_share"])]
                + [("hardest 5% (cumulative)", _fmt(grad["hardest_5pct"], True)),
                   ("negatives' softmax mass 1 − p_pos",
                    _fmt(report["negative_probability_mass"], True))])


def _html_alignment(report: dict) -> str:
  return _table([(k, _fmt(report[k])) for k in (
      "alignment", "uniformity", "uniformity_queue", "infonce_loss")]
                + [(f"{k} (%)", f"{report[k]:.2f}") for k in ("proxy_top1", "proxy_top5")])


def _html_mochi(mo: dict) -> list[str]:
  sim_rows = [(name, ", ".join(f"{k} {_fmt(v)}" for k, v in (vals or {}).items()))
              for name, vals in mo["similarity"].items()]
  return [f"<p>MoCHi(N={mo['num_hard']}, s={mo['num_mix']}, s'={mo['num_query_mix']})"
          f" {html.escape(str(mo.get('source', '')))}</p>",
          _table(sim_rows
                 + [(f"harder than the hardest real ({k})", _fmt(v, True))
                    for k, v in mo["harder_than_hardest_real"].items()]
                 + [(f"false-negative sources ({k})", _fmt(v, True))
                    for k, v in mo["false_negatives"].items()])]


def write_html(report: dict, output_dir: str, plots: Sequence[str]) -> str:
  """Writes index.html (the numbers and the plots) and returns its path."""
  parts = _html_overview(report)

  def image(name):
    if name in plots:
      parts.append(f"<p><img src='{html.escape(name)}' alt='{html.escape(name)}'></p>")

  image("similarities.png")
  parts.append("<h2>False negatives (same class)</h2>")
  parts.append(_table([(k, _fmt(v, percent=True)) for k, v in report["false_negatives"].items()]))
  image("false_negatives.png")
  parts += ["<h2>Gradient share by hardness band</h2>", _html_gradient(report)]
  image("gradient_share.png")
  parts += ["<h2>Alignment, uniformity, proxy task</h2>", _html_alignment(report)]
  parts.append("<h2>MoCHi synthetic negatives</h2>")
  if report.get("mochi"):
    parts += _html_mochi(report["mochi"])
    image("mochi.png")
  else:
    parts.append("<p>Not computed.</p>")
  parts.append("<h2>Semantic similarity (WordNet)</h2>")
  sem = report.get("semantic_similarity")
  if _has_semantic(report):
    parts.append(_table([(k, _fmt(v)) for k, v in sem.items()]))
    image("semantic_similarity.png")
  else:
    message = (sem or {}).get("message", "Not computed.")
    parts.append(f"<p class='note'>{html.escape(message)}</p>")
  parts.append("<p>Raw numbers: <a href='report.json'>report.json</a></p></body></html>")
  path = os.path.join(output_dir, HTML_FILE)
  rundir.write_text(path, "\n".join(parts) + "\n")
  return path
