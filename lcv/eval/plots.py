"""NIAH heatmaps in LongVA's style, with matplotlib only (no seaborn / pandas).

LongVA's `plot()` (vlm_methods.md section 1.6): rows = depth percent (0 at the top), columns =
frame count, score colour map #F0496E -> #EBB839 -> #9ad5b3 on vmin 0 / vmax 1, white cell
borders of width 1.5, 17.5 x 8 inches, labels and ticks at font size 14, x ticks as "1.2K" above
1000 and rotated 45 degrees, a colour bar labelled "Score".
"""

from __future__ import annotations

import os

import numpy as np

COLOURS = ("#F0496E", "#EBB839", "#9ad5b3")


def thousands(x) -> str:
  """LongVA's tick labels: 1200 -> "1.2K", 800 -> "800"."""
  return f"{x / 1000:.1f}K" if x >= 1000 else f"{x:g}"


def grid(records, x_key: str, y_key: str):
  """(xs, ys, scores float[len(ys), len(xs)]) from cell records; missing cells are NaN.

  Duplicate (x, y) records are averaged (LongVA's pivot_table aggfunc="mean").
  """
  xs = sorted({r[x_key] for r in records})
  ys = sorted({r[y_key] for r in records})
  total = np.zeros((len(ys), len(xs)))
  count = np.zeros((len(ys), len(xs)))
  for r in records:
    i, j = ys.index(r[y_key]), xs.index(r[x_key])
    total[i, j] += r["Score"]
    count[i, j] += 1
  with np.errstate(invalid="ignore"):
    return xs, ys, total / np.where(count == 0, np.nan, count)


def heatmap(
  records,
  path: str,
  *,
  x_key: str = "Num. Frame",
  y_key: str = "Frame Depth",
  x_label: str = "Num. of Frames",
  y_label: str = "Depth Percent",
  title: str = "",
):
  """Write the heatmap PNG of `records` to `path`; returns the score grid."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LinearSegmentedColormap

  if not records:
    raise ValueError(f"no results to plot into {path!r}")
  xs, ys, scores = grid(records, x_key, y_key)
  cmap = LinearSegmentedColormap.from_list("niah", list(COLOURS))
  fig, ax = plt.subplots(figsize=(17.5, 8))
  mesh = ax.pcolormesh(
    np.ma.masked_invalid(scores), cmap=cmap, vmin=0, vmax=1, edgecolors="white", linewidth=1.5
  )
  ax.set_xlim(0, len(xs))
  ax.set_ylim(len(ys), 0)  # depth 0 on top, like a pandas pivot under seaborn
  ax.set_xticks(np.arange(len(xs)) + 0.5, [thousands(x) for x in xs], rotation=45, fontsize=14)
  ax.set_yticks(np.arange(len(ys)) + 0.5, [f"{y:g}" for y in ys], rotation=0, fontsize=14)
  ax.set_xlabel(x_label, fontsize=14)
  ax.set_ylabel(y_label, fontsize=14)
  if title:
    ax.set_title(title, fontsize=14)
  for side in ax.spines.values():
    side.set_visible(False)
  bar = fig.colorbar(mesh, ax=ax)
  bar.set_label("Score", size=14)
  bar.ax.tick_params(labelsize=14)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return scores
