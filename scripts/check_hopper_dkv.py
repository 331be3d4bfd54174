"""Check and time the Hopper dK/dV kernel's schedules (`lcv.kernels.hopper_dkv`) on one GPU.

For the current kernel (`flash_hopper._dkv`, as the two-kernel backward runs it) and each
schedule of `hopper_dkv` (`VARIANTS` below: schedule and stage-ring depth), on random bf16 inputs
at the training step's shape (B = 1, S = T = --seq, 12 q-heads over 2 kv-heads, head dim 128) and
each layout (plain causal; frame-block-causal with 144-token frames, TC-LLaVA's mask):
1. the operands (o and lse from the Hopper forward, delta, padding) are computed once;
2. the kernel alone is jitted on them, run once (compile) and its dk, dv compared with the
   current kernel's: relative L2 error, max |error|, bitwise equality (the schedules run the same
   products in the same order, so equality is expected); pass when both relative errors < --tol;
3. it is timed: 2 warm-up calls, then 3 repeats of 10 back-to-back calls with one
   block_until_ready each; the median repeat gives ms per call and TFLOP/s counted as
   4 products x 2 x allowed (query, key) pairs x N x H (--smoke reports the first call).

One JSON line per (variant, layout), printed and appended to --out as they come; `x_current` is
the current kernel's time over the variant's on the same layout (> 1: the variant is faster).
A variant that fails to compile or run is reported in its row and the run goes on. Sized to
finish within 3 minutes on an H200, compiles included (estimated, not yet measured).

  python scripts/check_hopper_dkv.py --out benchmarks/results/hopper_dkv.jsonl
  python scripts/check_hopper_dkv.py --smoke     # tiny sizes in Mosaic GPU's interpreter (CPU)

Exits with status 1 when a check fails (after timing everything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
  if path not in sys.path:  # a source checkout without `pip install -e .`
    sys.path.insert(0, path)

import bench_attention  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcv import masks  # noqa: E402
from lcv.kernels import flash_hopper, hopper_dkv  # noqa: E402

# name -> (schedule, stages); "current" is `flash_hopper._dkv` (None: the plan's stages, 2).
VARIANTS = {
  "current": ("current", None),
  "current_st3": ("current", 3),
  "pipelined": ("pipelined", 3),
  "pingpong": ("pingpong", 3),
  "pingpong_st2": ("pingpong", 2),
  "grouped": ("grouped", 2),
  "grouped_pingpong": ("grouped_pingpong", 2),
  "grouped_pingpong_st3": ("grouped_pingpong", 3),
}


def kernel_fn(name: str, p):
  """jit(*operands -> (dk, dv) [B, S_pad, K, H]) of one variant under plan p."""
  schedule, stages = VARIANTS[name]
  if schedule == "current":
    plan = p if stages is None else dataclasses.replace(p, stages=stages)
    return jax.jit(lambda *ops: flash_hopper._dkv(plan, *ops))
  return jax.jit(lambda *ops: hopper_dkv.dkv(p, *ops, variant=schedule, stages=stages))


def make_operands(layout: str, s: int, n: int, kh: int, h: int, smoke: bool):
  """(plan, padded operands of the dK/dV kernel, allowed pairs) for one layout."""
  seg, fr = bench_attention.layout(layout, s)
  lo, hi = masks.intervals(seg, fr)
  kid = masks.key_indices(1, s)
  key = jax.random.split(jax.random.key(s + n), 4)
  q, do = (jax.random.normal(x, (1, s, n, h), jnp.bfloat16) for x in key[:2])
  k, v = (jax.random.normal(x, (1, s, kh, h), jnp.bfloat16) for x in key[2:])
  # The forward kernel gives (o, lse) on a GPU; in the interpreter the dense twin is quicker.
  fwd = flash_hopper.attention_reference if smoke else flash_hopper.forward
  o, lse = jax.jit(fwd)(q, k, v, lo, hi, kid)
  p = flash_hopper._plan(q, k, None, None, False)
  ops = jax.jit(lambda *a: hopper_dkv.operands(p, *a))(q, k, v, o, lse, do, lo, hi, kid)
  lo_np, hi_np = np.asarray(lo[0], np.float64), np.asarray(hi[0], np.float64)
  pairs = float(np.maximum(hi_np - lo_np + 1, 0).sum())
  return p, jax.block_until_ready(ops), pairs


def errors(got, want) -> dict:
  out = {}
  for name, g, w in zip(("dk", "dv"), got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    out[f"{name}_rel"] = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
    out[f"{name}_max_abs"] = float(np.abs(g - w).max())
    out[f"{name}_equal"] = bool(np.array_equal(g, w))
    out[f"{name}_finite"] = bool(np.isfinite(g).all())
  return out


def time_ms(fn, ops, iters: int, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*ops))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [fn(*ops) for _ in range(iters)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) * 1e3 / iters)
  return statistics.median(times)


def run(args, meta) -> list[dict]:
  rows = []
  fns = {}
  for layout in args.layouts:
    p, ops, pairs = make_operands(
      layout, args.seq, args.heads, args.kv_heads, args.head_dim, args.smoke
    )
    flops = 4 * 2 * pairs * args.heads * args.head_dim
    base = dict(meta, layout=layout, S=args.seq, N=args.heads, K=args.kv_heads, H=args.head_dim)
    base["pairs"] = pairs
    t0 = time.perf_counter()
    ref = jax.block_until_ready(fns.setdefault("current", kernel_fn("current", p))(*ops))
    ref_s, ref_ms = time.perf_counter() - t0, None
    for name in args.variants:
      schedule, stages = VARIANTS[name]
      row = dict(base, variant=name, schedule=schedule, stages=stages or p.stages)
      try:
        fn = fns.setdefault(name, kernel_fn(name, p))
        t0 = time.perf_counter()
        out = ref if name == "current" else jax.block_until_ready(fn(*ops))
        first_s = ref_s if name == "current" else time.perf_counter() - t0
        row["first_call_s"] = round(first_s, 2)
        row.update(errors(out, ref))
        row["pass"] = bool(
          row["dk_finite"] and row["dv_finite"] and max(row["dk_rel"], row["dv_rel"]) < args.tol
        )
        # In the interpreter the first call stands for the timing (a smoke test of the rows).
        ms = first_s * 1e3 if args.smoke else time_ms(fn, ops, iters=10, warmup=2, repeats=3)
        row["ms"], row["tflops"] = round(ms, 4), float(f"{flops / ms / 1e9:.4g}")
        ref_ms = ms if name == "current" else ref_ms
        if ref_ms:
          row["x_current"] = round(ref_ms / ms, 3)
      except Exception as e:  # noqa: BLE001 - a failing variant is reported; the run goes on
        row["error"], row["pass"] = f"{type(e).__name__}: {e}"[:600], False
      rows.append(row)
      emit(args.out, row)
  return rows


def emit(path: str, row: dict) -> None:
  print(json.dumps(row), flush=True)
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--seq", type=int, default=32768, help="S = T")
  ap.add_argument("--layouts", default="frame144,causal")
  ap.add_argument("--variants", default=",".join(VARIANTS), help="names of VARIANTS")
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--tol", type=float, default=1e-2, help="relative L2 bound against current")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes; interpreter off the GPU")
  ap.add_argument("--out", default="", help="append JSON lines here")
  args = ap.parse_args(argv)
  if args.smoke:
    args.seq, args.heads, args.kv_heads, args.head_dim = 200, 2, 1, 64
    # As in check_hopper_bwd.py: the interpreter's warpgroup threads were seen to starve inside
    # a jit on a single CPU device; with 8 CPU devices (as in the tests) not.
    if jax.config.jax_num_cpu_devices < 8:
      jax.config.update("jax_num_cpu_devices", 8)
  args.layouts = args.layouts.split(",")
  args.variants = args.variants.split(",")
  if bad := [v for v in args.variants if v not in VARIANTS]:
    raise ValueError(f"--variants {bad} must be among {list(VARIANTS)}")
  for name in args.layouts:
    bench_attention.layout(name, 8)  # a bad name fails here, not after the first compile
  if args.head_dim not in flash_hopper.HEAD_DIMS:
    raise ValueError(f"--head_dim {args.head_dim} must be one of {flash_hopper.HEAD_DIMS}")
  if args.heads % args.kv_heads:
    raise ValueError(f"--heads {args.heads} must be a multiple of --kv_heads {args.kv_heads}")
  if not args.smoke and not flash_hopper.supported(
    jnp.zeros((1, 8, 1, 128), jnp.bfloat16), jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
  ):
    raise SystemExit("no sm_90 GPU here: run with --smoke for the interpreter check")

  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "B": 1}
  meta["date"] = time.strftime("%Y-%m-%d")
  rows = run(args, meta)
  failed = not all(r["pass"] for r in rows)
  print(f"checks {'FAILED' if failed else 'passed'}", file=sys.stderr, flush=True)
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
