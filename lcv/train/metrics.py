"""Metric sinks: JSON lines (always), TensorBoard (when a writer package is installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import jax


def _tb_writer(logdir: str):
  """A TensorBoard SummaryWriter from tensorboardX, or torch's when `tensorboard` is installed;
  None otherwise (both optional; probed without importing, as torch is slow to import)."""
  found = lambda name: importlib.util.find_spec(name) is not None
  if found("tensorboardX"):
    import tensorboardX

    return tensorboardX.SummaryWriter(logdir)
  if found("tensorboard") and found("torch"):
    from torch.utils import tensorboard

    return tensorboard.SummaryWriter(logdir)
  return None


class MetricWriter:
  """Writes `{"step": s, **scalars}` lines to `<workdir>/metrics.jsonl` on process 0.

  Args:
    workdir: the run directory.
    tensorboard: also write TensorBoard events to `<workdir>/tb` if a writer is installed.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
      if tensorboard:
        self._tb = _tb_writer(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    clean = {k: (float(v) if v is not None else None) for k, v in scalars.items()}
    clean = {k: (v if v is None or math.isfinite(v) else str(v)) for k, v in clean.items()}
    self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, float):
          self._tb.add_scalar(k, v, step)

  def close(self):
    if self.active:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read(path: str) -> list[dict]:
  """The records of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
