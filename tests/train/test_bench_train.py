"""scripts/bench_train.py --smoke: the benchmark's plumbing (state, step, tower timing, FLOPs) on
one CPU device with tiny sizes (a subprocess: the suite's other tests emulate 8 devices)."""

import json
import math
import os
import pathlib
import subprocess
import sys


def test_smoke_row():
  root = pathlib.Path(__file__).parents[2]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
  }
  args = ["--smoke", "--steps", "1", "--seq", "256", "--loss_chunk", "64"]
  out = subprocess.run(
    [sys.executable, "scripts/bench_train.py", *args],
    cwd=root, env=env, capture_output=True, text=True, timeout=300, check=True,
  ).stdout  # fmt: skip
  row = json.loads(out.strip().splitlines()[-1])
  assert row["seq_len"] == 256 and row["loss_chunk"] == 64 and row["remat"] == "full"
  assert row["scan_layers"] is False  # the default: unstacked layers (`--scan` stacks them)
  assert row["devices"] == 1 and row["step_s"] > 0 and row["tower_s"] > 0
  assert row["lower_s"] > 0 and row["compile_s"] > 0
  assert row["mfu"] is None  # no peak FLOP/s for a CPU
  assert row["model_tflops_per_step"] > 0 and math.isfinite(row["loss"])
  assert 0 < row["mask_density"] < 1
