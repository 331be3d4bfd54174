"""Resumable per-cell results: a JSON list rewritten atomically after every cell.

Each record is one grid cell, in LongVA's `all_accuracies.json` shape plus our details:

    {"Num. Frame": 200, "Frame Depth": 20.0, "Score": 0.8, "depth": 0.2,
     "scores": [1, 1, 0, 1, 1], "predictions": [...]}

(text NIAH uses "Context Length" for the x key). A restarted run loads the file and skips the
cells already there, so long sweeps survive pre-emption; the file is replaced with os.replace, so
a crash never leaves it half-written.
"""

from __future__ import annotations

import json
import os


class Results:
  """Cells keyed by (x, y) = (record[x_key], record[y_key]), persisted at `path`."""

  def __init__(self, path: str, x_key: str = "Num. Frame", y_key: str = "Frame Depth"):
    self.path = path
    self.x_key = x_key
    self.y_key = y_key
    self.records: list[dict] = []
    if os.path.exists(path):
      with open(path) as f:
        self.records = json.load(f)
      for r in self.records:
        if x_key not in r or y_key not in r or "Score" not in r:
          raise ValueError(f"{path!r} holds a record without {x_key!r}/{y_key!r}/'Score': {r}")

  def _key(self, x, y):
    return (float(x), float(y))

  def done(self, x, y) -> bool:
    return any(self._key(r[self.x_key], r[self.y_key]) == self._key(x, y) for r in self.records)

  def add(self, record: dict) -> None:
    if self.done(record[self.x_key], record[self.y_key]):
      raise ValueError(f"cell ({record[self.x_key]}, {record[self.y_key]}) is already recorded")
    self.records.append(record)
    self.save()

  def save(self) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    tmp = f"{self.path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.records, f, indent=2)
    os.replace(tmp, self.path)

  def average(self) -> float:
    """Mean score over cells (LongVA's avg_accuracy)."""
    if not self.records:
      return float("nan")
    return sum(r["Score"] for r in self.records) / len(self.records)
