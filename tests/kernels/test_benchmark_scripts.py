"""The attention benchmarks' plumbing on a CPU: `bench_attention.time_interleaved` (turns, the
untimed first round, a failing implementation) and `scripts/bench_packing.py` end to end with tiny
sizes (a subprocess: one CPU device, the portable kernel in place of the Hopper one)."""

import argparse
import importlib.machinery
import json
import os
import pathlib
import subprocess
import sys
import types

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


def test_tokamax_import_leaves_absl_flags_parsed(monkeypatch):
  """tokamax 0.0.12 reads absl flags when an op runs; unparsed, absl parses the script's argv and
  rejects its options (UnrecognizedFlagError on --passes). `_tokamax` marks them parsed. A
  stand-in package with tokamax's module layout takes the import."""
  from absl import flags

  names = ("tokamax", "tokamax._src", "tokamax._src.ops", "tokamax._src.ops.attention")
  for name in names:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    monkeypatch.setitem(sys.modules, name, mod)
  sys.modules["tokamax"].__version__ = "0.0.12"
  api = types.ModuleType("tokamax._src.ops.attention.api")
  api.IMPLEMENTATIONS = {"mosaic_gpu": lambda q, k, v, **kw: flags.FLAGS.is_parsed()}
  base = types.ModuleType("tokamax._src.ops.attention.base")
  base.Mask = object
  for name, mod in (("api", api), ("base", base)):
    monkeypatch.setitem(sys.modules, f"tokamax._src.ops.attention.{name}", mod)
    setattr(sys.modules["tokamax._src.ops.attention"], name, mod)
  monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--passes", "fwd"])
  was_parsed, before = flags.FLAGS.is_parsed(), set(sys.modules)
  flags.FLAGS.unparse_flags()
  bench_attention._tokamax.cache_clear()
  try:
    ops, mask_cls, version = bench_attention._tokamax()
    assert version == "0.0.12" and mask_cls is object
    assert ops["mosaic_gpu"](None, None, None)  # absl will not parse --passes now
    assert flags.FLAGS.is_parsed()
  finally:
    bench_attention._tokamax.cache_clear()
    for name in set(sys.modules) - before:  # the empty xprof modules it stands in
      if name.startswith("xprof"):
        del sys.modules[name]
    if not was_parsed:
      flags.FLAGS.unparse_flags()


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


@pytest.mark.parametrize("check_max", [256, 128], ids=["reference", "anchor"])
def test_bench_attention_checks_every_row(check_max):
  """Up to --check_max every row is checked against the dense reference; above it against the
  first anchor that runs (cuDNN fails on a CPU, so lcv's portable kernel), itself unchecked."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  args = ["--seq", "256", "--layouts", "causal,frame144", "--impls", "cudnn,lcv_pallas,xla"]
  args += ["--heads", "2", "--head_dim", "64", "--iters", "1", "--rounds", "1"]
  out = subprocess.run(
    [sys.executable, "scripts/bench_attention.py", *args, "--check_max", str(check_max)],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True,
  ).stdout  # fmt: skip
  rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
  assert {(r["impl"], r["layout"], r["pass_"]) for r in rows} == {
    (impl, layout, pas)
    for impl in ("lcv_pallas", "xla", "cudnn")
    for layout in ("causal", "frame144")
    for pas in ("fwd", "fwd_bwd")
    if impl != "cudnn" or layout == "causal"
  }
  for r in rows:
    if r["impl"] == "cudnn":
      assert "error" in r and "checked_against" not in r, r
    elif check_max >= 256:
      assert r["checked_against"] == "reference" and r["rel_err"] < 2e-2, r
    elif r["impl"] == "lcv_pallas":
      assert r["checked_against"] == "none (the anchor)" and "rel_err" not in r, r
    else:
      assert r["checked_against"] == "lcv_pallas" and r["rel_err"] < 2e-2, r


def test_bench_packing_rejects_bad_arguments():
  import bench_packing

  with pytest.raises(ValueError, match="length=96 must divide --total total=256"):
    bench_packing.main(["--total", "256", "--lengths", "96", "--heads", "1", "--head_dim", "64"])
  with pytest.raises(ValueError, match="--passes entry 'bwd' must be fwd or fwd_bwd"):
    bench_packing.main(["--passes", "fwd,bwd"])


def _events(wgs: int):
  """A profiler trace of 2 CTAs: consumers "keys" once then two "queries" of 100 cycles; the
  producer one "free" of 300 with "staged" (50) inside. Each unit of 1e-3 in ts is a cycle."""
  out = []
  for cta in range(2):
    for wg in range(wgs):
      tid, t0 = 1 + wg + wgs * cta, 5000.0 * (cta + 1)  # us; CTAs start at different times
      edges = [("keys", 0, 400), ("queries", 400, 500), ("queries", 600, 700)]
      if wg == wgs - 1:
        edges = [("free", 0, 300), ("staged", 100, 150)]
      for name, a, b in edges:
        out.append({"name": name, "ph": "B", "ts": t0 + a / 1e3, "tid": tid, "pid": 1})
        out.append({"name": name, "ph": "E", "ts": t0 + b / 1e3, "tid": tid, "pid": 1})
  return sorted(out, key=lambda e: (e["tid"], e["ts"]))


def test_kernel_phases_sums_scopes_per_warpgroup():
  import kernel_phases

  r = kernel_phases.phases(_events(3))
  assert r["ctas"] == 2
  consumer, producer = r["warpgroups"][0], r["warpgroups"][2]
  assert consumer["span"] == pytest.approx(700)
  assert consumer["scopes"]["keys"] == pytest.approx((1, 400))
  assert consumer["scopes"]["queries"] == pytest.approx((2, 100))  # 2 per CTA, 100 cycles each
  assert producer["scopes"] == pytest.approx({"free": (1, 300), "staged": (1, 50)})
  assert "queries" in kernel_phases.table(r) and "57.1%" in kernel_phases.table(r)  # 400 / 700
  with pytest.raises(ValueError, match="never closed"):
    kernel_phases.phases(_events(3)[:-1])
  args = argparse.Namespace(seq=512, layout="causal", heads=2, kv_heads=0, head_dim=256)
  with pytest.raises(ValueError, match="head_dim=256"):  # before anything runs
    kernel_phases.run(args)


@pytest.mark.gpu
def test_kernel_phases_on_gpu():
  """`scripts/kernel_phases.py` on the GPU: the fused backward's named scopes reach the trace.
  Per CTA each consumer waits for its keys once and for every position's queries, and the
  producer awaits one dQ tile per position."""
  import kernel_phases

  args = argparse.Namespace(seq=2048, layout="packed512", heads=2, kv_heads=0, head_dim=128)
  r = kernel_phases.run(args)
  assert r["ctas"] == 2 * 2048 // 128  # kv heads x key tiles
  c0, c1, producer = (w["scopes"] for w in r["warpgroups"])
  assert c0["keys"][0] == c1["keys"][0] == 1
  # 512-token causal samples: the CTAs at keys 0, 128, 256, 384 of a sample see 8, 6, 4, 2 query
  # tiles (positions), 5 on average; the producer awaits dQ from position -1 on (one behind).
  assert c0["queries"][0] == pytest.approx(5) and c1["queries"][0] == pytest.approx(5)
  assert producer["staged"][0] == pytest.approx(6)
  assert all(w["span"] > 0 for w in r["warpgroups"])
