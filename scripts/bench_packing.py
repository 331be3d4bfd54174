"""Packing benchmark, one process: S tokens as S / L causal samples of L tokens, for each L.

The same allowed pairs two ways: *packed*, one row of S tokens whose segment ids cut it into
samples (the interval mask of DESIGN.md section 2 skips the tiles between samples), and
*batched*, B = S / L rows of L tokens, plain causal. cuDNN and tokamax take the batched form
(`is_causal`); ours runs both, so the table separates what short samples cost everyone (fixed
costs per CTA, masked diagonal tiles) from what the packed mask costs us. tokamax also runs the
packed row through its key-range mask (its forward skips there, its backward does not).

Every implementation is checked before it is timed: against the dense float32 reference when
L <= --check_max, else against cuDNN. Timing as in `bench_attention`: the implementations of one
(L, pass) take turns, --rounds times each after an untimed round; median and spread reported.
TFLOP/s are effective: 4 * N * H * (allowed pairs) for the forward, x3.5 for fwd+bwd.

Usage (on a GPU):  python scripts/bench_packing.py --total 16384 --out results.jsonl
Prints a table, then the JSON lines (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import (  # noqa: E402 - the sibling script, importable once on the path
  TOKAMAX_IMPLS,
  Case,
  _tokamax,
  fwd_bwd,
  rel_err,
  split_passes_and_impls,
  time_interleaved,
  timing_summary,
  tokamax_mask,
)

from lcv import masks  # noqa: E402
from lcv.kernels import flash_gpu, flash_hopper  # noqa: E402


def packed_case(total: int, length: int) -> Case:
  """One row of `total` tokens, causal samples of `length` tokens (text: no frames)."""
  seg = (np.arange(total) // length + 1)[None].astype(np.int32)
  frame = np.full((1, total), -1, np.int32)
  lo, hi = masks.intervals(seg, frame)
  density = (length + 1) / (2 * total)  # allowed pairs / total^2
  return Case("packed", total, lo, hi, masks.key_indices(1, total), density, seg, frame)


def batched_mask(b: int, length: int):
  """(lo, hi, kid) of b causal rows of `length` tokens."""
  lo, hi = masks.intervals(np.ones((b, length), np.int32), np.full((b, length), -1, np.int32))
  return lo, hi, masks.key_indices(b, length)


def reference(xs, b: int, length: int) -> dict:
  """pass -> the dense float32 twin's outputs on the batched form: [o] or [dq, dk, dv]."""
  lo, hi, kid = batched_mask(b, length)
  q, k, v, do = xs
  o, vjp = jax.vjp(lambda q, k, v: flash_gpu.attention_reference(q, k, v, lo, hi, kid)[0], q, k, v)
  return {"fwd": [o], "fwd_bwd": list(vjp(do))}


def impls(case: Case, b: int, length: int, gpu: bool):
  """name -> (attn(q, k, v) -> o, form): form "packed" takes [1, S, ...], "batched" [B, L, ...]."""
  lo_b, hi_b, kid_b = batched_mask(b, length)
  out = {}
  if gpu:  # Mosaic GPU has no CPU lowering; the portable kernel stands in on a CPU
    out["lcv_hopper_packed"] = (
      lambda q, k, v: flash_hopper.attention(q, k, v, case.lo, case.hi, case.kid)[0],
      "packed",
    )
    out["lcv_hopper_batched"] = (
      lambda q, k, v: flash_hopper.attention(q, k, v, lo_b, hi_b, kid_b)[0],
      "batched",
    )
    out["cudnn_batched"] = (
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
      "batched",
    )
  else:
    out["lcv_pallas_packed"] = (
      lambda q, k, v: flash_gpu.attention(q, k, v, case.lo, case.hi, case.kid)[0],
      "packed",
    )
    out["xla_batched"] = (
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
      "batched",
    )
  if (found := _tokamax()) is not None:
    ops, mask_cls, _ = found
    kw = tokamax_mask(case, mask_cls)
    for name, op in TOKAMAX_IMPLS.items():
      if op in ops:
        out[f"{name}_batched"] = (lambda q, k, v, f=ops[op]: f(q, k, v, is_causal=True), "batched")
        out[f"{name}_packed"] = (lambda q, k, v, f=ops[op], kw=kw: f(q, k, v, **kw), "packed")
  return out


def bench(args) -> list[dict]:
  n, h, total, dt = args.heads, args.head_dim, args.total, jnp.bfloat16
  gpu = jax.default_backend() == "gpu"
  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "N": n, "H": h}
  if (found := _tokamax()) is not None:
    meta["tokamax"] = found[2]
  rows = []
  for length in args.lengths:
    if total % length:
      raise ValueError(f"{length=} must divide --total {total=}")
    b = total // length
    case = packed_case(total, length)
    key = jax.random.split(jax.random.key(length), 4)
    batched = [jax.random.normal(x, (b, length, n, h), dt) for x in key]
    forms = {"batched": batched, "packed": [x.reshape(1, total, n, h) for x in batched]}
    candidates = {
      name: f
      for name, f in impls(case, b, length, gpu).items()
      if not args.impls or name in args.impls
    }
    ref = reference(batched, b, length) if length <= args.check_max else None
    flops = 4 * n * h * b * length * (length + 1) / 2
    for pas in args.passes:
      calls, outs, failed = {}, {}, {}
      for name, (attn, form) in candidates.items():
        fn = jax.jit(attn) if pas == "fwd" else fwd_bwd(attn)
        call = forms[form][:3] if pas == "fwd" else forms[form]
        try:  # compile and warm up before any timing
          out = jax.block_until_ready(fn(*call))
        except Exception as e:  # noqa: BLE001 - record the failure and go on with the sweep
          failed[name] = e
          continue
        outs[name] = [x.reshape(b, length, n, h) for x in ([out] if pas == "fwd" else out)]
        calls[name] = (fn, call)
      against = "reference" if ref is not None else "cudnn_batched"
      check = ref[pas] if ref is not None else outs.get(against)
      # About as much device time per timing at every L (a call's time grows with L).
      iters = args.iters or max(3, min(50, 65536 // length))
      times = {**time_interleaved(calls, iters, args.rounds), **failed}
      own = {}
      for name, ts in times.items():
        row = dict(meta, impl=name, L=length, S=total, B=b, pass_=pas, density=case.density)
        if name in outs and check is not None and name != against:
          row["rel_err"] = max(rel_err(x, r) for x, r in zip(outs[name], check))
          row["checked_against"] = against
        if isinstance(ts, Exception):
          row["error"] = f"{type(ts).__name__}: {str(ts)[:200]}"
        else:
          row.update(timing_summary(ts, flops, pas))
          own[name] = statistics.median(ts)
        rows.append(row)
      for row in rows[-len(times) :]:
        if "ms" in row and "cudnn_batched" in own:
          row["ratio_cudnn"] = round(own["cudnn_batched"] / row["ms"], 3)
      if args.out:  # per (L, pass), so a sweep cut short keeps what it measured
        with open(args.out, "a") as f:
          f.writelines(json.dumps(r) + "\n" for r in rows[-len(times) :])
    print(f"done L={length}", file=sys.stderr, flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--total", type=int, default=16384, help="tokens per packed row (S)")
  ap.add_argument("--lengths", default="256,512,1024,2048,4096,8192,16384", help="sample lengths L")
  ap.add_argument("--passes", default="fwd,fwd_bwd")
  ap.add_argument("--impls", default="", help="comma list of implementations (default: all)")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--iters", type=int, default=0, help="calls per timing (default: by L)")
  ap.add_argument("--rounds", type=int, default=7, help="timings per impl (median reported)")
  ap.add_argument("--check_max", type=int, default=4096, help="dense reference check up to this L")
  ap.add_argument("--out", default="", help="append JSON lines here (after each L and pass)")
  args = ap.parse_args(argv)
  args.lengths = [int(x) for x in args.lengths.split(",")]
  split_passes_and_impls(args)

  rows = bench(args)
  print(
    f"{'impl':26s} {'L':>6s} {'B':>4s} {'pass':8s} {'ms':>9s} {'TFLOP/s':>8s} {'x cuDNN':>8s}"
    f" {'spread':>7s} {'err':>8s}"
  )
  for r in rows:
    print(
      f"{r['impl']:26s} {r['L']:6d} {r['B']:4d} {r['pass_']:8s} "
      f"{r.get('ms', float('nan')):9.3f} {r.get('tflops', float('nan')):8.1f} "
      f"{r.get('ratio_cudnn', float('nan')):8.3f} {r.get('spread', float('nan')):7.3f} "
      f"{r.get('rel_err', float('nan')):8.1e}{'  ' + r['error'] if 'error' in r else ''}"
    )
  print("\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
  main()
