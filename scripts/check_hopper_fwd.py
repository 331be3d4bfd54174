"""Check and time the Hopper forward's variants (`flash_hopper.forward` options) on one GPU.

One process, two parts, for each option set (`OPTION_SETS`, the module defaults first):
1. Correctness: on random bf16 inputs at --check_seq (causal and frame257 layouts; the first
   --check_heads heads) o and lse against the dense float32 reference (`attention_reference`):
   relative L2 error of o, max |error| of lse on rows with keys, the -inf pattern of lse (rows
   without keys) equal; pass when the error of o < --tol and of lse < 10 * --tol.
2. Speed: the forward at S in --seq (B = 1, --heads x --head_dim, bf16; causal and frame257),
   effective TFLOP/s counted as scripts/bench_attention.py does (allowed pairs only: causal about
   half), timed with its `timeit`; then cuDNN (causal) and tokamax's Mosaic GPU forward (if
   `import tokamax` works, called as bench_attention calls it) on the same inputs.

One JSON line per check and per (option set, S, layout) timing (tagged "part"), printed and
appended to --out as they come; timing rows carry the ratio to the default option set and to the
best of cuDNN and tokamax at the same (S, layout) when those ran.

  python scripts/check_hopper_fwd.py --out benchmarks/results/hopper_fwd.jsonl   # < 4 min, H200
  python scripts/check_hopper_fwd.py --smoke     # tiny sizes in Mosaic GPU's interpreter (CPU)

Exits with status 1 when a check fails (after timing everything).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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

from lcv.kernels import flash_hopper  # noqa: E402

# name -> keyword arguments of `flash_hopper.forward`; "default" (the module defaults) first.
OPTION_SETS = {
  "default": {},
  "handoff": {"schedule": "handoff"},
  "paired": {"schedule": "paired"},
  "overlap": {"schedule": "overlap"},
  "fold": {"fold_scale": True},
  "lean": {"lean_sync": True},
  "paired_fold": {"schedule": "paired", "fold_scale": True},
  "overlap_fold": {"schedule": "overlap", "fold_scale": True},
  "paired_fold_lean": {"schedule": "paired", "fold_scale": True, "lean_sync": True},
  "bk64_st3": {"block_kv": 64, "stages": 3},
  "paired_fold_bk64_st3": {"schedule": "paired", "fold_scale": True, "block_kv": 64, "stages": 3},
}
PEERS = ("cudnn", "tokamax_mosaic")


@functools.cache
def forward_fn(name: str):
  """jit(q, k, v, lo, hi, kid -> (o, lse)) of an option set: one per set, with the mask as an
  argument, so the checks, the layouts and the timings of one shape share a compile."""
  options = OPTION_SETS[name]
  return jax.jit(lambda q, k, v, lo, hi, kid: flash_hopper.forward(q, k, v, lo, hi, kid, **options))


def qkv(s: int, n: int, h: int, seed: int):
  key = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(x, (1, s, n, h), jnp.bfloat16) for x in key]


def check_all(args, meta) -> list[dict]:
  """Every option set against the dense reference (computed once per layout). The kernel runs
  on the timing shape (--heads heads: its compile is reused); the reference and the comparison
  take the first --check_heads heads (heads are independent; the dense reference is O(S^2))."""
  rows = []
  s, n, h = args.check_seq, args.check_heads, args.head_dim
  q, k, v = qkv(s, args.heads, h, seed=s)
  for layout in args.layouts:
    case = bench_attention.make_case(layout, s)
    ref = jax.jit(flash_hopper.attention_reference)
    ro, rlse = ref(q[:, :, :n], k[:, :, :n], v[:, :, :n], case.lo, case.hi, case.kid)
    rlse = np.asarray(rlse)
    for name in args.options:
      row = dict(meta, part="check", options=name, layout=layout, S=s, N=n, H=h, tol=args.tol)
      t0 = time.perf_counter()
      try:
        o, lse = forward_fn(name)(q, k, v, case.lo, case.hi, case.kid)
        o, lse = o[:, :, :n], np.asarray(lse)[:, :n]
        fin = np.isfinite(rlse)
        row["o_rel"] = bench_attention.rel_err(o, ro)
        row["lse_max_abs"] = float(np.abs(lse[fin] - rlse[fin]).max()) if fin.any() else 0.0
        row["lse_neginf_equal"] = bool(np.array_equal(np.isneginf(lse), np.isneginf(rlse)))
        row["finite"] = bool(np.isfinite(np.asarray(o, np.float32)).all())
        row["pass"] = bool(
          row["finite"]
          and row["lse_neginf_equal"]
          and row["o_rel"] < args.tol
          and row["lse_max_abs"] < 10 * args.tol
        )
      except Exception as e:  # noqa: BLE001 - a failing option set is reported; the run goes on
        row["error"], row["pass"] = f"{type(e).__name__}: {e}"[:400], False
      row["seconds"] = round(time.perf_counter() - t0, 1)
      rows.append(row)
      emit(args.out, row)
  return rows


def peers(case, smoke: bool) -> dict:
  """name -> jit(q, k, v) -> o of the peers that run here: cuDNN (causal) and tokamax."""
  if smoke:
    return {}
  out = {}
  if case.layout == "causal":
    out["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
  out.update({i: f for i, f in bench_attention.tokamax_impls(case).items() if i in PEERS})
  return {name: jax.jit(f) for name, f in out.items()}


def iters_for(s: int, smoke: bool) -> int:
  """Calls per timed repeat: ~10 at 16K, fewer for longer rows."""
  return 1 if smoke else max(2, int(10 * (16384 / s) ** 2))


def time_all(args, meta) -> list[dict]:
  rows = []
  n, h = args.heads, args.head_dim
  reps = dict(warmup=0, repeats=1) if args.smoke else {}
  for s in args.seq:
    q, k, v = qkv(s, n, h, seed=s)
    iters = iters_for(s, args.smoke)
    for layout in args.layouts:
      case = bench_attention.make_case(layout, s)
      flops = 4 * n * s * s * h * case.density
      mask = (case.lo, case.hi, case.kid)
      base = dict(meta, part="time", layout=layout, S=s, N=n, H=h, density=round(case.density, 4))
      results = {}
      impls = [(name, forward_fn(name), mask) for name in args.options]
      impls += [(name, f, ()) for name, f in peers(case, args.smoke).items()]
      for name, fn, extra in impls:
        row = dict(base, impl=name if name in PEERS else "lcv_hopper", options=name)
        try:
          ms = bench_attention.timeit(fn, q, k, v, *extra, iters=iters, **reps)
          row["ms"], row["tflops"] = round(ms, 4), round(flops / ms / 1e9, 1)
          results[name] = row["tflops"]
        except Exception as e:  # noqa: BLE001 - record the failure and go on with the sweep
          row["error"] = f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
      best_peer = max((results[p] for p in PEERS if p in results), default=None)
      for row in rows[-len(impls) :]:
        if "tflops" in row and results.get("default"):
          row["x_default"] = round(row["tflops"] / results["default"], 3)
        if "tflops" in row and best_peer:
          row["x_best_peer"] = round(row["tflops"] / best_peer, 3)
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
  ap.add_argument("--seq", default="16384,65536", help="timed lengths S (T = S)")
  ap.add_argument("--layouts", default="causal,frame257")
  ap.add_argument("--options", default=",".join(OPTION_SETS), help="option sets (OPTION_SETS)")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--check_seq", type=int, default=16384, help="S of the correctness checks")
  ap.add_argument("--check_heads", type=int, default=2, help="heads compared with the reference")
  ap.add_argument("--tol", type=float, default=2e-2, help="relative L2 error bound of o (bf16)")
  ap.add_argument("--skip_checks", action="store_true")
  ap.add_argument("--skip_timing", action="store_true")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes; interpreter off the GPU")
  ap.add_argument("--out", default="", help="append JSON lines here")
  args = ap.parse_args(argv)
  if args.smoke:
    args.seq, args.heads, args.head_dim = "128", 1, 64
    args.check_seq, args.check_heads = 128, 1
    # As in check_hopper_bwd.py: the interpreter's warpgroup threads were seen to starve inside
    # a jit on a single CPU device; with 8 CPU devices (as in the tests) not.
    if jax.config.jax_num_cpu_devices < 8:
      jax.config.update("jax_num_cpu_devices", 8)
  args.seq = [int(x) for x in args.seq.split(",")]
  args.layouts = args.layouts.split(",")
  args.options = args.options.split(",")
  if bad := [o for o in args.options if o not in OPTION_SETS]:
    raise ValueError(f"--options {bad} must be among {list(OPTION_SETS)}")
  for name in args.layouts:
    bench_attention.layout(name, 8)  # a bad name fails here, not after the checks
  if args.head_dim not in flash_hopper.HEAD_DIMS:
    raise ValueError(f"--head_dim {args.head_dim} must be one of {flash_hopper.HEAD_DIMS}")
  if not args.smoke and not flash_hopper.supported(
    jnp.zeros((1, 8, 1, 128), jnp.bfloat16), jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
  ):
    raise SystemExit("no sm_90 GPU here: run with --smoke for the interpreter check")

  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "B": 1}
  meta["date"] = time.strftime("%Y-%m-%d")
  failed = False
  if not args.skip_checks:
    failed = not all(r["pass"] for r in check_all(args, meta))
  if not args.skip_timing:
    time_all(args, meta)
  verdict = "skipped" if args.skip_checks else "FAILED" if failed else "passed"
  print(f"checks {verdict}", file=sys.stderr, flush=True)
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
