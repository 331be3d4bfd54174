"""Staged context extension: train each stage from the previous one's checkpoint, then evaluate.

    python scripts/extend_context.py --config configs/extend_lwm.py:preset=tiny --workdir runs/x
    python scripts/extend_context.py --config configs/extend_longva.py --workdir runs/longva \
        [--stages 0,1] [--set base.train.data.tokenizer=/path/to/tokenizer]

The config's `get_config(arg)` returns an `lcv.train.stages.Extension`. Every stage trains in
`<workdir>/<k>_<name>/` (resuming if interrupted), then text NIAH and V-NIAH run on a grid up to
its length; `<workdir>/summary.md`, `summary.json` and `summary.png` gather all stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys


def _train_script():
  """scripts/train.py as a module (its config loading and --set overrides)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
  spec = importlib.util.spec_from_file_location("lcv_train_script", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg] -> Extension")
  parser.add_argument("--workdir", required=True, help="one directory for all stages")
  parser.add_argument("--stages", default=None, help="comma-separated stage indices to keep")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)

  from lcv.train import stages as stages_lib

  train_script = _train_script()
  ext = train_script.load_config(args.config)
  if not isinstance(ext, stages_lib.Extension):
    raise TypeError(
      f"{args.config} returns {type(ext).__name__}, not an lcv.train.stages.Extension"
    )
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r} must be KEY=VALUE, e.g. base.train.optimizer.lr=1e-5")
    ext = train_script.override(ext, key, train_script._parse_value(value))
  if args.stages:
    keep = [int(i) for i in args.stages.split(",")]
    if any(not 0 <= i < len(ext.stages) for i in keep):
      raise ValueError(f"--stages {args.stages}: indices must lie in [0, {len(ext.stages)})")
    ext = dataclasses.replace(ext, stages=tuple(ext.stages[i] for i in keep))
  rows = stages_lib.run(ext, args.workdir, progress=not args.no_progress)
  print(stages_lib.table(rows))
  print(f"summary: {os.path.join(args.workdir, 'summary.md')}, summary.png")
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
