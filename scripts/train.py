"""Train a model from a config file.

    python scripts/train.py --config configs/train_tiny.py[:arg] --workdir DIR \
        [--set train.steps=200 --set train.optimizer.lr=1e-3 ...] [--fresh]

The config file's `get_config(arg)` returns an `lcv.config.RunConfig`; `--set` overrides one
field by its dotted path (values parsed as Python literals, else kept as strings). A run directory
that holds checkpoints is resumed from the latest; `--fresh` deletes them and starts over. For
multi-host runs, start one process per host (scripts/launch/); JAX finds its peers from the
cluster's environment (SLURM, Open MPI, TPU pods), or from --coordinator/--num_processes/
--process_id.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str):
  """'path/to/config.py[:arg]' -> get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found (expected configs/NAME.py[:arg])")
  module_spec = importlib.util.spec_from_file_location("lcv_run_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def override(cfg, dotted: str, value):
  """A copy of nested frozen dataclasses `cfg` with the field at `dotted` set to `value`."""
  head, _, rest = dotted.partition(".")
  names = [f.name for f in dataclasses.fields(cfg)]
  if head not in names:
    raise ValueError(f"--set {dotted}: {type(cfg).__name__} has no field {head!r}; fields: {names}")
  if rest:
    return dataclasses.replace(cfg, **{head: override(getattr(cfg, head), rest, value)})
  old = getattr(cfg, head)
  if isinstance(old, tuple) and isinstance(value, list | tuple):
    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  return dataclasses.replace(cfg, **{head: value})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
  parser.add_argument("--workdir", default=None, help="run directory (default train.workdir)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--fresh", action="store_true", help="delete checkpoints and start over")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args = parser.parse_args(argv)
  if ROOT not in sys.path:  # a source checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

  from lcv.parallel import mesh as mesh_lib

  # Before any other JAX call: join the other hosts when there are any.
  mesh_lib.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

  from lcv.train import loop
  from lcv.train import task as task_lib

  cfg = load_config(args.config)
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r} must be KEY=VALUE, e.g. train.steps=100")
    cfg = override(cfg, key, _parse_value(value))
  if args.workdir:
    cfg = override(cfg, "train.workdir", args.workdir)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  task = task_lib.vlm_task(cfg.model, cfg.train, cfg.mesh)
  history = loop.train(task, cfg.train, mesh, fresh=args.fresh, progress=not args.no_progress)
  if history:
    last = history[-1]
    print(f"step {last['step']}: loss {last['loss']:.4f} (first {history[0]['loss']:.4f})")
  return history


if __name__ == "__main__":
  sys.exit(0 if main() is not None else 1)
