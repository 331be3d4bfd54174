"""The Hopper backward at head dims 64 and 128 as one kernel: dK/dV with dQ reduce-added
(`lcv_hopper_bwd`).

FlashAttention-3's backward (arXiv 2407.08608, appendix B): 5 products per tile pair where the
split kernels of `hopper_backward` run 7 (their dQ kernel recomputes S and dP). The CTA is the
dK/dV kernel's: two consumers of 64 keys each, and the producer streaming the query-side tiles
(64 rows) of every head of the GQA group. Per stream position t (a query tile of one head) a
consumer runs, awaiting each group of products before the next,

    S^T = K Q_t^T -> P^T -> dV += P^T dO_t, dP^T = V dO_t^T -> dS^T_t (bf16)
    -> wait until both dS^T_{t-1} are in smem -> put dS^T_t there
    -> issue dK += dS^T_t Q_t and dQ_{t-1}[:, cols] = sum_u dS_{u,t-1} K_u[:, cols], one wait
    -> stage dQ_{t-1}[:, cols] (float32) for the producer

so each consumer forms half of dQ's columns over the CTA's 128 keys (FA3's split: a float32
[64, 64] accumulator, one [64, 128] float32 reduce per (query tile, CTA)). The producer waits
for both staged halves, issues the TMA reduce-adds (`cp.reduce.async.bulk .add`) into a float32
dQ in global memory, waits until they have read the staging buffer and frees it: a consumer
never waits on a store. At H = 128 the producer is one warp (`WARP_PRODUCER_HEAD_DIMS`).

At H = 64 half of a K tile's columns (32 bf16, 64 bytes) is narrower than the tile's 128-byte
swizzle, so dQ is split by positions instead: the consumer of position t - 1's parity forms
its whole [64, 64] tile over the 128 keys (both dS^T tiles and both K tiles, the same
[64, 64] float32 accumulator) and stages it; the other issues only dK at that step. Each
consumer has its own staging buffer and its own `dq_staged` / `dq_free` barriers, so the
producer takes the tiles in position order whichever consumer runs ahead. On an H100 this was
4-7% faster than the split kernels without GQA and 9-14% faster with it (where the split
pair's dK/dV kernel runs its pipelined schedule), with no spills (benchmarks/NOTES.md,
"Sixteenth round"); so `flash_hopper` runs it at H = 64 with any GQA group.

dQ runs one position behind. Formed at its own position (after a barrier on both dS^T tiles)
the kernel was 2-8% slower than the split kernels on an H200; one behind, the barrier is almost
always passed when reached, the consumers need not run in lockstep (one can run its softmax
while the other's products use the tensor cores), and the kernel was 2-5% faster than the split
pair without GQA (benchmarks/NOTES.md, "Thirteenth round"). So `flash_hopper` runs it at H = 128
without GQA; with GQA the split kernels' pipelined dK/dV schedule stays (the single kernel was
level to 5% slower there).

dS^T tiles rotate through three buffers: a consumer writes buffer t % 3 after the other one
arrived with dS^T_{t-1}, which it does after its products of t - 2 (the last reads of buffer
(t - 3) % 3). A consumer without the tile (outside its own range, inside the CTA's) contributes a
zero dS^T and still forms its dQ columns; position -1 is a zero tile, so the first dQ product
adds nothing and the producer skips its reduce.

A position's six query-side copies (q, dO, lse2, delta, lo, hi) complete one barrier, so a
consumer waits once per position. Measured with the on-device profiler (the kernel's named
scopes, `scripts/kernel_phases.py`), six waits took 370-590 cycles of a 2,300-4,100-cycle
position; one takes about 100, and the kernel got 4-7% faster at H = 128 and 5-13% at H = 64 on
an H100 (benchmarks/NOTES.md, "Seventeenth round"). The split dK/dV kernels keep one barrier
per copy: merged, their pipelined schedule was 8% slower.

Mosaic GPU's interpreter has no TMA reductions: there the producer copies each staged tile into
its CTA's slice of a [CTAs, ...] buffer (a CTA visits each query tile of a head at most once) and
the slices are summed outside.
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
  load_keys,
  probabilities_t,
  query_loader,
  query_ring_barriers,
  query_ring_smem,
  stream_position,
  wait_queries,
)
from lcv.kernels.hopper_pipeline import (
  LOG2E,
  ROWS,
  WGS,
  WIDE_REGISTERS,
  Plan,
  cta_ranges,
  drain,
  issue,
  mma,
  one_warp,
  own_column,
  run_range,
  tiled_smem,
  vec,
  zeros,
)

BUFFERS = 3  # dS^T tiles in flight: positions t - 2, t - 1 (read) and t (written)
HEAD_DIMS = (64, 128)  # H = 256: a consumer would hold dK and dV, 256 registers
# At these head dims the producer (its copies, waits, arrivals and dQ reduce-adds) runs as one
# warp (`hopper_pipeline.one_warp`). On H100s at H = 128: +1.6% to +3.4% on causal rows of 4K,
# 16K, 32K and 128K and on frame and packed rows; at 64K +3.1%, -1.0% and -2.6% in three runs.
# At H = 64 -0.9% and -1.4%: there it stays a warpgroup (benchmarks/NOTES.md, "Twenty-second
# round").
WARP_PRODUCER_HEAD_DIMS = (128,)


def dkv_dq(p: Plan, q, k, v, do, lse2, delta, lo, hi, kid, profile: tuple[int, str] = (0, "")):
  """Padded operands (`hopper_backward.operands`) -> (dq float32 [B, T_pad, N, H] unscaled,
  dk, dv [B, S_pad, K, H] in k's dtype, dk scaled). Head dim 64 or 128, any GQA group (dQ split
  between the consumers by column blocks of 64, the 128-byte swizzle of a bf16 K tile, at
  H = 128; by positions at H = 64).

  profile = (ranges per warpgroup, directory): Mosaic GPU's on-device profiler records the
  kernel's named scopes into a trace there (`scripts/kernel_phases.py` reads it); (0, "") off."""
  b, _, n, h = q.shape
  kh, g = k.shape[2], p.groups
  bk, bq, dtype, st = ROWS, ROWS, q.dtype, p.stages
  if h not in HEAD_DIMS:
    raise ValueError(
      f"the fused backward runs at head dims {HEAD_DIMS} ({h=}); H = 256 takes "
      "hopper_backward.dq and hopper_wide_dkv.dkv (Plan.fused_backward picks)"
    )
  # H = 128: each consumer forms half of dQ's columns at every position. H = 64: half a K tile
  # (32 columns, 64 bytes) is narrower than its 128-byte swizzle, so the consumer of the
  # position's parity forms the whole [64, 64] tile (`whole`).
  whole = h == 64
  hc = h if whole else h // WGS
  _, q_range = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = cta_ranges(q_range)
  n_cta = p.s_pad // (bk * WGS)
  c = p.scale * LOG2E
  wgmma = plgpu.Layout.WGMMA
  shape = (bk, bq)

  def kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, kid_ref, *rest):
    dq_ref, dk_ref, dv_ref, scoped = rest
    (k_smem2, v_smem2, kid_smem2, *ring, ds_smem, dq_smem), bars = scoped
    kv_bars, *loaded, q_free, ds_ready, dq_staged, dq_free = bars
    loaded = tuple(loaded)
    q_smem = ring[0]
    bi, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    rng = [rng_ref[bi, tile, i] for i in range(10)]
    c0, c1 = rng[0], rng[1]
    span = c1 - c0
    total = span * g

    def owner(t):
      """The consumer that forms (whole) dQ of position t >= -1: its parity."""
      return lax.rem(t + 2, WGS)

    def handoff(bars, u):
      """dq_staged / dq_free of consumer u: one barrier per consumer when dQ tiles are whole
      (a consumer stages every other position), one for both otherwise."""
      return bars.at[u] if whole else bars

    def consumer(cw: int):
      """Consumer `cw` (static: its dQ columns are a static slice of the K tiles)."""
      plgpu.set_max_registers(WIDE_REGISTERS[0], action="increase")
      # Own tiles through the traced index (wg == cw here): a view with a static index closed
      # over by a wgmma body would enter it as a constant, which Mosaic GPU does not lower.
      k_smem, v_smem, kid_smem = k_smem2.at[wg], v_smem2.at[wg], kid_smem2.at[wg]
      rows = pl.ds(tile * (bk * WGS) + cw * bk, bk)
      with jax.named_scope("keys"):
        gmem, smem = (k_ref, v_ref, kid_ref), (k_smem, v_smem, kid_smem)
        load_keys(gmem, smem, kv_bars, bi, kv_head, rows, cw)
        plgpu.barrier_wait(kv_bars.at[1 - cw])  # the other consumer's K: the dQ products read it
      key = vec(kid_smem, 1, p.interpret)
      w = [rng[own_column(cw, i)] for i in range(4)]
      cols = pl.ds(0 if whole else cw * hc, hc)
      staged, free = handoff(dq_staged, wg), handoff(dq_free, wg)  # traced: see above

      def buffer(t):
        return lax.rem(t + BUFFERS, BUFFERS)  # t >= -1

      def exchange(ds_t, t, first=False):
        """This consumer's dS^T_t into its buffer, for both consumers' dQ products, after both
        dS^T_{t-1} are in (which also frees the buffer of t - 3)."""
        if not first:
          with jax.named_scope("exchange"):
            plgpu.barrier_wait(ds_ready)
        ds_smem.at[buffer(t), cw][...] = ds_t
        plgpu.commit_smem()  # visible to the tensor cores (async proxy)
        plgpu.barrier_arrive(ds_ready)

      def dq_products(dk, ds_t, q_t, t):
        """dK += dS^T_t Q_t (when q_t) and this consumer's columns of dQ_{t-1}, issued together,
        one wait."""
        part = zeros((bq, hc), wgmma, p.interpret)
        src = buffer(t - 1)

        def pairs():  # built inside the wgmma body (static indices: see above)
          return [(ds_smem.at[src, u], k_smem2.at[u, :, cols]) for u in range(WGS)]

        if p.interpret:
          if q_t is not None:
            dk = mma(dk, ds_t, q_t, p.interpret)
          for a, b_ in pairs():
            part = part + jnp.dot(a[...].T.astype(jnp.float32), b_[...].astype(jnp.float32))
          plgpu.barrier_wait(free)
          return dk, part

        def body(refs):
          dq_acc = refs[-1]
          if q_t is not None:
            plgpu.wgmma(refs[0], ds_t, q_t)
          for a, b_ in pairs():
            plgpu.wgmma(dq_acc, plgpu.transpose_ref(a, (1, 0)), b_)
          plgpu.barrier_wait(free)  # the staging buffer has been read by the last reduce

        accs = (part,) if q_t is None else (dk, part)
        outs = pl.run_state(body)(tuple(plgpu.ACC.init(x) for x in accs))
        return (dk, *outs) if q_t is None else outs

      def products(dk, ds_t, q_t, t, release=lambda: None):
        """dK += dS^T_t Q_t (when q_t) and this consumer's part of dQ_{t-1} (if any), issued
        together, one wait; then `release()` and the part staged for the producer."""

        def with_dq(dk):
          dk, part = dq_products(dk, ds_t, q_t, t)
          release()
          dq_smem.at[cw][...] = part
          plgpu.commit_smem()
          plgpu.barrier_arrive(staged)
          return dk

        def without_dq(dk):
          dk = dk if q_t is None else mma(dk, ds_t, q_t, p.interpret)
          release()
          return dk

        return lax.cond(owner(t - 1) == cw, with_dq, without_dq, dk) if whole else with_dq(dk)

      def step(j, carry, mode, gi):
        dk, dv = carry
        t = gi * span + j - c0
        slot = lax.rem(t, st)
        with jax.named_scope("queries"):
          wait_queries(loaded, slot)
        with jax.named_scope(mode):
          return position(t, slot, dk, dv, mode)

      def position(t, slot, dk, dv, mode):
        if mode == "skip":  # the other consumer's tile: a zero dS^T, this consumer's dQ part
          plgpu.barrier_arrive(q_free.at[slot])
          exchange(zeros(shape, wgmma, p.interpret).astype(dtype), t)
          return products(dk, None, None, t), dv
        q_t, do_t = q_smem.at[slot], ring[1].at[slot]
        zero = zeros(shape, wgmma, p.interpret)
        s_t = mma(zero, k_smem, q_t, p.interpret, trans_b=True) * c
        pt = probabilities_t(s_t, key, ring, slot, mode, p.interpret)
        dv, dpt = issue(
          [(dv, pt.astype(dtype), do_t, False), (zero, v_smem, do_t, True)], p.interpret
        )
        ds_t = (pt * (dpt - delta_t(ring, slot, shape, p.interpret))).astype(dtype)
        exchange(ds_t, t)
        dk = products(dk, ds_t, q_t, t, release=lambda: plgpu.barrier_arrive(q_free.at[slot]))
        return dk, dv

      def head_loop(gi, carry):
        return run_range(c0, c1, w, functools.partial(step, gi=gi), carry)

      # Position -1: a zero dS^T, so the first step's dQ product adds nothing.
      exchange(zeros(shape, wgmma, p.interpret).astype(dtype), jnp.int32(-1), first=True)
      acc = zeros((bk, h), wgmma, p.interpret)
      dk, dv = lax.fori_loop(0, g, head_loop, (acc, acc))
      with jax.named_scope("last_dq"):
        plgpu.barrier_wait(ds_ready)  # dQ of the last position
        products(dk, None, None, total)
        plgpu.barrier_arrive(ds_ready)  # after the last dQ product, which read the other's K:
        plgpu.barrier_wait(ds_ready)  # once both are here, each may overwrite its K tile
        plgpu.barrier_wait(free)  # and the producer's last reduce the staging buffer
      with jax.named_scope("store"):
        k_smem[...] = (dk * p.scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, rows, kv_head])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, rows, kv_head])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # smem is read; the kernel may end

    for cw in range(WGS):
      pl.when(wg == cw)(functools.partial(consumer, cw))

    def produce():
      """The producer: the query-side stream in, staged dQ reduce-added out."""
      for u in range(WGS if whole else 1):
        plgpu.barrier_arrive(handoff(dq_free, u))  # the staging buffers start free
      gmem = (q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref)
      load = query_loader(gmem, ring, loaded, bi, kv_head, g, c0, span, bq)

      def reduce(t):
        """The staged dQ of position t (both column halves, or the owner's whole tile; none
        for t = -1) into global memory."""
        u = owner(t)
        with jax.named_scope("staged"):
          plgpu.barrier_wait(handoff(dq_staged, u))

        @pl.when(t >= 0)
        def _():
          j, head = stream_position(t, kv_head, g, c0, span)
          q_rows = pl.ds(j * bq, bq)
          parts = [(u, pl.ds(0, h))] if whole else [(i, pl.ds(i * hc, hc)) for i in range(WGS)]
          for src, cols in parts:
            if p.interpret:
              plgpu.copy_smem_to_gmem(dq_smem.at[src], dq_ref.at[tile, bi, q_rows, head, cols])
            else:
              dst = dq_ref.at[bi, q_rows, head, cols]
              plgpu.copy_smem_to_gmem(dq_smem.at[src], dst, reduction_op="add")

        with jax.named_scope("read"):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(handoff(dq_free, u))

      for i in range(st):

        @pl.when(i < total)
        def _(i=i):
          load(i, i)

      @pl.loop(0, total)
      def _(t):
        slot = lax.rem(t, st)

        @pl.when(t + st < total)
        @jax.named_scope("free")
        def _():
          plgpu.barrier_wait(q_free.at[slot])
          load(t + st, slot)

        reduce(t - 1)

      reduce(total - 1)
      drain(jnp.int32(0), total, st, (q_free,))

    @pl.when(wg == WGS)
    def _producer():
      plgpu.set_max_registers(WIDE_REGISTERS[1], action="decrease")
      one_warp(p, produce, WARP_PRODUCER_HEAD_DIMS)

  def entry(*refs):
    smem = (
      tiled_smem((WGS, bk, h), dtype),
      tiled_smem((WGS, bk, h), dtype),
      plgpu.SMEM((WGS, bk), jnp.int32),
      *query_ring_smem(st, bq, h, dtype),
      tiled_smem((BUFFERS, WGS, bk, bq), dtype),  # dS^T by position (mod 3) and consumer
      tiled_smem((WGS, bq, hc), jnp.float32),  # dQ column halves, staged for the reduce-add
    )
    bars = (
      plgpu.Barrier(num_barriers=3 * WGS),
      *query_ring_barriers(st, merged=True),
      plgpu.Barrier(num_arrivals=WGS, num_barriers=st),  # q_free
      plgpu.Barrier(num_arrivals=WGS),  # ds_ready: both dS^T of a position are in smem
      # dq_staged: a position's dQ is staged (both halves; whole: one barrier per owner)
      plgpu.Barrier(num_arrivals=1, num_barriers=WGS) if whole else plgpu.Barrier(num_arrivals=WGS),
      # dq_free: the producer's reduce has read the staging buffer (whole: one per owner)
      plgpu.Barrier(num_arrivals=1, num_barriers=WGS if whole else 1),
    )
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, collective_axes="wg")

  kv = jax.ShapeDtypeStruct(k.shape, dtype)
  parts = (n_cta,) if p.interpret else ()
  mesh = plgpu.Mesh(
    grid=(kh, n_cta, b),
    grid_names=("heads", "kv_seq", "batch"),
    num_threads=WGS + 1,
    thread_name="wg",
    kernel_name="lcv_hopper_bwd",
  )
  launch = pl.kernel(
    entry,
    out_type=(kv, kv),
    mesh=mesh,
    compiler_params=plgpu.CompilerParams(
      approx_math=True, profile_space=profile[0], profile_dir=profile[1]
    ),
    interpret=p.interpret or False,
    name="lcv_hopper_bwd",
  )

  @jax.jit  # a Ref in a memory space exists only under jit
  def call(*args):
    dq = jax.new_ref(jnp.zeros((*parts, *q.shape), jnp.float32), memory_space=plgpu.GMEM)
    dk, dv = launch(*args, dq)
    dq = dq[...]
    return (dq.sum(0) if p.interpret else dq), dk, dv

  return call(ranges, q, k, v, do, lse2, delta, lo, hi, kid)
