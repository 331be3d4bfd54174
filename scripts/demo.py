"""Smoke demo: train the tiny VLM on synthetic videos over 8 emulated CPU devices, print losses.

    pip install -e . && python scripts/demo.py [--steps 40] [--workdir DIR]

The mesh is data=2 x fsdp=2 x context=2: rows are split over data and fsdp, weights are sharded
over fsdp (and context), and every sequence is zig-zag ordered and split over context, with ring
attention between the two halves. Positions are V2PE with random strides per video, the mask is
frame-block-causal, and packing puts several samples in each row. Core dependencies only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
  parser.add_argument("--devices", type=int, default=8)
  args = parser.parse_args(argv)

  # Emulated devices must be requested before JAX initialises.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
  import jax

  jax.config.update("jax_num_cpu_devices", args.devices)
  sys.path.insert(0, ROOT)

  from scripts import train as train_script

  workdir = args.workdir or tempfile.mkdtemp(prefix="lcv_demo_")
  context = 2 if args.devices % 8 == 0 else 1
  history = train_script.main(
    [
      "--config", os.path.join(ROOT, "configs", "train_tiny.py") + f":steps={args.steps}",
      "--workdir", workdir,
      "--set", f"mesh.data={2 if context == 2 else 1}",
      "--set", f"mesh.context={context}",
      "--set", "train.log_every=1",
      "--fresh",
      "--no_progress",
    ]
  )  # fmt: skip
  print(f"{'step':>5} {'loss':>8} {'tokens/s':>9}")
  for r in history:
    print(f"{r['step']:>5} {r['loss']:>8.4f} {r['tokens_per_s']:>9.0f}")
  print(f"metrics and checkpoints: {workdir}")
  first, last = history[0]["loss"], history[-1]["loss"]
  return 0 if last < first else 1


if __name__ == "__main__":
  sys.exit(main())
