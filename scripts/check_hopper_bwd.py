"""Check and time the Hopper kernel's single-kernel backward (`fused_dq=True`) on one GPU.

One process, two parts:
1. Correctness: on random bf16 inputs (causal, frame-block-causal with 257-token frames, packed
   GQA with padding; head dims 64 and 128) the gradients of `flash_hopper.attention` with the
   fused backward against the dense float32 reference and against the two-kernel backward:
   max |error| and relative L2 error per output, pass when every relative error < --tol.
2. Speed: forward + backward at S in --seq (B = 1, --heads x --head_dim, bf16), causal and
   frame257, for the two-kernel backward (`lcv_hopper_two`), the fused one (`lcv_hopper_fused`)
   and cuDNN (`jax.nn.dot_product_attention`, causal only); effective TFLOP/s counted as in
   scripts/bench_attention.py (allowed pairs only, x3.5 for forward + backward), whose layouts,
   timing and counting helpers this script imports.

JSON lines (one per check and per timing, tagged "part") are appended to --out as they come.

  python scripts/check_hopper_bwd.py --out benchmarks/results/hopper_bwd.jsonl   # ~6 min, H200
  python scripts/check_hopper_bwd.py --smoke     # tiny sizes in Mosaic GPU's interpreter (CPU)

Exits with status 1 when a check fails (after timing everything).
"""

from __future__ import annotations

import argparse
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

from lcv import masks  # noqa: E402
from lcv.kernels import flash_gpu, flash_hopper  # noqa: E402

# (name, T = S, q heads N, kv heads K, frame, segments, padding rows); head dims from --check_dims.
CHECKS = (
  ("causal", 4096, 4, 4, 1, 1, 0),
  ("frame257", 4096, 4, 4, 257, 1, 0),
  ("packed_gqa_pad", 4000, 4, 2, 257, 3, 100),
)
SMOKE_CHECKS = (("causal", 130, 2, 2, 1, 1, 0), ("packed_gqa_pad", 200, 2, 1, 24, 2, 9))


def packed_layout(t: int, frame: int, segments: int, pad: int):
  """(segment_ids, frame_ids) int32[1, T]: `segments` equal samples of `frame`-token frames (one
  frame per token when frame = 1, i.e. causal text), then `pad` padding rows."""
  idx = np.arange(t - pad)
  seg = np.zeros(t, np.int32)
  fr = np.full(t, -1, np.int32)
  seg[: t - pad] = idx * segments // (t - pad) + 1
  if frame > 1:
    start = np.searchsorted(seg[: t - pad], seg[: t - pad])  # first row of each row's sample
    fr[: t - pad] = (idx - start) // frame
  return seg[None], fr[None]


def errors(got, want) -> dict:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return {
    "max_abs": float(np.abs(got - want).max()),
    "rel": float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)),
  }


def check(name, t, n, kh, frame, segments, pad, h, tol) -> dict:
  """o and the gradients of sum(o * dO) + 0.1 sum(finite lse) (so the lse cotangent is used, as
  a ring merge does) with the fused backward, against the dense reference and the two-kernel
  backward."""
  key = jax.random.split(jax.random.key(t * 7 + h), 4)
  q, do = (jax.random.normal(x, (1, t, n, h), jnp.bfloat16) for x in key[:2])
  k, v = (jax.random.normal(x, (1, t, kh, h), jnp.bfloat16) for x in key[2:])
  seg, fr = packed_layout(t, frame, segments, pad)
  lo, hi = masks.intervals(seg, fr)
  kid = masks.key_indices(1, t)

  def grads(attn):
    def loss(q, k, v, do):
      o, lse = attn(q, k, v, lo, hi, kid)
      finite = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows with no key: lse = -inf
      return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + 0.1 * jnp.sum(finite), o

    run = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, o), g = jax.jit(run)(q, k, v, do)
    return (o, *g)

  fused = grads(lambda *a: flash_hopper.attention(*a, fused_dq=True))
  two = grads(lambda *a: flash_hopper.attention(*a, fused_dq=False))
  ref = grads(flash_gpu.attention_reference)
  row = {"part": "check", "case": name, "T": t, "N": n, "K": kh, "H": h, "tol": tol}
  ok = True
  for out, f, t2, r in zip(("o", "dq", "dk", "dv"), fused, two, ref):
    if not np.isfinite(np.asarray(f, np.float32)).all():
      row[f"{out}_finite"], ok = False, False
    row[f"{out}_vs_ref"], row[f"{out}_vs_two"] = errors(f, r), errors(f, t2)
    row[f"{out}_two_vs_ref"] = errors(t2, r)
    ok &= row[f"{out}_vs_ref"]["rel"] < tol and row[f"{out}_vs_two"]["rel"] < tol
  row["pass"] = bool(ok)
  return row


def check_all(args, meta) -> list[dict]:
  rows = []
  for h in args.check_dims:
    for case in SMOKE_CHECKS if args.smoke else CHECKS:
      t0 = time.perf_counter()
      try:
        row = dict(meta, **check(*case, h, args.tol))
      except Exception as e:  # noqa: BLE001 - a failing case is reported; the run goes on
        row = dict(meta, part="check", case=case[0], H=h, error=f"{type(e).__name__}: {e}"[:400])
        row["pass"] = False
      row["seconds"] = round(time.perf_counter() - t0, 1)
      rows.append(row)
      write(args.out, [row])
      summary = " ".join(
        f"{o}:{row[f'{o}_vs_ref']['rel']:.1e}/{row[f'{o}_vs_two']['rel']:.1e}"
        for o in ("o", "dq", "dk", "dv")
        if f"{o}_vs_ref" in row
      )
      grads = [row[f"{o}_vs_ref"]["max_abs"] for o in ("dq", "dk", "dv") if f"{o}_vs_ref" in row]
      maxabs = max(grads, default=float("nan"))
      verdict = "PASS" if row["pass"] else "FAIL"
      print(
        f"check {row['case']:15s} H={h:3d} {verdict}  rel vs ref / vs two-kernel: {summary}"
        f"  max|d| vs ref {maxabs:.2e} ({row['seconds']} s)"
        f"{'  ' + row['error'] if 'error' in row else ''}",
        flush=True,
      )
  return rows


def impls(case: bench_attention.Case, smoke: bool):
  """name -> attn(q, k, v) -> o: cuDNN (causal; first, so later rows get their ratio to it) and
  the Hopper kernel with either backward."""
  lo, hi, kid = case.lo, case.hi, case.kid
  out = {}
  if case.layout == "causal" and not smoke:
    out["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
  for tag, fused in (("two", False), ("fused", True)):
    out[f"lcv_hopper_{tag}"] = lambda q, k, v, f=fused: flash_hopper.attention(
      q, k, v, lo, hi, kid, fused_dq=f
    )[0]
  return out


def iters_for(s: int, smoke: bool) -> int:
  """Calls per timed repeat: ~10 at 16K, fewer for longer rows (0.1-0.5 s per call there)."""
  return 1 if smoke else max(2, int(10 * (16384 / s) ** 2))


def time_all(args, meta) -> list[dict]:
  rows = []
  b, n, h = 1, args.heads, args.head_dim
  for s in args.seq:
    key = jax.random.split(jax.random.key(s), 4)
    q, k, v, do = (jax.random.normal(x, (b, s, n, h), jnp.bfloat16) for x in key)
    flops_causal = 4 * b * n * s * s * h * 0.5 * 3.5
    cudnn_ms = None
    for layout in args.layouts:
      case = bench_attention.make_case(layout, s)
      flops = 4 * b * n * s * s * h * case.density * 3.5
      for impl, attn in impls(case, args.smoke).items():
        if impl not in args.impls:
          continue
        row = dict(meta, part="time", impl=impl, layout=layout, S=s, pass_="fwd_bwd", H=h, N=n)
        row["density"] = round(case.density, 4)
        try:
          fn = bench_attention.fwd_bwd(attn)
          reps = dict(warmup=1, repeats=1) if args.smoke else {}
          ms = bench_attention.timeit(fn, q, k, v, do, iters=iters_for(s, args.smoke), **reps)
          row["ms"], row["tflops"] = round(ms, 4), round(flops / ms / 1e9, 1)
          if impl == "cudnn":
            cudnn_ms = ms
          if cudnn_ms is not None:
            row["ratio_cudnn_causal"] = round(row["tflops"] / (flops_causal / cudnn_ms / 1e9), 3)
        except Exception as e:  # noqa: BLE001 - record the failure and go on with the sweep
          row["error"] = f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
        write(args.out, [row])
        print(
          f"time  {impl:17s} {layout:9s} S={s:7d} {row.get('ms', float('nan')):9.3f} ms "
          f"{row.get('tflops', float('nan')):7.1f} TFLOP/s "
          f"x cuDNN {row.get('ratio_cudnn_causal', float('nan')):6.3f}"
          f"{'  ' + row['error'] if 'error' in row else ''}",
          flush=True,
        )
  return rows


def write(path: str, rows: list[dict]) -> None:
  if path:
    with open(path, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--seq", default="16384,65536,131072", help="timed lengths S (T = S)")
  ap.add_argument("--layouts", default="causal,frame257")
  ap.add_argument("--impls", default="cudnn,lcv_hopper_two,lcv_hopper_fused", help="timed")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--check_dims", default="64,128", help="head dims of the correctness checks")
  ap.add_argument("--tol", type=float, default=2e-2, help="relative L2 error bound (bf16)")
  ap.add_argument("--skip_checks", action="store_true")
  ap.add_argument("--skip_timing", action="store_true")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes; interpreter off the GPU")
  ap.add_argument("--out", default="", help="append JSON lines here")
  args = ap.parse_args(argv)
  if args.smoke:
    args.seq, args.heads, args.head_dim, args.check_dims = "128", 2, 64, "64"
    # Off the GPU the kernels run in Mosaic GPU's interpreter, one host thread per warpgroup
    # blocking on simulated barriers. Inside a jit on a single CPU device those threads were
    # seen to starve (a hang, jax 0.10.2 and 0.11.2); with 8 CPU devices, as in the tests, not.
    jax.config.update("jax_num_cpu_devices", 8)
  args.seq = [int(x) for x in args.seq.split(",")]
  args.layouts = args.layouts.split(",")
  args.impls = args.impls.split(",")
  args.check_dims = [int(x) for x in args.check_dims.split(",")]
  for name in args.layouts:
    bench_attention.layout(name, 8)  # a bad name fails here, not after the checks
  known = ("cudnn", "lcv_hopper_two", "lcv_hopper_fused")
  if bad := [i for i in args.impls if i not in known]:
    raise ValueError(f"--impls {bad} must be among {known}")
  for h in (*args.check_dims, args.head_dim):
    if h not in flash_hopper.HEAD_DIMS:
      raise ValueError(f"head dim {h} must be one of {flash_hopper.HEAD_DIMS} (Hopper kernels)")
  if not args.smoke and not flash_hopper.supported(
    jnp.zeros((1, 8, 1, 128), jnp.bfloat16), jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
  ):
    raise SystemExit("no sm_90 GPU here: run with --smoke for the interpreter check")

  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "B": 1}
  meta["date"] = time.strftime("%Y-%m-%d")
  failed = False
  if not args.skip_checks:
    checks = check_all(args, meta)
    failed = not all(r["pass"] for r in checks)
  if not args.skip_timing:
    time_all(args, meta)
  verdict = "skipped" if args.skip_checks else "FAILED" if failed else "passed"
  print(f"checks {verdict}", flush=True)
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
