"""Attention benchmark, one process: lcv (Hopper, portable) vs cuDNN, JAX Pallas, tokamax, XLA.

Layouts (one [B, S] token description each, DESIGN.md section 2): `causal` (one text sample),
`frame144` / `frame257` (one video sample, frame-block-causal with 144- / 257-token frames) and
`packed` (4 equal samples, each frame-block-causal with 257-token frames). Every (impl, layout, S)
is checked before it is timed: against a dense float32 reference up to --check_max; above it
(the dense logits would not fit) against an anchor implementation run in the same process, cuDNN
for `causal` and otherwise lcv's kernel (`checked_against` in each row names which). The
implementations of one (layout, S, pass) are timed in turns, `--rounds` times each after one
untimed round (median reported, with the spread of the rounds), so drift over the sweep does not
favour the one timed first. Effective TFLOP/s counts only allowed pairs: 4 * B * N * T * S * H *
density for the forward, x3.5 for forward + backward (2 matmuls forward, 5 backward: the usual
convention).

Usage (on a GPU):  python scripts/bench_attention.py --seq 4096,16384 --out results.jsonl
Prints a table, then the JSON lines (also written to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from lcv import masks
from lcv.kernels import flash_gpu, flash_hopper

LAYOUTS = ("causal", "frame144", "frame257", "packed")


def layout(name: str, s: int):
  """(segment_ids, frame_ids) int32[1, S] of a named layout."""
  idx = np.arange(s)
  if name == "causal":
    return np.ones((1, s), np.int32), np.full((1, s), -1, np.int32)
  if name.startswith("frame"):
    return np.ones((1, s), np.int32), (idx // int(name[5:]))[None].astype(np.int32)
  if name == "packed":
    seg = idx * 4 // s + 1
    start = (seg - 1) * s // 4
    return seg[None].astype(np.int32), ((idx - start) // 257)[None].astype(np.int32)
  raise ValueError(f"{name=} must be one of {LAYOUTS}")


def time_interleaved(calls: dict, iters: int, rounds: int) -> dict[str, list[float] | Exception]:
  """ms per call of each `name: (fn, args)` in `calls`, once per round: `iters` back-to-back
  calls (dispatch overlaps the device work; one sync), the implementations taking turns and each
  round starting one further along, so a drift of the device's clock or temperature over the
  sweep falls on every implementation alike. A first, untimed round brings the clocks back up
  after compilation left the device idle (timed, it read up to 10x the median on H100s).
  Returns name -> the per-round times, or the exception that stopped that implementation.
  Compile and warm up before."""
  names = list(calls)
  times = {name: [] for name in names}
  for r in range(-1, rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      if isinstance(times[name], Exception):
        continue
      fn, args = calls[name]
      try:
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(iters)]
        jax.block_until_ready(outs)
        if r >= 0:
          times[name].append((time.perf_counter() - t0) * 1e3 / iters)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: that row records it
        times[name] = e
      outs = None
  return times


def timing_summary(times: list[float], flops: float, pas: str) -> dict:
  """A row's timing fields from per-round ms: the median, the spread (max - min over median) and
  effective TFLOP/s (`flops` of the forward; x3.5 for fwd_bwd)."""
  ms = statistics.median(times)
  tflops = flops * (1 if pas == "fwd" else 3.5) / ms / 1e9
  return {
    "ms": round(ms, 4),
    "spread": round((max(times) - min(times)) / ms, 4),
    "tflops": round(tflops, 1),
  }


def fwd_bwd(attn):
  """jit(q, k, v, do -> (dq, dk, dv)) of an attn(q, k, v) -> o, forward included."""

  def run(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)

  return jax.jit(run)


# Above --check_max, the others are compared with the first of these that runs (the anchor).
ANCHORS = ("cudnn", "lcv_hopper", "lcv_pallas")


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@dataclasses.dataclass
class Case:
  layout: str
  s: int
  lo: jax.Array
  hi: jax.Array
  kid: jax.Array
  density: float
  seg: np.ndarray
  frame: np.ndarray


def make_case(name: str, s: int) -> Case:
  seg, fr = layout(name, s)
  lo, hi = masks.intervals(seg, fr)
  kid = masks.key_indices(1, s)
  # Allowed pairs counted in float64 on the host (int32 S * S overflows at 64K).
  lo_np, hi_np = np.asarray(lo[0], np.float64), np.asarray(hi[0], np.float64)
  density = float(np.maximum(hi_np - lo_np + 1, 0).sum() / (s * s))
  return Case(name, s, lo, hi, kid, density, seg, fr)


def impls(case: Case, args, block_sizes):
  """name -> attn(q, k, v) -> o for the implementations that support this case."""
  lo, hi, kid = case.lo, case.hi, case.kid
  out = {
    "lcv_pallas": lambda q, k, v: flash_gpu.attention(
      q, k, v, lo, hi, kid, block_sizes=block_sizes
    )[0]
  }
  if jax.default_backend() == "gpu":  # Mosaic GPU has no CPU lowering (sm_90 only)
    out["lcv_hopper"] = lambda q, k, v: flash_hopper.attention(q, k, v, lo, hi, kid)[0]
  if case.layout == "causal":
    out["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
    try:
      from jax.experimental.pallas.ops.gpu import attention as pallas_mha

      out["jax_pallas_triton"] = lambda q, k, v: pallas_mha.mha(
        q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True
      )
    except ImportError as e:
      print(f"jax Pallas Triton mha unavailable: {e}", file=sys.stderr)
  elif case.s <= args.dense_mask_max:
    dense = jnp.asarray(masks.dense(case.seg, case.frame))[:, None]
    out["cudnn_dense_mask"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=dense, implementation="cudnn"
    )
  if case.s <= args.xla_max:
    dense = jnp.asarray(masks.dense(case.seg, case.frame))[:, None]
    out["xla"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=dense, implementation="xla"
    )
  out.update(tokamax_impls(case))
  return out


def mgpu_forward(case: Case):
  """JAX's Mosaic-GPU FA3 forward (fp16 only, causal only), if it runs here; else None."""
  if case.layout != "causal":
    return None
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    cfg = mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
    return lambda q, k, v: mgpu.attention((q * q.shape[-1] ** -0.5).astype(q.dtype), k, v, cfg)
  except Exception as e:  # noqa: BLE001 - a peer that does not run is reported, not fatal
    print(f"attention_mgpu unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return None


# tokamax (openxla/tokamax, the kernel library JAX's deprecated Pallas GPU ops point to).
#
# Its public `tokamax.dot_product_attention` takes only `is_causal` or a dense boolean mask (no
# skipping), so the frame and packed layouts call its op objects with `base.Mask(k_start, k_end)`:
# one half-open key range [k_start, k_end) per query row, which is exactly our interval
# [lo, hi] (DESIGN.md section 2) and costs O(S) memory. Its forward skips key tiles outside the
# range; its backward skips tiles only for plain `is_causal` and applies ranges elementwise (read
# from pallas_mosaic_gpu_vjp.py in tokamax 0.0.17), so `causal` uses `is_causal=True`.
# Residuals (m, l) in natural log exist (return_residuals=True) but its backward rejects them,
# so like every other peer here it is timed on the output alone.

TOKAMAX_IMPLS = {"tokamax_mosaic": "mosaic_gpu", "tokamax_triton": "triton"}


@functools.cache
def _tokamax():
  """(attention ops by tokamax name, tokamax's Mask class, version), or None when tokamax does
  not import here (the reason is printed once, and the sweep goes on without it)."""
  if importlib.util.find_spec("tokamax") is None:
    print("tokamax not installed: skipping its rows", file=sys.stderr)
    return None
  # tokamax/__init__ imports xprof.cli.tools.get_kernel_stats_tool eagerly (tokamax._src.
  # benchmarking, used only by its xprof timing mode). The xprof wheel is 32 MB of profiler UI and
  # native converters, too big to carry to an offline machine; when it is absent an empty module
  # takes that one name. Nothing on the attention path touches it.
  added = []
  if importlib.util.find_spec("xprof") is None:
    names = ("xprof", "xprof.cli", "xprof.cli.tools", "xprof.cli.tools.get_kernel_stats_tool")
    for parent, name in zip((None, *names), names):
      sys.modules[name] = types.ModuleType(name)
      added.append(name)
      if parent:
        setattr(sys.modules[parent], name.rsplit(".", 1)[1], sys.modules[name])
  try:
    import tokamax
    from absl import flags
    from tokamax._src.ops.attention import api, base

    # Older tokamax (0.0.12) reads absl flags when an op runs; unparsed, absl would parse this
    # script's argv and reject its options. Its defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  except Exception as e:  # noqa: BLE001 - e.g. a jax older than tokamax needs: skip, not fatal
    for name in added:
      sys.modules.pop(name, None)
    print(f"tokamax unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return None
  return api.IMPLEMENTATIONS, base.Mask, tokamax.__version__


def tokamax_mask(case: Case, mask_cls):
  """tokamax mask keyword arguments of a layout: `is_causal` for `causal`; otherwise a Mask with
  k_start = lo, k_end = hi + 1, int32[B, 1, T] (broadcast over heads)."""
  if case.layout == "causal":
    return {"is_causal": True}
  return {"mask": mask_cls(k_start=case.lo[:, None, :], k_end=case.hi[:, None, :] + 1)}


def tokamax_impls(case: Case):
  """name -> attn(q, k, v) -> o for tokamax's GPU kernels (Mosaic GPU and Pallas Triton); empty
  when tokamax does not import here. tokamax's "cudnn" and "xla" wrap jax.nn, measured above."""
  found = _tokamax()
  if found is None:
    return {}
  ops, mask_cls, _ = found
  kwargs = tokamax_mask(case, mask_cls)
  return {
    name: functools.partial(ops[op], **kwargs) for name, op in TOKAMAX_IMPLS.items() if op in ops
  }


def _wanted(args, impl: str) -> bool:
  return not args.impls or impl in args.impls


def bench(args) -> list[dict]:
  b, n, h, dt = 1, args.heads, args.head_dim, jnp.bfloat16
  kh = args.kv_heads or n
  bs = flash_gpu.BlockSizes(**json.loads(args.block_sizes)) if args.block_sizes else None
  rows = []
  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "B": b, "N": n, "K": kh}
  meta["H"] = h
  meta["lcv_block_sizes"] = dataclasses.asdict(bs or flash_gpu.default_block_sizes(h))
  if any(_wanted(args, i) for i in TOKAMAX_IMPLS) and (found := _tokamax()) is not None:
    meta["tokamax"] = found[2]
  for s in args.seq:
    key = jax.random.split(jax.random.key(s), 4)
    q, k, v, do = (
      jax.random.normal(x, (b, s, kh if i in (1, 2) else n, h), dt) for i, x in enumerate(key)
    )
    cudnn_ms = {}
    for name in args.layouts:
      case = make_case(name, s)
      flops = 4 * b * n * s * s * h * case.density
      ref = None
      if s <= args.check_max:
        ref = jax.jit(
          lambda q, k, v, do, c=case: jax.vjp(
            lambda q, k, v: flash_gpu.attention_reference(q, k, v, c.lo, c.hi, c.kid)[0], q, k, v
          )
        )
        ro, vjp = ref(q, k, v, do)
        ref = (ro, vjp(do))
      candidates = {i: f for i, f in impls(case, args, bs).items() if _wanted(args, i)}
      mg = mgpu_forward(case) if _wanted(args, "jax_mosaic_gpu_fp16") and kh == n else None
      if mg is not None:
        q16, k16, v16 = (x.astype(jnp.float16) for x in (q, k, v))
      for pas in args.passes:
        calls, pending = {}, {}
        for impl, attn in candidates.items():
          fn = jax.jit(attn) if pas == "fwd" else fwd_bwd(attn)
          calls[impl] = (fn, (q, k, v) if pas == "fwd" else (q, k, v, do))
        if mg is not None and pas == "fwd":
          calls["jax_mosaic_gpu_fp16"] = (jax.jit(mg), (q16, k16, v16))
        want = None if ref is None else (ref[0] if pas == "fwd" else ref[1])
        anchor = "reference" if ref is not None else None
        # The possible anchors first (in ANCHORS' order): the first that runs is the anchor.
        order = sorted(calls, key=lambda i: ANCHORS.index(i) if i in ANCHORS else len(ANCHORS))
        for impl in order:
          fn, call = calls[impl]
          row = dict(meta, impl=impl, layout=name, S=s, pass_=pas, density=round(case.density, 4))
          try:  # compile, warm up and check before any timing
            out = jax.block_until_ready(fn(*call))
            if anchor is None and impl in ANCHORS:
              want, anchor, row["checked_against"] = out, impl, "none (the anchor)"
            elif want is not None:
              row["checked_against"] = anchor
              row["rel_err"] = (
                rel_err(out, want)
                if pas == "fwd"
                else max(rel_err(g, r) for g, r in zip(out, want))
              )
            jax.block_until_ready(fn(*call))
            pending[impl] = row
          except Exception as e:  # noqa: BLE001 - record the failure and go on with the sweep
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            del calls[impl]
        times = time_interleaved(calls, args.iters, args.rounds) if calls else {}
        for impl, row in pending.items():
          if isinstance(times[impl], Exception):
            row["error"] = f"{type(times[impl]).__name__}: {str(times[impl])[:200]}"
            rows.append(row)
            continue
          row.update(timing_summary(times[impl], flops, pas))
          if impl.startswith("cudnn"):
            cudnn_ms[(name, pas)] = statistics.median(times[impl])
          rows.append(row)
    # Ratio to cuDNN causal (the target of DESIGN.md section 5) for every row of this S.
    for row in rows:
      if row["S"] == s and "ms" in row and ("causal", row["pass_"]) in cudnn_ms:
        c_tflops = 4 * b * n * s * s * h * 0.5 * (1 if row["pass_"] == "fwd" else 3.5)
        c_tflops /= cudnn_ms[("causal", row["pass_"])] * 1e9
        row["ratio_cudnn_causal"] = round(row["tflops"] / c_tflops, 3)
    if args.out:  # per S, so a sweep cut short keeps what it measured
      with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["S"] == s)
    print(f"done S={s}", file=sys.stderr, flush=True)
  return rows


def split_passes_and_impls(args) -> None:
  """--passes and --impls (comma lists) as lists, in place; a pass other than fwd / fwd_bwd is
  an error. Shared with `bench_packing`."""
  args.passes = args.passes.split(",")
  args.impls = [x for x in args.impls.split(",") if x]
  for p in args.passes:
    if p not in ("fwd", "fwd_bwd"):
      raise ValueError(f"--passes entry {p!r} must be fwd or fwd_bwd")


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--seq", default="4096,16384,65536,131072")
  ap.add_argument("--layouts", default=",".join(LAYOUTS))
  ap.add_argument("--passes", default="fwd,fwd_bwd")
  ap.add_argument("--impls", default="", help="comma list of implementations (default: all)")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv_heads", type=int, default=0, help="K of GQA (default: = --heads)")
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--iters", type=int, default=10, help="back-to-back calls per timing")
  ap.add_argument("--rounds", type=int, default=5, help="timings per impl (median reported)")
  ap.add_argument("--check_max", type=int, default=4096, help="dense reference check up to this S")
  ap.add_argument(
    "--dense_mask_max", type=int, default=16384, help="cuDNN with a dense mask up to this S"
  )
  ap.add_argument(
    "--xla_max", type=int, default=4096, help="XLA (materialised logits) up to this S"
  )
  ap.add_argument(
    "--block_sizes", default="", help='JSON of BlockSizes fields, e.g. {"block_q": 128}'
  )
  ap.add_argument("--out", default="", help="append JSON lines here (after each S)")
  args = ap.parse_args(argv)
  args.seq = [int(x) for x in args.seq.split(",")]
  args.layouts = args.layouts.split(",")
  split_passes_and_impls(args)

  rows = bench(args)
  print(
    f"{'impl':22s} {'layout':9s} {'S':>7s} {'pass':8s} {'ms':>9s} {'TFLOP/s':>8s} {'x cuDNN':>8s}"
    f" {'spread':>7s} {'err':>8s} against"
  )
  for r in rows:
    print(
      f"{r['impl']:22s} {r['layout']:9s} {r['S']:7d} {r['pass_']:8s} "
      f"{r.get('ms', float('nan')):9.3f} "
      f"{r.get('tflops', float('nan')):8.1f} {r.get('ratio_cudnn_causal', float('nan')):8.3f} "
      f"{r.get('spread', float('nan')):7.3f} "
      f"{r.get('rel_err', float('nan')):8.1e} {r.get('checked_against', '-')}"
      f"{'  ' + r['error'] if 'error' in r else ''}"
    )
  print("\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
  main()
