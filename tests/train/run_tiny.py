"""Train the tiny test task in a fresh process (for kill / preemption / multi-host tests).

    python -m tests.train.run_tiny WORKDIR --steps 8 [--devices 8] [--mesh data,fsdp]
        [--step_sleep 0.2] [--coordinator host:port --num_processes 2 --process_id 0]

Prints one line "LOSSES <json list>" of the steps run by this process at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def config(workdir: str, steps: int, checkpoint_every: int = 2):
  from lcv.config import DataConfig, OptimizerConfig, TrainConfig

  return TrainConfig(
    steps=steps,
    log_every=1,
    checkpoint_every=checkpoint_every,
    keep_checkpoints=10,
    workdir=workdir,
    data=DataConfig(seq_len=128, batch_size=8, image_size=16, synthetic_frames=(1, 3), prefetch=1),
    optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2),
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--mesh", default="2,4")
  parser.add_argument("--step_sleep", type=float, default=0.0)
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args = parser.parse_args()

  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import jax

  jax.config.update("jax_num_cpu_devices", args.devices)
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from lcv.parallel import mesh as mesh_lib

    mesh_lib.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

  from lcv.config import MeshConfig
  from lcv.parallel import mesh as mesh_lib
  from lcv.train import loop
  from tests.train import tiny_task

  data, fsdp = (int(x) for x in args.mesh.split(","))
  mesh = mesh_lib.make_mesh(MeshConfig(data=data, fsdp=fsdp))
  task = tiny_task.task()
  if args.step_sleep:
    inputs_fn = task.inputs_fn

    def slow(host):
      time.sleep(args.step_sleep)
      return inputs_fn(host)

    task = loop.Task(**{**task.__dict__, "inputs_fn": slow})
  cfg = config(args.workdir, args.steps, args.checkpoint_every)
  history = loop.train(task, cfg, mesh, progress=False)
  print("LOSSES " + json.dumps([[r["step"], r["loss"]] for r in history]), flush=True)


if __name__ == "__main__":
  main()
