"""The Hopper attention backward: a dQ kernel (`lcv_hopper_dq`) and a dK/dV kernel
(`lcv_hopper_dkv`).

FlashAttention-2's split of the backward (arXiv 2307.08691, Alg. 2; as in `flash_gpu`) on
FlashAttention-3's warp-specialized pipeline (arXiv 2407.08608, section 3; `hopper_pipeline`):
- dQ: a CTA holds 128 query rows (two consumer warpgroups of 64; one warpgroup at H = 256,
  `Plan.dq_consumers`); the producer streams the K, key index and V tiles of the CTA's key-tile
  range. Per tile a consumer issues S = Q K^T and dP = dO V^T back to back, waits for S alone and
  forms P = exp2(S - lse) while dP is still on the tensor cores (FA3's intra-warpgroup overlap,
  section 3.2), then dS and dQ += dS K.
  Measured on an H200 with the register split below: 4-5% faster than one wait for both
  products at 232 registers (each change alone: 0-3%).
- dK/dV: a CTA holds 128 key rows (two consumers of 64); the producer streams query-side tiles
  (q, dO, lse, delta, lo, hi) of the CTA's query-tile range, for every head of the GQA group in
  turn, so dK and dV are summed over the group in float32 registers. That query-side ring
  (`query_ring_smem`, `query_loader`, `produce_queries`, `wait_queries`, `probabilities_t`,
  `delta_t`) is shared with the H = 256 dK/dV kernel, `hopper_wide_dkv`, and the fused backward,
  `hopper_fused_backward`.

Both recompute S and P (7 products per tile pair). At H = 64, and at H = 128 without GQA, the
backward runs as one kernel instead (`hopper_fused_backward`, FA3's appendix B, 5 products,
`Plan.fused_backward`), so these two run at H = 128 with GQA and at H = 256 (whose dK/dV
kernel is `hopper_wide_dkv`).

The dK/dV schedule is software-pipelined inside a consumer: per query tile t it runs

    S^T_t = K Q_t^T -> P^T = exp2(S^T - lse) -> dV += P^T dO_t, dP^T = V dO_t^T
    -> dS^T_t = P^T (dP^T - delta) -> dK += dS^T_t Q_t

and issues dK += dS^T_{t-1} Q_{t-1} of the previous query tile together with S^T_t of this one,
with one wait for both: two waits per step instead of three, every issue carrying two products.
Q_{t-1} stays in its stage one step longer, so the query-side ring is one stage deeper (3).
Measured on an H200 under GQA, where a CTA streams the tiles of every head of its group:
4.5-7.5% faster than three waits per step; FA3's ping-pong between the consumers on top of it,
and products regrouped by operand, were slower (benchmarks/NOTES.md, "dK/dV schedules"). (A
serial schedule, one wait per step's products on 2 stages, was 8-17% faster without GQA; the
fused kernel, which has that schedule, runs there now.)

Each kernel takes the register split measured faster for it (`hopper_pipeline`): 240 / 24 per
consumer / producer thread for dQ, 232 / 40 for the pipelined dK/dV schedule, 256 / 24 for the
dQ kernel's single consumer at H = 256 (a CTA of 2 x 128 threads has room). With 240 registers
the pipelined schedule with S^T and dP^T issued together and P^T formed while dP^T runs was
12-25% slower (H200, "Eighth round" in benchmarks/NOTES.md).

Registers per consumer thread of the pipelined schedule at H = 128: dK and dV [64, H] float32
(64 each), dS^T of the previous tile in bf16 (16) and S^T [64, 64] float32 (32) at the first
issue, dP^T (32) and P^T in float32 (32) and bf16 (16) at the second; the peak is 208. Query
tiles of 128 rows would not fit: S^T and dP^T [64, 128] float32 would take 64 registers each.

delta = rowsum(dO * O) - dlse and lse2, the base-2 lse with +inf on empty rows (so P = 0
there), come from `operands`, as in `flash_gpu`.
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
  LOG2E,
  PRODUCER_REGISTERS,
  ROWS,
  SOLO_REGISTERS,
  WGS,
  WIDE_REGISTERS,
  Plan,
  bcast,
  cta_ranges,
  issue,
  launch,
  mma,
  own_range,
  prepare,
  produce,
  produce_kv,
  run_range,
  run_range_carried,
  tiled_smem,
  vec,
  zeros,
)


def operands(p: Plan, q, k, v, o, lse, do, q_lo, q_hi, k_idx, dlse=None):
  """The padded operands (q, k, v, do, lse2, delta, lo, hi, kid) of `dq` and `dkv`."""
  delta = flash_gpu._delta(o, do, dlse)
  qp, kp, vp, lo, hi, kid = prepare(p, q, k, v, q_lo, q_hi, k_idx)
  pad = flash_gpu._pad_axis
  dop = pad(do.astype(q.dtype), 1, p.t_pad)
  lse2 = flash_gpu._lse2(pad(lse.astype(jnp.float32), 2, p.t_pad, -jnp.inf))
  return qp, kp, vp, dop, lse2, pad(delta, 2, p.t_pad), lo, hi, kid


def dq(p: Plan, q, k, v, do, lse2, delta, lo, hi, kid):
  """Padded operands (`operands`) -> dq [B, T_pad, N, H] in q's dtype (scaled)."""
  b, _, n, h = q.shape
  bq, bk, st, dtype = ROWS, p.bk, p.stages, q.dtype
  wgs = p.dq_consumers
  registers = WIDE_REGISTERS if wgs == WGS else SOLO_REGISTERS
  k_range, _ = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = cta_ranges(k_range, wgs)
  n_cta = p.t_pad // (bq * wgs)
  c = p.scale * LOG2E

  def kernel(
    rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, kid_ref, dq_ref, scoped
  ):
    (q_smem2, do_smem2, f_smem, i_smem, k_smem, v_smem, kid_smem), bars = scoped
    row_bars, k_bars, v_bars, kid_bars, k_free, v_free = bars
    bi, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = n_cta - 1 - lax.axis_index("q_seq")  # longest (causal) rows first: a shorter tail
    wg = lax.axis_index("wg")
    rng = [rng_ref[bi, tile, i] for i in range(2 + 4 * wgs)]
    c0, c1 = rng[0], rng[1]

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(registers[0], action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      lse_smem, dl_smem, lo_smem, hi_smem = (
        f_smem.at[0, wg],
        f_smem.at[1, wg],
        i_smem.at[0, wg],
        i_smem.at[1, wg],
      )
      row0 = tile * (bq * wgs) + wg * bq
      rows = pl.ds(row0, bq)
      srcs = (
        (q_ref.at[bi, rows, head], q_smem),
        (do_ref.at[bi, rows, head], do_smem),
        (lse_ref.at[bi, head, rows], lse_smem),
        (dl_ref.at[bi, head, rows], dl_smem),
        (lo_ref.at[bi, rows], lo_smem),
        (hi_ref.at[bi, rows], hi_smem),
      )
      for i, (src, dst) in enumerate(srcs):
        plgpu.copy_gmem_to_smem(src, dst, row_bars.at[i * wgs + wg])
      for i in range(len(srcs)):
        plgpu.barrier_wait(row_bars.at[i * wgs + wg])
      lse_r, dl_r = vec(lse_smem, 1, p.interpret), vec(dl_smem, 1, p.interpret)
      row_lo, row_hi = vec(lo_smem, 1, p.interpret), vec(hi_smem, 1, p.interpret)
      w = own_range(rng, wg, wgs)
      dq = zeros((bq, h), plgpu.Layout.WGMMA, p.interpret)
      shape = (bq, bk)

      def step(j, dq, mode):
        slot = lax.rem(j - c0, st)
        for bar in (k_bars, kid_bars, v_bars):
          plgpu.barrier_wait(bar.at[slot])
        if mode == "skip":
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
          return dq
        k_t, v_t = k_smem.at[slot], v_smem.at[slot]
        zero = zeros(shape, plgpu.Layout.WGMMA, p.interpret)

        def probs(s):
          s = s * c
          if mode == "mask":
            key = bcast(vec(kid_smem.at[slot], 0, p.interpret), shape, 1)
            ok = (bcast(row_lo, shape, 0) <= key) & (key <= bcast(row_hi, shape, 0))
            s = jnp.where(ok, s, -jnp.inf)
          return jnp.exp2(s - bcast(lse_r, shape, 0))

        def d_s(pr, dp):
          return (pr * (dp - bcast(dl_r, shape, 0))).astype(dtype)

        if p.interpret:  # the same products as plain float32 dots
          s, dp = issue([(zero, q_smem, k_t, True), (zero, do_smem, v_t, True)], p.interpret)
          plgpu.barrier_arrive(v_free.at[slot])
          dq = mma(dq, d_s(probs(s), dp), k_t, p.interpret)
        else:

          def body(refs):
            s_ref, dp_ref, dq_ref = refs
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_t, (1, 0)))
            plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_t, (1, 0)))
            # S is awaited alone: P = exp2(S - lse) runs while dP is still on the tensor cores.
            pr = probs(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
            dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=0)
            plgpu.barrier_arrive(v_free.at[slot])
            plgpu.wgmma(dq_ref, d_s(pr, dp), k_t)

          dq = pl.run_state(body)(tuple(plgpu.ACC.init(x) for x in (zero, zero, dq)))[2]
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      dq = run_range(c0, c1, w, step, dq)
      q_smem[...] = (dq * p.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      kv = ((k_ref, k_smem, k_bars), (kid_ref, kid_smem, kid_bars), (v_ref, v_smem, v_bars))
      kv_head, free = lax.div(head, jnp.int32(p.groups)), (k_free, v_free)
      produce_kv(bi, kv_head, bk, c0, c1, st, kv, free, registers[1])

  def entry(*refs):
    smem = (
      tiled_smem((wgs, bq, h), dtype),
      tiled_smem((wgs, bq, h), dtype),
      plgpu.SMEM((2, wgs, bq), jnp.float32),
      plgpu.SMEM((2, wgs, bq), jnp.int32),
      tiled_smem((st, bk, h), dtype),
      tiled_smem((st, bk, h), dtype),
      plgpu.SMEM((st, bk), jnp.int32),
    )
    bars = (
      plgpu.Barrier(num_barriers=6 * wgs),
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=st),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=st),
    )
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, collective_axes="wg")

  out = jax.ShapeDtypeStruct(q.shape, dtype)
  return launch(entry, "lcv_hopper_dq", out, (n, n_cta, b), "q_seq", p, wgs)(
    ranges, q, k, v, do, lse2, delta, lo, hi, kid
  )


# The query-side ring of the dK/dV kernels (this one and `hopper_wide_dkv`): per stage the q and
# dO tiles [bq, H], lse2 and delta (f[0], f[1]) and the rows' lo and hi (i[0], i[1]), each with a
# "loaded" barrier, streamed for every head of the GQA group in turn.


QUERY_OPERANDS = ("q", "do", "lse2", "delta", "lo", "hi")  # a query-side stage's copies


def query_ring_smem(st: int, bq: int, h: int, dtype):
  """Shared memory of an `st`-stage query-side ring: (q, dO, f, i)."""
  return (
    tiled_smem((st, bq, h), dtype),
    tiled_smem((st, bq, h), dtype),
    plgpu.SMEM((2, st, bq), jnp.float32),
    plgpu.SMEM((2, st, bq), jnp.int32),
  )


def query_ring_barriers(st: int, merged: bool = False):
  """The "loaded" barriers of the ring: one array per operand (q, dO, lse2, delta, lo, hi), or
  (`merged`) one array that all six copies of a stage complete."""
  if merged:
    return (plgpu.Barrier(num_arrivals=len(QUERY_OPERANDS), num_barriers=st),)
  return tuple(plgpu.Barrier(num_barriers=st) for _ in QUERY_OPERANDS)


def stream_position(t, kv_head, g, c0, span):
  """Position t of a dK/dV CTA's query-side stream -> (query tile c0 + t % span, query head
  kv_head * g + t // span): the CTA's span query tiles for each of the g heads of the group."""
  gi = lax.div(t, jnp.maximum(span, 1))
  return c0 + t - gi * span, kv_head * g + gi


def query_loader(gmem, ring, loaded, bi, kv_head, g, c0, span, bq):
  """load(t, slot): the copies of stream position t (`stream_position`) into `slot` of the ring.
  gmem: (q, dO, lse2, delta, lo, hi)."""
  q_smem, do_smem, f_smem, i_smem = ring
  q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref = gmem

  def load(t, slot):
    j, head = stream_position(t, kv_head, g, c0, span)
    rows = pl.ds(j * bq, bq)
    copies = (
      (q_ref.at[bi, rows, head], q_smem.at[slot]),
      (do_ref.at[bi, rows, head], do_smem.at[slot]),
      (lse_ref.at[bi, head, rows], f_smem.at[0, slot]),
      (dl_ref.at[bi, head, rows], f_smem.at[1, slot]),
      (lo_ref.at[bi, rows], i_smem.at[0, slot]),
      (hi_ref.at[bi, rows], i_smem.at[1, slot]),
    )
    bars = loaded * len(copies) if len(loaded) == 1 else loaded  # merged: one for all
    for (src, dst), bar in zip(copies, bars, strict=True):
      plgpu.copy_gmem_to_smem(src, dst, bar.at[slot])

  return load


def produce_queries(gmem, ring, loaded, free, bi, kv_head, g, c0, span, bq, st):
  """Producer of the dK/dV kernels: query tiles c0..c0+span-1 of each of the g heads of
  `kv_head`'s group, in that order, into the ring (`query_loader`)."""
  load = query_loader(gmem, ring, loaded, bi, kv_head, g, c0, span, bq)
  produce(jnp.int32(0), span * g, st, load, free)


def load_keys(gmem, smem, bars, bi, kv_head, rows, wg):
  """A dK/dV consumer's own key tiles into smem, awaited: gmem (k, v, key indices), smem their
  tiles, bars the 3 * WGS "loaded" barriers (one per tile and consumer `wg`)."""
  k_ref, v_ref, kid_ref = gmem
  srcs = (k_ref.at[bi, rows, kv_head], v_ref.at[bi, rows, kv_head], kid_ref.at[bi, rows])
  for i, (src, dst) in enumerate(zip(srcs, smem)):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i * WGS + wg])
  for i in range(len(srcs)):
    plgpu.barrier_wait(bars.at[i * WGS + wg])


def wait_queries(loaded, slot):
  """Until the query-side tiles of a stage (q, dO, lse2, delta, lo, hi) have landed."""
  for bar in loaded:
    plgpu.barrier_wait(bar.at[slot])


def probabilities_t(s_t, key, ring, slot, mode, interpret):
  """P^T [keys, queries] float32 from the base-2 logits S^T: masked in boundary tiles, 0 on rows
  without keys (lse2 = +inf there). key: the CTA's key indices, one per row of S^T."""
  _, _, f_smem, i_smem = ring
  shape = s_t.shape
  if mode == "mask":
    kb = bcast(key, shape, 0)
    lo_c = bcast(vec(i_smem.at[0, slot], 0, interpret), shape, 1)
    hi_c = bcast(vec(i_smem.at[1, slot], 0, interpret), shape, 1)
    s_t = jnp.where((lo_c <= kb) & (kb <= hi_c), s_t, -jnp.inf)
  return jnp.exp2(s_t - bcast(vec(f_smem.at[0, slot], 0, interpret), shape, 1))


def delta_t(ring, slot, shape, interpret):
  """delta of a stage's query rows, broadcast down the key rows of a [keys, queries] tile."""
  return bcast(vec(ring[2].at[1, slot], 0, interpret), shape, 1)


def dkv(p: Plan, q, k, v, do, lse2, delta, lo, hi, kid):
  """Padded operands (`operands`) -> (dk, dv) [B, S_pad, K, H] in k's dtype, summed over the
  GQA group (dk scaled)."""
  b, _, n, h = q.shape
  kh, g = k.shape[2], p.groups
  bk, bq, dtype, st = ROWS, ROWS, q.dtype, p.stages_dkv
  _, q_range = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = cta_ranges(q_range)
  n_cta = p.s_pad // (bk * WGS)
  c = p.scale * LOG2E

  def kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, kid_ref, *rest):
    dk_ref, dv_ref, scoped = rest
    (k_smem2, v_smem2, kid_smem2, *ring), (kv_bars, *loaded, q_free) = scoped
    q_smem = ring[0]
    bi, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    rng = [rng_ref[bi, tile, i] for i in range(10)]
    c0, c1 = rng[0], rng[1]
    span = c1 - c0  # query tiles per head of the group: the stream holds g * span stages

    @pl.when(wg < WGS)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      k_smem, v_smem, kid_smem = k_smem2.at[wg], v_smem2.at[wg], kid_smem2.at[wg]
      rows = pl.ds(tile * (bk * WGS) + wg * bk, bk)
      load_keys((k_ref, v_ref, kid_ref), (k_smem, v_smem, kid_smem), kv_bars, bi, kv_head, rows, wg)
      key = vec(kid_smem, 1, p.interpret)
      w = own_range(rng, wg)
      shape = (bk, bq)
      wgmma = plgpu.Layout.WGMMA

      def dv_and_ds(dv, pt, slot, zero):
        """dV += P^T dO_t and dP^T = V dO_t^T (issued together, one wait), then dS^T =
        P^T (dP^T - delta) in float32."""
        do_t = ring[1].at[slot]
        dv, dpt = issue(
          [(dv, pt.astype(dtype), do_t, False), (zero, v_smem, do_t, True)], p.interpret
        )
        return dv, pt * (dpt - delta_t(ring, slot, shape, p.interpret))

      def step(j, carry, own, pending, mode, gi):
        """One query tile (module docstring): `own`, the tile is in this consumer's range (S^T,
        dV, dP^T run); `pending`, the previous tile was (its dK product is issued here)."""
        dk, dv, ds_prev = carry
        t = gi * span + j - c0  # position in the stream of (head, query tile) stages
        slot, prev = lax.rem(t, st), lax.rem(t + st - 1, st)  # prev: only when pending
        wait_queries(loaded, slot)
        first = [(dk, ds_prev, q_smem.at[prev], False)] if pending else []
        if own:
          first.append((zeros(shape, wgmma, p.interpret), k_smem, q_smem.at[slot], True))
        outs = issue(first, p.interpret)  # dK += dS^T_{t-1} Q_{t-1} and S^T_t = K Q_t^T
        if pending:
          dk = outs[0]
          plgpu.barrier_arrive(q_free.at[prev])  # Q_{t-1} read by its last product
        if not own:
          plgpu.barrier_arrive(q_free.at[slot])
          return dk, dv, ds_prev
        pt = probabilities_t(outs[-1] * c, key, ring, slot, mode, p.interpret)
        dv, dst = dv_and_ds(dv, pt, slot, zeros(shape, wgmma, p.interpret))
        return dk, dv, dst.astype(dtype)  # Q_t's stage stays until dK's product (next step)

      def drain(_, carry, gi):
        """The step after a head's last tile, when that tile was this consumer's: its dK."""
        dk, dv, ds_prev = carry
        last = lax.rem(gi * span + span - 1, st)
        (dk,) = issue([(dk, ds_prev, q_smem.at[last], False)], p.interpret)
        plgpu.barrier_arrive(q_free.at[last])
        return dk, dv, ds_prev

      def head_loop(gi, carry):
        carry = run_range_carried(c0, c1, w, functools.partial(step, gi=gi), carry)
        fin = ((w[0] < w[3]) & (w[3] == c1)).astype(jnp.int32)
        return lax.fori_loop(0, fin, functools.partial(drain, gi=gi), carry)

      acc = zeros((bk, h), wgmma, p.interpret)
      ds0 = zeros(shape, wgmma, p.interpret).astype(dtype)
      dk, dv, _ = lax.fori_loop(0, g, head_loop, (acc, acc, ds0))
      k_smem[...] = (dk * p.scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, rows, kv_head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, rows, kv_head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WGS)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      gmem = (q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref)
      produce_queries(gmem, ring, loaded, (q_free,), bi, kv_head, g, c0, span, bq, st)

  def entry(*refs):
    smem = (
      tiled_smem((WGS, bk, h), dtype),
      tiled_smem((WGS, bk, h), dtype),
      plgpu.SMEM((WGS, bk), jnp.int32),
      *query_ring_smem(st, bq, h, dtype),
    )
    bars = (
      plgpu.Barrier(num_barriers=3 * WGS),
      *query_ring_barriers(st),
      plgpu.Barrier(num_arrivals=WGS, num_barriers=st),
    )
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, collective_axes="wg")

  kv = jax.ShapeDtypeStruct(k.shape, dtype)
  args = (ranges, q, k, v, do, lse2, delta, lo, hi, kid)
  return launch(entry, "lcv_hopper_dkv", (kv, kv), (kh, n_cta, b), "kv_seq", p)(*args)
