"""The Hopper attention forward kernel (`lcv_hopper_fwd`): FlashAttention-3's ping-pong schedule.

FlashAttention-3 (arXiv 2407.08608, section 3): a CTA holds 128 query rows as two consumer
warpgroups of 64 rows (192 rows, three consumers, at H = 64: `Plan.fwd_consumers`); the
producer warpgroup streams the CTA's key tiles (K, their global indices, V) through a ring of two
shared-memory stages (`hopper_pipeline`). The consumers take turns on the tensor cores (the
"ping-pong" of section 3.1) through one one-way barrier each: a consumer hands the tensor cores
over to the next one right after issuing its products and waits for its own turn before the next
issue, so one warpgroup's softmax overlaps the others' matmuls.

At H = 64 a tile's two products take half as long as at 128 and its softmax as long, so with two
consumers the tensor cores wait for the softmax; a third consumer (FA3's tile at that head dim,
160 registers per consumer thread) made the forward 8-15% faster on an H200, 1.04-1.11x cuDNN
(benchmarks/NOTES.md, "Twelfth round"). Two other ways to unload the softmax there were slower:
a share of each tile's exp2 as a polynomial on the FMA units (FlashAttention-4's trick; 2-15%
slower, the more columns the slower) and deeper K/V rings (3-5%).

Within a turn, a consumer issues PV of tile j - 1 and QK^T of tile j back to back and awaits
them together, so the tensor cores get both products of the turn without a wait-and-reissue
gap between them (P and V of tile j - 1 stay live one tile longer; `run_range_carried`). The
softmax scale (with log2 e) multiplies the row max and enters exp2's argument as one fused
multiply-add, s * c - m, instead of a separate pass s * c over the tile (scale > 0 only). A K
tile and its key indices land on one barrier (two copies, one wait per tile), and the epilogue
waits only for its stores' reads of smem. Only this combination paid on an H200
(benchmarks/NOTES.md, "Forward schedules"): on causal rows +6-7% over a two-party rendezvous
barrier and 0.98-1.02x tokamax; FA3's intra-warpgroup overlap (section 3.2) was 25% slower
(register pressure).

lcv's intervals (DESIGN.md section 2): the producer loads only the CTA's key-tile range; each
consumer masks its boundary tiles elementwise, runs its full tiles without mask arithmetic (the
first one too: a causal row's tile 0), and steps over the CTA's tiles outside its own range with
the same barrier traffic but no math. A consumer's Q tile and its rows' intervals land on one
barrier. These last two measured level on H100s (-3% to +2.4% over causal, frame and packed
rows; benchmarks/NOTES.md, "Twentieth round") and are kept as the leaner CTA start.

Each warpgroup reads its values of the CTA's tile range after `setmaxnreg` (which waits for
outstanding loads), a consumer only its own four; up to H = 128 the producer's copies and waits
run in one warp (`WARP_PRODUCER_HEAD_DIMS`; +1% on causal rows at H = 128, "Twenty-first round").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcv.kernels import flash_gpu
from lcv.kernels.hopper_pipeline import (
  CONSUMER_REGISTERS,
  LN2,
  LOG2E,
  PRODUCER_REGISTERS,
  ROWS,
  TRIO_REGISTERS,
  WGS,
  Plan,
  bcast,
  copy_kv,
  cta_ranges,
  drain,
  launch,
  mma,
  one_warp,
  own_column,
  run_range_carried,
  tiled_smem,
  vec,
  zeros,
)

# At these head dims the producer issues its copies and waits as one warp (`one_warp`), as
# tokamax's does. On H100s +0.2% to +2.3% at H = 128 in 12 of 13 rows over two runs (one row
# -1.0%), +2.0% / -1.4% at H = 64. At H = 256 ptxas then spills (4 bytes stored, 12 loaded) and
# the forward ran 13-16% slower: there the producer stays a warpgroup (benchmarks/NOTES.md,
# "Twenty-first round").
WARP_PRODUCER_HEAD_DIMS = (64, 128)


def forward(p: Plan, q, k, v, lo, hi, kid):
  """Padded operands -> (o [B, T_pad, N, H] in q's dtype, lse float32[B, N, T_pad]).

  q [B, T_pad, N, H], k, v [B, S_pad, K, H] (bf16 / fp16), lo, hi int32[B, T_pad], kid
  int32[B, S_pad] (`hopper_pipeline.prepare`).
  """
  b, _, n, h = q.shape
  bq, bk, st, dtype = ROWS, p.bk, p.stages, q.dtype
  k_range, _ = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  wgs = p.fwd_consumers
  registers = (CONSUMER_REGISTERS, PRODUCER_REGISTERS) if wgs == WGS else TRIO_REGISTERS
  ranges = cta_ranges(k_range, wgs)
  n_cta = p.t_pad // (bq * wgs)
  c = p.scale * LOG2E

  def kernel(rng_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref, scoped):
    (q_smem2, k_smem, v_smem, kid_smem, lo_smem2, hi_smem2, lse_smem2), bars = scoped
    q_bars, k_bars, v_bars, k_free, v_free, sched = bars
    bi = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = n_cta - 1 - lax.axis_index("q_seq")  # longest (causal) rows first: a shorter tail
    wg = lax.axis_index("wg")

    def cta_range():  # read after `setmaxnreg`, which waits for outstanding loads
      return rng_ref[bi, tile, 0], rng_ref[bi, tile, 1]

    def hand_over():  # the next consumer's turn may begin ...
      plgpu.barrier_arrive(sched.at[lax.rem(wg + 1, wgs)])

    def take_turn():  # ... and this one waits for its own
      plgpu.barrier_wait(sched.at[wg])

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(registers[0], action="increase")
      q_smem, lo_smem, hi_smem, lse_smem = (
        q_smem2.at[wg],
        lo_smem2.at[wg],
        hi_smem2.at[wg],
        lse_smem2.at[wg],
      )
      row0 = tile * (bq * wgs) + wg * bq
      rows = pl.ds(row0, bq)  # Q and its intervals: one barrier, three arrivals
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_smem, q_bars.at[wg])
      plgpu.copy_gmem_to_smem(lo_ref.at[bi, rows], lo_smem, q_bars.at[wg])
      plgpu.copy_gmem_to_smem(hi_ref.at[bi, rows], hi_smem, q_bars.at[wg])
      c0, c1 = cta_range()
      w = [rng_ref[bi, tile, own_column(wg, i)] for i in range(4)]  # its own range only
      plgpu.barrier_wait(q_bars.at[wg])
      row_lo, row_hi = vec(lo_smem, 1, p.interpret), vec(hi_smem, 1, p.interpret)

      wgmma = plgpu.Layout.WGMMA
      row = wgmma.reduce(1)
      acc = zeros((bq, h), wgmma, p.interpret)
      m = zeros((bq,), row, p.interpret, -jnp.inf)
      l = zeros((bq,), row, p.interpret)

      def wait_k(j):  # K and its key indices: one barrier, two arrivals
        plgpu.barrier_wait(k_bars.at[lax.rem(j - c0, st)])

      def prefetch_wait(j):
        @pl.when(j + 1 < c1)
        def _():
          wait_k(j + 1)

      @pl.when(c1 > c0)
      def _():
        wait_k(c0)

      def masked(s, slot, mode):
        """Logits outside the rows' intervals -> -inf; then K's slot is free."""
        if mode == "mask":
          key = bcast(vec(kid_smem.at[slot], 0, p.interpret), (bq, bk), 1)
          ok = (bcast(row_lo, (bq, bk), 0) <= key) & (key <= bcast(row_hi, (bq, bk), 0))
          s = jnp.where(ok, s, -jnp.inf)
        plgpu.barrier_arrive(k_free.at[slot])
        return s

      def softmax(s, m, l, mode):
        """Online softmax of one tile in base 2 -> (m, l, alpha, P in the input dtype).

        s: the product QK^T, masked; raw where the scale is folded into exp2's argument, else
        already times c. The caller rescales the accumulator by alpha.
        """
        if p.fold_scale:
          m_new = jnp.maximum(m, s.max(axis=1) * c)
        else:
          m_new = jnp.maximum(m, s.max(axis=1))
        if mode == "mask":  # a row with no key so far keeps m = -inf; exp2(-inf - 0) = 0
          m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
          m_use = m_new
        alpha = jnp.exp2(m - m_use)
        if p.fold_scale:
          pr = jnp.exp2(s * c - bcast(m_use, s.shape, 0))
        else:
          pr = jnp.exp2(s - bcast(m_use, s.shape, 0))
        l = l * alpha + pr.sum(axis=1)
        return m_new, l, alpha, pr.astype(dtype)

      def scaled(s):
        return s if p.fold_scale else s * c

      def step(j, carry, own, pending, mode):
        """One key tile: in one turn, PV of the previous tile (`pending`: it was this
        consumer's) and QK^T of this one (`own`); its PV goes with the next turn."""
        acc, m, l, p_prev = carry
        slot, prev = lax.rem(j - c0, st), lax.rem(j - 1 - c0 + st, st)  # prev: when pending
        if pending:
          plgpu.barrier_wait(v_bars.at[prev])
        take_turn()

        def issued():
          hand_over()
          prefetch_wait(j)

        if own:
          s, acc = _qk_pv(
            p, q_smem, k_smem.at[slot], acc, p_prev if pending else None, v_smem.at[prev], issued
          )
          m, l, alpha, p_new = softmax(masked(scaled(s), slot, mode), m, l, mode)
          acc = acc * bcast(alpha, acc.shape, 0)
          p_prev = p_new
        elif pending:
          acc = mma(acc, p_prev, v_smem.at[prev], p.interpret, issued)
        else:
          issued()
        if pending:
          plgpu.barrier_arrive(v_free.at[prev])
        if not own:
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_wait(v_bars.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
        return lax.optimization_barrier((acc, m, l, p_prev))

      def final_turn(_, carry, pending):
        """The turn after the last tile: PV of that tile when it was this consumer's."""
        acc, m, l, p_prev = carry
        last = lax.rem(c1 - 1 - c0, st)
        if pending:
          plgpu.barrier_wait(v_bars.at[last])
        take_turn()
        if pending:
          acc = mma(acc, p_prev, v_smem.at[last], p.interpret, hand_over)
          plgpu.barrier_arrive(v_free.at[last])
        else:
          hand_over()
        return acc, m, l, p_prev

      pl.when(wg == wgs - 1)(hand_over)  # consumer 0 takes the first turn
      p16 = zeros((bq, bk), wgmma, p.interpret).astype(dtype)
      carry = run_range_carried(c0, c1, w, step, (acc, m, l, p16), first_full=True)
      fin = ((w[0] < w[3]) & (w[3] == c1)).astype(jnp.int32)
      carry = lax.fori_loop(0, fin, functools.partial(final_turn, pending=True), carry)
      carry = lax.fori_loop(fin, 1, functools.partial(final_turn, pending=False), carry)
      acc, m, l, _ = carry
      pl.when(wg == 0)(take_turn)  # the last consumer's last hand-over

      some = l > 0.0
      inv = jnp.where(some, 1.0 / jnp.where(some, l, 1.0), 0.0)
      q_smem[...] = (acc * bcast(inv, acc.shape, 0)).astype(dtype)
      lse_smem[...] = jnp.where(some, (m + jnp.log2(jnp.where(some, l, 1.0))) * LN2, -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(row0, bq), head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, pl.ds(row0, bq)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # smem is read; the kernel may end

    @pl.when(wg == wgs)
    def _producer():
      kv = ((k_ref, k_smem, k_bars), (kid_ref, kid_smem, k_bars), (v_ref, v_smem, v_bars))
      kv_head = lax.div(head, jnp.int32(p.groups))
      plgpu.set_max_registers(registers[1], action="decrease")
      c0, c1 = cta_range()
      one_warp(
        p,
        lambda: _produce_kv_split(bi, kv_head, bk, c0, c1, st, kv, (k_free, v_free)),
        WARP_PRODUCER_HEAD_DIMS,
      )

  def entry(rng_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref):
    smem = (
      tiled_smem((wgs, bq, h), dtype),
      tiled_smem((st, bk, h), dtype),
      tiled_smem((st, bk, h), dtype),
      plgpu.SMEM((st, bk), jnp.int32),
      plgpu.SMEM((wgs, bq), jnp.int32),
      plgpu.SMEM((wgs, bq), jnp.int32),
      plgpu.SMEM((wgs, bq), jnp.float32),
    )
    bars = (
      plgpu.Barrier(num_arrivals=3, num_barriers=wgs),  # Q and its intervals
      plgpu.Barrier(num_arrivals=2, num_barriers=st),  # K and its key indices
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=st),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=st),
      plgpu.Barrier(num_barriers=wgs),  # turns: one one-way barrier per consumer
    )
    pl.run_scoped(
      lambda *scoped: kernel(
        rng_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref, scoped
      ),
      smem,
      bars,
      collective_axes="wg",
    )

  return launch(
    entry,
    "lcv_hopper_fwd",
    (
      jax.ShapeDtypeStruct(q.shape, dtype),
      jax.ShapeDtypeStruct((b, n, p.t_pad), jnp.float32),
    ),
    (n, n_cta, b),
    "q_seq",
    p,
    wgs,
  )(ranges, q, k, v, lo, hi, kid)


def _qk_pv(p: Plan, q_smem, k_smem, acc, p_prev, v_smem, issued):
  """One turn's products: S = Q K^T (and acc += p_prev V when p_prev is given) issued back to
  back and awaited together; `issued` runs once both are on the tensor cores. -> (S, acc)."""
  bq, bk = q_smem.shape[0], k_smem.shape[0]
  zero = zeros((bq, bk), plgpu.Layout.WGMMA, p.interpret)
  if p.interpret:
    s = mma(zero, q_smem, k_smem, p.interpret, trans_b=True)
    if p_prev is not None:
      acc = mma(acc, p_prev, v_smem, p.interpret)
    issued()
    return s, acc
  k_t = plgpu.transpose_ref(k_smem, (1, 0))

  def body(refs):
    acc_ref, s_ref = refs
    if p_prev is not None:
      plgpu.wgmma(acc_ref, p_prev, v_smem)
    plgpu.wgmma(s_ref, q_smem, k_t)
    issued()

  acc, s = pl.run_state(body)((plgpu.ACC.init(acc), plgpu.ACC.init(zero)))
  return s, acc


def _produce_kv_split(bi, kv_head, bk, c0, c1, stages, kv, free_bars):
  """The forward's producer: it waits for a stage's K slot and V slot separately.

  The consumers free V of tile j only in the turn of tile j + 1, after they have waited for K of
  tile j + 1: that K must not wait for the V slot too.
  """
  k_free, v_free = free_bars
  for i in range(stages):

    @pl.when(c0 + i < c1)
    def _(i=i):
      copy_kv(bi, kv_head, bk, c0 + i, i, kv)

  @pl.loop(c0 + stages, jnp.maximum(c1, c0 + stages))
  def _(j):
    slot = lax.rem(j - c0, stages)
    plgpu.barrier_wait(k_free.at[slot])
    copy_kv(bi, kv_head, bk, j, slot, kv[:2])  # K and its key indices
    plgpu.barrier_wait(v_free.at[slot])
    copy_kv(bi, kv_head, bk, j, slot, kv[2:])

  drain(c0, c1, stages, free_bars)
