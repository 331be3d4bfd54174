"""The attention benchmarks' plumbing on a CPU: `bench_attention.time_interleaved` (turns, the
untimed first round, a failing implementation) and `scripts/bench_packing.py` end to end with tiny
sizes (a subprocess: one CPU device, the portable kernel in place of the Hopper one)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_attention  # noqa: E402


def test_time_interleaved_turns_and_untimed_round():
  log = []

  def fn(name):
    def call():
      log.append(name)
      if name == "bad" and log.count("bad") == 4:  # its 4th call: in the first timed round
        raise RuntimeError("out of memory")
      return 0

    return call

  calls = {name: (fn(name), ()) for name in ("a", "b", "bad")}
  times = bench_attention.time_interleaved(calls, iters=2, rounds=3)
  assert len(times["a"]) == len(times["b"]) == 3  # the untimed round is not reported ...
  assert isinstance(times["bad"], RuntimeError)  # ... and a failure stops only that impl
  rounds = [  # each round starts one further along; round -1 is the untimed one
    ["bad", "a", "b"],  # -1
    ["a", "b", "bad"],  # 0: "bad" raises on its second call here
    ["b", "a"],  # 1
    ["a", "b"],  # 2
  ]
  assert log == [name for r in rounds for name in r for _ in range(2)]


def test_bench_packing_smoke():
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
  }
  args = ["--total", "256", "--lengths", "64,256", "--heads", "2", "--head_dim", "64"]
  out = subprocess.run(
    [sys.executable, "scripts/bench_packing.py", *args, "--iters", "1", "--rounds", "1"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
  ).stdout  # fmt: skip
  rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
  assert {(r["impl"], r["L"], r["pass_"]) for r in rows} == {
    (impl, length, pas)
    for impl in ("lcv_pallas_packed", "xla_batched")
    for length in (64, 256)
    for pas in ("fwd", "fwd_bwd")
  }
  for r in rows:
    assert r["B"] == 256 // r["L"] and r["ms"] > 0 and "error" not in r
    assert r["checked_against"] == "reference" and r["rel_err"] < 2e-2, r
    assert r["density"] == pytest.approx((r["L"] + 1) / 512)


def test_bench_packing_rejects_bad_arguments():
  import bench_packing

  with pytest.raises(ValueError, match="length=96 must divide --total total=256"):
    bench_packing.main(["--total", "256", "--lengths", "96", "--heads", "1", "--head_dim", "64"])
  with pytest.raises(ValueError, match="--passes entry 'bwd' must be fwd or fwd_bwd"):
    bench_packing.main(["--passes", "fwd,bwd"])
