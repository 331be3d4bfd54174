"""The Hopper dK/dV kernel for head dim 256 (`lcv_hopper_dkv_wide`): one consumer per gradient.

The dK/dV kernel of `hopper_backward` gives each of its two consumer warpgroups 64 key rows and
both accumulators. At H = 256 that is dK and dV, [64, 256] float32 each: 256 registers per thread,
more than a thread can have. So here the two consumers share the CTA's 64 key rows and split the
work by gradient, each holding one [64, 256] accumulator (128 registers); the pipeline is
FlashAttention-3's (arXiv 2407.08608, section 3; `hopper_pipeline`):

- consumer 0 (dV): S^T_t = K Q_t^T -> P^T = exp2(S^T - lse), written to shared memory (float16)
  -> dV += P^T dO_t;
- consumer 1 (dK): dP^T_t = V dO_t^T, issued before it waits for that P^T -> dS^T = P^T (dP^T -
  delta) -> dK += dS^T Q_t.

So a tile pair costs 4 products, 7 with the dQ kernel's 3, as at H <= 128, and the consumers carry
two products each. On an H200 handing P^T over made the kernel 1.1-1.6x faster than forming S^T
in both consumers (5 products); the gain without GQA (1.6x) is larger than the product count
explains, reason not known (benchmarks/NOTES.md, "Ninth round"). At H = 128 the same kernel was
13-57% slower than `hopper_backward.dkv` (64 keys per CTA stream the query side twice as often;
"Tenth round"), so it runs only at 256.

Shared memory holds K and V [64, 256] (64 KB), a 2-stage query-side ring (q and dO, 128 KB) and
P^T per stage (16 KB): 64 keys per CTA, half of `hopper_backward.dkv`'s. The producer (one warp:
`WARP_PRODUCER_HEAD_DIMS`) copies K, V and the key indices once, then streams the ring like
`hopper_backward.dkv` (every head of the GQA group in turn); a stage, P^T's slot with it, is
freed when both consumers have read it. At the end each consumer writes its gradient through the
smem of K or V, which the other may still be reading, so they meet at a barrier first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcv.kernels import flash_gpu
from lcv.kernels.hopper_backward import (
  delta_t,
  probabilities_t,
  produce_queries,
  query_ring_barriers,
  query_ring_smem,
  wait_queries,
)
from lcv.kernels.hopper_pipeline import (
  LOG2E,
  ROWS,
  WGS,
  WIDE_REGISTERS,
  Plan,
  cta_ranges,
  launch,
  mma,
  one_warp,
  run_range,
  tiled_smem,
  vec,
  zeros,
)

# The producer runs as one warp (`hopper_pipeline.one_warp`): +2.8% and +3.2% at 16K causal on
# H100s, bitwise equal, no spills (benchmarks/NOTES.md, "Twenty-second round").
WARP_PRODUCER_HEAD_DIMS = (256,)

# P^T goes from the dV consumer to the dK one in float16 (10 mantissa bits against bf16's 7, for
# P in [0, 1]); a float32 tile would overflow shared memory by 160 bytes. Measured on an H200
# (bf16 inputs, 4K-16K): dK is 1.8e-3 from the portable kernel's (float32 P), where a bf16 P^T gave
# 3.5e-3, and 2.71e-3 from the float32 reference against the portable kernel's 2.69e-3.
P_DTYPE = jnp.float16


def dkv(p: Plan, q, k, v, do, lse2, delta, lo, hi, kid):
  """Padded operands (`hopper_backward.operands`) -> (dk, dv) [B, S_pad, K, H] in k's dtype,
  summed over the GQA group (dk scaled). Any head dim; made for H = 256."""
  b, _, n, h = q.shape
  kh, g = k.shape[2], p.groups
  bk, bq, st, dtype = ROWS, ROWS, p.stages, q.dtype
  _, q_range = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = cta_ranges(q_range, 1)  # one range per CTA, both consumers walk all of it
  n_cta = p.s_pad // bk
  c = p.scale * LOG2E
  shape, layout, interpret = (bk, bq), plgpu.Layout.WGMMA, p.interpret

  def kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, kid_ref, *rest):
    dk_ref, dv_ref, scoped = rest
    smem, bars = scoped
    k_smem, v_smem, ring, kid_smem = smem[0], smem[1], smem[2:6], smem[6]
    kv_bars, loaded, q_free, done, p_ready = bars[0], bars[1:7], bars[7], bars[8], bars[9]
    p_smem = smem[7]
    q_smem, do_smem = ring[0], ring[1]
    bi, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    c0, c1, *w = (rng_ref[bi, tile, i] for i in range(6))
    span = c1 - c0  # query tiles per head of the group: the stream holds g * span stages
    rows = pl.ds(tile * bk, bk)

    def consumer(step, out_smem, out_ref, scale):
      """A consumer's loops over the group's heads and the CTA's query tiles, then its gradient
      (times `scale`) out through `out_smem`. step(slot, acc, mode) -> acc."""
      plgpu.set_max_registers(WIDE_REGISTERS[0], action="increase")
      for i in range(3):
        plgpu.barrier_wait(kv_bars.at[i])
      key = vec(kid_smem, 1, interpret)

      def tile_step(j, acc, mode, gi):
        slot = lax.rem(gi * span + j - c0, st)
        wait_queries(loaded, slot)
        if mode != "skip":
          acc = step(slot, acc, mode, key)
        plgpu.barrier_arrive(q_free.at[slot])
        return acc

      def head_loop(gi, acc):
        return run_range(c0, c1, w, functools.partial(tile_step, gi=gi), acc)

      acc = lax.fori_loop(0, g, head_loop, zeros((bk, h), layout, interpret))
      plgpu.barrier_arrive(done.at[0])  # this consumer no longer reads K or V
      plgpu.barrier_wait(done.at[0])
      out_smem[...] = (acc * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_ref.at[bi, rows, kv_head])
      plgpu.wait_smem_to_gmem(0)

    def dv_step(slot, dv, mode, key):
      s_t = mma(zeros(shape, layout, interpret), k_smem, q_smem.at[slot], interpret, trans_b=True)
      pt = probabilities_t(s_t * c, key, ring, slot, mode, interpret)
      p_smem.at[slot][...] = pt.astype(P_DTYPE)  # for the dK consumer's dS^T
      plgpu.barrier_arrive(p_ready.at[slot])
      return mma(dv, pt.astype(dtype), do_smem.at[slot], interpret)

    def dk_step(slot, dk, mode, key):
      del mode, key  # the mask is in P^T
      q_t, do_t, zero = q_smem.at[slot], do_smem.at[slot], zeros(shape, layout, interpret)

      def d_s(dp_t):
        """dS^T = P^T (dP^T - delta), P^T from the dV consumer (awaited here)."""
        plgpu.barrier_wait(p_ready.at[slot])
        pt = p_smem.at[slot][...] if interpret else plgpu.load(p_smem.at[slot], (), layout=layout)
        return (pt.astype(jnp.float32) * (dp_t - delta_t(ring, slot, shape, interpret))).astype(
          dtype
        )

      if interpret:  # the same products as plain float32 dots
        return mma(dk, d_s(mma(zero, v_smem, do_t, interpret, trans_b=True)), q_t, interpret)

      def body(refs):
        dp_ref, dk_ref = refs
        plgpu.wgmma(dp_ref, v_smem, plgpu.transpose_ref(do_t, (1, 0)))
        # dP^T, issued first, runs on the tensor cores while the dV consumer forms P^T.
        plgpu.wgmma(dk_ref, d_s(plgpu.wgmma_accumulator_load(dp_ref, wait_n=0)), q_t)

      return pl.run_state(body)(tuple(plgpu.ACC.init(x) for x in (zero, dk)))[1]

    @pl.when(wg == 0)
    def _dv():
      consumer(dv_step, v_smem, dv_ref, 1.0)

    @pl.when(wg == 1)
    def _dk():
      consumer(dk_step, k_smem, dk_ref, p.scale)

    def produce():  # K, V and the key indices once, then the query-side stream
      srcs = (k_ref.at[bi, rows, kv_head], v_ref.at[bi, rows, kv_head], kid_ref.at[bi, rows])
      for i, (src, dst) in enumerate(zip(srcs, (k_smem, v_smem, kid_smem))):
        plgpu.copy_gmem_to_smem(src, dst, kv_bars.at[i])
      gmem = (q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref)
      produce_queries(gmem, ring, loaded, (q_free,), bi, kv_head, g, c0, span, bq, st)

    @pl.when(wg == WGS)
    def _producer():
      plgpu.set_max_registers(WIDE_REGISTERS[1], action="decrease")
      one_warp(p, produce, WARP_PRODUCER_HEAD_DIMS)

  def entry(*refs):
    smem = (
      tiled_smem((bk, h), dtype),
      tiled_smem((bk, h), dtype),
      *query_ring_smem(st, bq, h, dtype),
      plgpu.SMEM((bk,), jnp.int32),
      tiled_smem((st, bk, bq), P_DTYPE),  # P^T, one tile per stage
    )
    bars = (
      plgpu.Barrier(num_barriers=3),
      *query_ring_barriers(st),
      plgpu.Barrier(num_arrivals=WGS, num_barriers=st),
      plgpu.Barrier(num_arrivals=WGS, num_barriers=1),
      plgpu.Barrier(num_barriers=st),  # P^T of a stage is in smem
    )
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, collective_axes="wg")

  kv = jax.ShapeDtypeStruct(k.shape, dtype)
  args = (ranges, q, k, v, do, lse2, delta, lo, hi, kid)
  return launch(entry, "lcv_hopper_dkv_wide", (kv, kv), (kh, n_cta, b), "kv_seq", p)(*args)
