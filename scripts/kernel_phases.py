"""Where a CTA of the Hopper fused backward spends its cycles, measured inside the kernel.

    python scripts/kernel_phases.py --layout packed2048 --head_dim 128     # on a Hopper GPU

Mosaic GPU's on-device profiler (`plgpu.CompilerParams(profile_space=...)`) has the first
thread of every warpgroup store (scope, %clock) at each edge of the `jax.named_scope`s in the
kernel, and JAX writes them out as a trace. `hopper_fused_backward` names its phases:

- consumers (warpgroups 0 and 1): "keys" (its K / V tiles loaded and awaited, once), then per
  stream position "queries" (waiting for the position's query-side stage) and the position's
  mode, "skip" / "mask" / "full", with "exchange" inside it (waiting for both dS^T tiles of the
  previous position); at the end "last_dq" (the last dQ product and the syncs after it) and
  "store" (dK / dV out);
- the producer (warpgroup 2): per position "free" (waiting for a stage to be released, then its
  loads issued), "staged" (waiting for a dQ tile) and "read" (waiting for its reduce-add to read
  the staging buffer).

Prints, per warpgroup, each scope's count and cycles per CTA and the mean CTA span in cycles
(%clock is the SM's cycle counter: divide by the SM clock for time). The gaps between CTAs are
not reported: each CTA's copy of its profile to global memory (one thread, about 100 cycles per
entry) falls in them. The profile buffer lives in shared memory beside the kernel's, three scopes
per position: long causal rows at H = 128 do not fit (profile a packed layout instead).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WARPGROUPS = ("consumer 0", "consumer 1", "producer")


def phases(events: list[dict], warpgroups: int = len(WARPGROUPS)) -> dict:
  """Trace events of Mosaic GPU's profiler (ph "B" / "E", ts in us of which each unit of 1e-3 is
  one %clock cycle inside a CTA, tid = 1 + warpgroup + warpgroups * CTA) -> {"ctas": n,
  "warpgroups": [{"span": mean cycles first to last edge, "scopes": {name: (per CTA, cycles per
  event)}}]}, scopes in order of first appearance."""
  opened, edges = {}, collections.defaultdict(list)
  total = [collections.Counter() for _ in range(warpgroups)]
  count = [collections.Counter() for _ in range(warpgroups)]
  for e in events:
    tid, name, t = e["tid"], e["name"], e["ts"] * 1e3
    wg = (tid - 1) % warpgroups
    edges[tid].append(t)
    if e["ph"] == "B":
      opened[tid, name] = t
    else:
      total[wg][name] += t - opened.pop((tid, name))
      count[wg][name] += 1
  if opened:
    raise ValueError(f"scopes opened and never closed: {sorted(set(n for _, n in opened))}")
  ctas = len({(tid - 1) // warpgroups for tid in edges})
  out = []
  for wg in range(warpgroups):
    spans = [max(ts) - min(ts) for tid, ts in edges.items() if (tid - 1) % warpgroups == wg]
    scopes = {n: (count[wg][n] / ctas, total[wg][n] / count[wg][n]) for n in total[wg]}
    out.append({"span": float(np.mean(spans)) if spans else 0.0, "scopes": scopes})
  return {"ctas": ctas, "warpgroups": out}


def table(result: dict, names=WARPGROUPS) -> str:
  lines = [f"{result['ctas']} CTAs; cycles (SM clock), means over the CTAs"]
  for name, wg in zip(names, result["warpgroups"]):
    lines.append(f"{name}: span {wg['span']:,.0f} cycles per CTA")
    lines.append(
      f"  {'scope':10s} {'per CTA':>8s} {'cycles each':>12s} {'per CTA':>10s} {'share':>6s}"
    )
    for scope, (n, each) in wg["scopes"].items():
      share = n * each / wg["span"] if wg["span"] else 0.0
      lines.append(f"  {scope:10s} {n:8.2f} {each:12,.0f} {n * each:10,.0f} {share:6.1%}")
  return "\n".join(lines)


def profile_space(lo, hi, kid, groups: int) -> int:
  """Ranges per warpgroup the profile needs: three per stream position of the longest CTA and a
  few once per CTA."""
  from lcv.kernels import flash_gpu, hopper_pipeline

  _, q_range = flash_gpu.tile_ranges(lo, hi, kid, hopper_pipeline.ROWS, hopper_pipeline.ROWS)
  r = np.asarray(hopper_pipeline.cta_ranges(q_range))
  return 3 * int((r[..., 1] - r[..., 0]).max()) * groups + 16


def run(args) -> dict:
  """Profile one fused backward call on the GPU and return `phases` of its trace."""
  import jax
  import jax.numpy as jnp
  from bench_attention import make_case
  from bench_packing import packed_case

  from lcv.kernels import flash_hopper, hopper_backward, hopper_fused_backward, hopper_pipeline

  if args.head_dim not in hopper_fused_backward.HEAD_DIMS:
    raise ValueError(
      f"{args.head_dim=}: the fused backward runs at {hopper_fused_backward.HEAD_DIMS}"
    )
  s, n, kh, h = args.seq, args.heads, args.kv_heads or args.heads, args.head_dim
  if args.layout.startswith("packed") and args.layout[6:].isdigit():
    case = packed_case(s, int(args.layout[6:]))
  else:
    case = make_case(args.layout, s)
  lo, hi, kid = case.lo, case.hi, case.kid
  keys = jax.random.split(jax.random.key(0), 4)
  q, do = (jax.random.normal(x, (1, s, n, h), jnp.bfloat16) for x in keys[:2])
  k, v = (jax.random.normal(x, (1, s, kh, h), jnp.bfloat16) for x in keys[2:])
  o, lse = flash_hopper.forward(q, k, v, lo, hi, kid)
  p = hopper_pipeline.plan(q, k, None, None)
  ops = hopper_backward.operands(p, q, k, v, o, lse, do, lo, hi, kid)
  space = profile_space(lo, hi, kid, p.groups)
  with tempfile.TemporaryDirectory() as d:
    f = jax.jit(lambda *a: hopper_fused_backward.dkv_dq(p, *a, profile=(space, d)))
    try:
      jax.block_until_ready(f(*ops))
    except Exception as e:
      raise RuntimeError(
        f"the fused backward with a profile of {space=} ranges per warpgroup "
        f"({3 * space * 16} bytes of shared memory beside the kernel's) failed; a packed layout "
        "or a shorter --seq has shorter CTAs and needs fewer"
      ) from e
    jax.effects_barrier()  # the trace is written by a host callback
    (path,) = glob.glob(os.path.join(d, "*-trace.json"))
    with open(path) as fh:
      events = json.load(fh)["traceEvents"]
  return dict(phases(events), layout=args.layout, S=s, N=n, K=kh, H=h, space=space)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seq", type=int, default=16384)
  ap.add_argument("--layout", default="packed2048", help="causal, frameF, packed, or packedL")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv_heads", type=int, default=0, help="K of GQA (default: = --heads)")
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--json", action="store_true", help="print one JSON object instead")
  args = ap.parse_args(argv)
  result = run(args)
  print(json.dumps(result) if args.json else table(result))
  return result


if __name__ == "__main__":
  main()
