"""Ring attention over the local GPUs against the single-GPU kernel on the same per-GPU work.

For each sequence length S and mask (causal text; frame-block-causal video of 257-token frames),
times fwd+bwd of `lcv.parallel.ring_attention.sequence_parallel_attention` over n devices
(zig-zag order) and of the per-step kernel alone on one device at length S / sqrt(n), which has the
same number of allowed (query, key) pairs as one device's share of the ring. Reports per-GPU
TFLOP/s of both (useful FLOPs only: 4 N H per allowed pair forward, 10 backward), their ratio
(efficiency; target >= 0.90 from 256K on 4 GPUs), and the compute/communication overlap from three
timings of the ring: full, compute-only (K/V stay put, only the int32 key indices move), and
communication-only (the same hops, kernels replaced by zeros):

  hidden = (t_compute + t_comm - t_full) / min(t_compute, t_comm)   (1 = fully overlapped).

Prints a table, then one JSON line per row (also appended to --out).

  python scripts/bench_ring.py --out benchmarks/results/ring.jsonl   # 4 GPUs, S 128K..1M
  python scripts/bench_ring.py --smoke                 # tiny sizes on 4 emulated CPU devices
(with lcv importable: `pip install -e .` or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seq", type=int, nargs="+", help="default 128K 256K 512K 1M (smoke: 512 1024)")
  p.add_argument("--masks", nargs="+", default=["causal", "frame"], choices=["causal", "frame"])
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=32)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--strategy", default="ring", choices=["ring", "ulysses", "hybrid", "all_gather"])
  p.add_argument("--ulysses-size", type=int, default=None)
  p.add_argument("--backend", default="auto")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--no-overlap", action="store_true", help="skip the compute/comm-only timings")
  p.add_argument("--out", default=None, help="append JSON lines here")
  p.add_argument(
    "--no-lhs", action="store_true", help="do not add XLA's latency-hiding scheduler flag"
  )
  p.add_argument("--smoke", action="store_true", help="tiny sizes on 4 emulated CPU devices")
  args = p.parse_args(argv)
  if args.smoke:
    args.heads, args.kv_heads, args.head_dim, args.dtype, args.iters = 4, 2, 32, "float32", 1
  if args.seq is None:
    args.seq = [512, 1024] if args.smoke else [2**17, 2**18, 2**19, 2**20]
  return args


args = parse_args()
_flags = os.environ.get("XLA_FLAGS", "")
if args.smoke and "xla_force_host_platform_device_count" not in _flags:
  _flags += f" --xla_force_host_platform_device_count={args.devices}"
if not args.no_lhs and "latency_hiding_scheduler" not in _flags:
  # Lets XLA schedule each ring hop's collective-permute around the step's kernels (GPU).
  _flags += " --xla_gpu_enable_latency_hiding_scheduler=true"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lcv import masks  # noqa: E402
from lcv.parallel import context  # noqa: E402
from lcv.parallel import ring_attention as ra  # noqa: E402

FRAME = 257  # LWM's frame: 256 VQ codes + end-of-frame; deliberately not a power of two


def layout(kind: str, s: int):
  """(segment_ids, frame_ids) int32[1, S]: one text sample, or a 64-token prompt + frames."""
  seg = np.ones((1, s), np.int32)
  frame = np.full((1, s), -1, np.int32)
  if kind == "frame":
    body = np.arange(s - 64) // FRAME
    frame[0, 64:] = body
  return seg, frame


def pairs(mask: masks.TokenMask) -> float:
  """Number of allowed (query, key) pairs, from the intervals."""
  widths = np.asarray(mask.hi, np.int64) - np.asarray(mask.lo, np.int64) + 1
  return float(np.maximum(widths, 0).sum())  # int64: up to 5e11 pairs at 1M tokens


def flops(n_pairs: float, heads: int, head_dim: int) -> float:
  """Useful fwd+bwd FLOPs: QK^T and PV forward (4 N H per pair), five matmuls backward (10)."""
  return 14.0 * n_pairs * heads * head_dim


def timed(fn, *xs, iters: int) -> float:
  jax.block_until_ready(fn(*xs))  # compile + warm up
  best = math.inf
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*xs))
    best = min(best, time.perf_counter() - t)
  return best


def fwd_bwd(attend):
  """jit(q, k, v, do, *rest) -> (dq, dk, dv) of attend(q, k, v, *rest) with cotangent do."""

  def run(q, k, v, do, *rest):
    _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, *rest), q, k, v)
    return vjp(do)

  return jax.jit(run)


def random_qkvo(key, s, shardings, dtype):
  shapes = [(1, s, args.heads, args.head_dim)] + [(1, s, args.kv_heads, args.head_dim)] * 2
  shapes.append(shapes[0])
  keys = jax.random.split(key, 4)
  make = jax.jit(
    lambda ks: [jax.random.normal(k_, sh, dtype) for k_, sh in zip(ks, shapes)],
    out_shardings=shardings,
  )
  return make(keys)


@contextlib.contextmanager
def patched_ring(mode: str):
  """Compute-only: only int key indices travel. Comm-only: the kernels return zeros."""
  saved = {name: getattr(ra._Ring, name) for name in ("send", "forward", "backward")}

  def send_ints(self, x):
    def one(a):
      if not jnp.issubdtype(a.dtype, jnp.integer):
        return a
      perm = [(i, (i + self.stride) % self.axis_size) for i in range(self.axis_size)]
      return lax.ppermute(a, self.axis_name, perm)

    return jax.tree.map(one, x)

  # One element taken from the received K/V keeps the hops alive (else XLA drops them as dead).
  def fwd_zeros(self, q, k, v, lo, hi, idx):
    b, t, n, _ = q.shape
    o = jnp.zeros_like(q).at[0, 0, 0, 0].set((k[0, 0, 0, 0] + v[0, 0, 0, 0]).astype(q.dtype))
    return o, jnp.zeros((b, n, t), jnp.float32)

  def bwd_zeros(self, q, k, v, o, lse, do, lo, hi, idx):
    touch = (k[0, 0, 0, 0] + v[0, 0, 0, 0]).astype(q.dtype)
    return jnp.zeros_like(q).at[0, 0, 0, 0].set(touch), jnp.zeros_like(k), jnp.zeros_like(v)

  # Traced ring steps are cached by JAX; clear them so the patch takes effect, and again after.
  jax.clear_caches()
  if mode == "compute":
    ra._Ring.send = send_ints
  elif mode == "comm":
    ra._Ring.forward, ra._Ring.backward = fwd_zeros, bwd_zeros
  try:
    yield
  finally:
    for name, fn in saved.items():
      setattr(ra._Ring, name, fn)
    jax.clear_caches()


def bench_one(kind: str, s: int, n: int, dtype) -> dict:
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("context",))
  perm = context.zigzag_indices(s, n)
  seg, frame = layout(kind, s)
  mask = context.reorder(masks.token_mask(seg, frame), perm)
  act = NamedSharding(mesh, P(None, "context", None, None))
  q, k, v, do = random_qkvo(jax.random.key(s), s, [act] * 4, dtype)
  mask = jax.device_put(mask, NamedSharding(mesh, P(None, "context")))
  kw = dict(strategy=args.strategy, mesh=mesh, backend=args.backend)
  if args.ulysses_size:
    kw["ulysses_size"] = args.ulysses_size

  def ring_attend(q, k, v, mask):
    return ra.sequence_parallel_attention(q, k, v, mask, **kw)

  t_ring = timed(fwd_bwd(ring_attend), q, k, v, do, mask, iters=args.iters)
  work = flops(pairs(mask), args.heads, args.head_dim)
  row = dict(
    bench="ring",
    mask=kind,
    seq=s,
    devices=n,
    strategy=args.strategy,
    heads=args.heads,
    kv_heads=args.kv_heads,
    head_dim=args.head_dim,
    dtype=str(jnp.dtype(dtype)),
    backend=ra.backend_module(args.backend).__name__,
    platform=jax.devices()[0].platform,
    device_kind=jax.devices()[0].device_kind,
    ring_s=t_ring,
    ring_tflops_per_device=work / n / t_ring / 1e12,
  )
  if not args.no_overlap and args.strategy in ("ring", "hybrid"):
    with patched_ring("compute"):
      t_compute = timed(fwd_bwd(ring_attend), q, k, v, do, mask, iters=args.iters)
    with patched_ring("comm"):
      t_comm = timed(fwd_bwd(ring_attend), q, k, v, do, mask, iters=args.iters)
    hidden = (t_compute + t_comm - t_ring) / max(min(t_compute, t_comm), 1e-12)
    row.update(compute_only_s=t_compute, comm_only_s=t_comm, hidden=min(max(hidden, 0.0), 1.0))
  del q, k, v, do

  # One device at the length with the same number of allowed pairs as one ring device's share.
  s1 = max(1024, int(round(s / math.sqrt(n) / 1024)) * 1024) if not args.smoke else s // 2
  seg1, frame1 = layout(kind, s1)
  mask1 = masks.token_mask(seg1, frame1)
  one = NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",)), P())
  q1, k1, v1, do1 = random_qkvo(jax.random.key(s1), s1, [one] * 4, dtype)
  kernel = ra.backend_module(args.backend)

  def single(q, k, v, lo, hi, idx):
    return kernel.attention(q, k, v, lo, hi, idx)[0]

  t_single = timed(fwd_bwd(single), q1, k1, v1, do1, *mask1, iters=args.iters)
  single_tflops = flops(pairs(mask1), args.heads, args.head_dim) / t_single / 1e12
  row.update(
    single_seq=s1,
    single_s=t_single,
    single_tflops=single_tflops,
    efficiency=row["ring_tflops_per_device"] / single_tflops,
  )
  return row


def main():
  n = min(args.devices, len(jax.devices()))
  dtype = jnp.dtype(args.dtype)
  rows = []
  header = (
    f"{'mask':6} {'S':>8} {'n':>2} {'ring s':>8} {'TF/s/dev':>9} {'1-dev TF/s':>10} "
    f"{'eff':>5} {'hidden':>6}"
  )
  print(header)
  for s in args.seq:
    for kind in args.masks:
      try:
        row = bench_one(kind, s, n, dtype)
      except Exception as e:  # one size running out of memory must not hide the others
        row = dict(bench="ring", mask=kind, seq=s, devices=n, error=f"{type(e).__name__}: {e}")
        print(f"{kind:6} {s:>8} {n:>2} failed: {row['error'][:200]}", flush=True)
        rows.append(row)
        continue
      rows.append(row)
      hidden = row.get("hidden", float("nan"))
      print(
        f"{kind:6} {s:>8} {n:>2} {row['ring_s']:8.3f} {row['ring_tflops_per_device']:9.4g} "
        f"{row['single_tflops']:10.4g} {row['efficiency']:5.2f} {hidden:6.2f}",
        flush=True,
      )
  lines = [json.dumps(r) for r in rows]
  print("\n".join(lines))
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n")
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
