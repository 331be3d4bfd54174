"""Schedules of the Hopper dK/dV backward kernel that keep the tensor cores busier.

`flash_hopper._dkv` (the two-kernel backward's dK/dV half) runs, per consumer warpgroup (64 keys)
and query tile t, three products with a wait after each:

    S^T_t = K Q_t^T  (wait) -> P^T = exp2(S^T - lse) -> dV += P^T dO_t, dP^T = V dO_t^T  (wait)
    -> dS^T_t = P^T (dP^T - delta) -> dK += dS^T_t Q_t  (wait)

and both consumers wait on the same Q / dO stage barriers, so their elementwise phases coincide
and the tensor cores idle then. The variants here compute the same function (the same products,
accumulated in the same order) with fewer waits and the consumers out of phase:

- "pipelined" (software pipelining inside a consumer): dK += dS^T_{t-1} Q_{t-1} of the previous
  query tile is issued together with S^T_t of this one, one wait for both; a step has two waits
  instead of three, and every issue carries two products (2 + 2 instead of 1 + 2 + 1). Q_{t-1}
  stays in its stage one step longer, so the ring of stages is one deeper by default (3).
- "pingpong": "pipelined" plus FlashAttention-3's ping-pong (arXiv 2407.08608, section 3.1) between
  the two consumers: a pair of one-way barriers passes the turn to issue, so the issues alternate
  (consumer 0's batch, consumer 1's, 0's, ...) and one consumer's elementwise phase (exp2 after
  S^T, dS^T after dP^T) runs while the other's two products are on the tensor cores. A consumer
  hands the turn over right after issuing, before its wait. Steps a consumer skips (tiles outside
  its own range) still take their two turns, so both take the same number.
- "grouped": the products regrouped by their operands, as the dQ kernel does: S^T and dP^T (both
  from smem only) issued together, then P^T and dS^T in one elementwise phase, then dV and dK
  (register operands P^T, dS^T) together; two waits per step, nothing carried between steps (the
  stage is held no longer than in `_dkv`, so 2 stages suffice).
- "grouped_pingpong": "grouped" with the turns of "pingpong".

The masked / full / skip tile modes, the GQA group loop (the stream of query tiles runs over every
head of the group, as in `_dkv`), empty rows and padding are as in `_dkv`; the pipelined schedules
drain at the end of each head (the last tile's dK product is issued alone). Registers per
consumer thread at H = 128: the dK and dV accumulators [64, H] float32 (64 each), plus for
"pipelined" dS^T of the previous tile in bf16 (16) and S^T [64, 64] float32 (32) at the first
issue, dP^T (32) and P^T in float32 (32) and in bf16 (16) at the second; for "grouped" S^T and
dP^T (32 each) at the first, P^T and dS^T in bf16 (16 each) at the second. The peak (208) is
`_dkv`'s in both.

Not a variant: query tiles of 128 rows. S^T and dP^T [64, 128] float32 would take 64 registers
each, with dK and dV 256 of the 232 a consumer thread may hold, before P^T.

In Mosaic GPU's interpreter (CPU) the products are plain float32 dots, as in `flash_hopper`, so the
interpreter checks the pipeline protocol (stages, slots, turns, ranges, masks) and the lowering
checks the wgmma forms; the speed is measured on a GPU (scripts/check_hopper_dkv.py).
`dkv` takes and returns what `flash_hopper._dkv(p, ..., fused=False)` does, so the backward can
call either; `backward_kv` is the unpadded form (tests, scripts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcv.kernels import flash_gpu
from lcv.kernels.flash_hopper import (
  _LOG2E,
  _ROWS,
  _WGS,
  _bcast,
  _check,
  _cta_ranges,
  _launch,
  _Plan,
  _plan,
  _prepare,
  _produce,
  _run_range,
  _tiled_smem,
  _vec,
  _zeros,
)

VARIANTS = ("pipelined", "pingpong", "grouped", "grouped_pingpong")
# Default ring depth: the pipelined schedules hold a query tile's stage one step longer than
# `_dkv` (its 2 stages would leave the producer one step to refill a stage instead of two).
STAGES = 3
_SMEM_BYTES = 227 * 1024  # shared memory one CTA may take on sm_90


def smem_bytes(h: int, bq: int, stages: int, itemsize: int = 2) -> int:
  """Shared memory of the kernel: K and V of both consumers, their key indices, and per stage
  the Q and dO tiles with four row vectors (lse, delta, lo, hi)."""
  kv = 2 * _WGS * _ROWS * h * itemsize + _WGS * _ROWS * 4
  return kv + stages * bq * (2 * h * itemsize + 4 * 4)


def _issue(products, during, interpret):
  """acc + a @ op(b) for each (acc, a, b, trans_b) of `products`, issued back to back as wgmma
  with one wait for all; `during` runs once they are issued, before the wait (a turn handed
  over). a: register array (bf16 / fp16) or smem ref; b: smem ref (transposed where trans_b).

  In the interpreter, plain float32 dots (as `flash_hopper._mma`).
  """
  if interpret:
    outs = []
    for acc, a, b, trans_b in products:
      av = a if isinstance(a, jax.Array) else a[...]
      bv = b[...].T if trans_b else b[...]
      outs.append(acc + jnp.dot(av.astype(jnp.float32), bv.astype(jnp.float32)))
    during()
    return tuple(outs)
  if not products:
    during()
    return ()
  bs = [plgpu.transpose_ref(b, (1, 0)) if tb else b for _, _, b, tb in products]

  def body(refs):
    for ref, (_, a, _, _), b in zip(refs, products, bs):
      plgpu.wgmma(ref, a, b)
    during()

  return tuple(pl.run_state(body)(tuple(plgpu.ACC.init(x[0]) for x in products)))


def _run_range_pipelined(c0, c1, w, step, carry):
  """A consumer's pass over its CTA's query tiles [c0, c1), seven loops with (own, pending, mode)
  fixed per loop: `own`, the tile is in the consumer's range (S^T, dV, dP^T run); `pending`, the
  previous tile was, and its dK product is issued in this step.

  w = (first, full first, full end, end) of the consumer's own tiles inside [c0, c1]. The first
  own tile has nothing pending and is masked even when full (the same values); the tile after
  the range carries its last dK product. When the range ends at c1 that product is left to the
  caller (`drain`).
  """
  w0, w1, w2, w3 = w
  w0p = jnp.minimum(w0 + 1, w3)
  w1p, w2p = jnp.maximum(w1, w0p), jnp.maximum(w2, w0p)
  w3p = w3 + ((w0 < w3) & (w3 < c1)).astype(jnp.int32)
  loops = (
    (c0, w0, False, False, "skip"),
    (w0, w0p, True, False, "mask"),
    (w0p, w1p, True, True, "mask"),
    (w1p, w2p, True, True, "full"),
    (w2p, w3, True, True, "mask"),
    (w3, w3p, False, True, "skip"),
    (w3p, c1, False, False, "skip"),
  )
  for lo, hi, own, pending, mode in loops:
    carry = lax.fori_loop(
      lo, hi, functools.partial(step, own=own, pending=pending, mode=mode), carry
    )
  return carry


def _check_options(p: _Plan, variant: str, stages: int) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"{variant=} must be one of {VARIANTS}")
  if not isinstance(stages, int) or stages < 2:
    raise ValueError(f"{stages=} must be an int >= 2 (a query tile is awaited while another loads)")
  need = smem_bytes(p.h, p.bq_dkv, stages)
  if need > _SMEM_BYTES - 4096:  # barriers and alignment take the rest
    raise ValueError(
      f"{stages=} stages of {p.bq_dkv}-row query tiles at H={p.h} need {need} bytes of shared "
      f"memory, more than the {_SMEM_BYTES - 4096} left per CTA: use fewer stages"
    )


def dkv(
  p: _Plan, q, k, v, do, lse2, delta, lo, hi, kid, *, variant: str, stages: int | None = None
):
  """Padded operands -> (dk, dv) [B, S_pad, K, H], summed over the GQA group (dk scaled).

  The arguments and results of `flash_hopper._dkv(p, ..., fused=False)`: q, do [B, T_pad, N, H],
  k, v [B, S_pad, K, H] in bf16 / fp16; lse2 (base-2 lse, +inf on empty rows) and delta float32
  [B, N, T_pad]; lo, hi int32[B, T_pad]; kid int32[B, S_pad]. variant: one of `VARIANTS`;
  stages: depth of the query-tile ring (None: `STAGES`).
  """
  st = STAGES if stages is None else stages
  _check_options(p, variant, st)
  b, _, n, h = q.shape
  kh, g = k.shape[2], p.groups
  bk, bq, dtype = _ROWS, p.bq_dkv, q.dtype
  _, q_range = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = _cta_ranges(q_range)
  n_cta = p.s_pad // (bk * _WGS)
  c = p.scale * _LOG2E
  turns = variant in ("pingpong", "grouped_pingpong")
  grouped = variant.startswith("grouped")

  def kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, kid_ref, *rest):
    dk_ref, dv_ref, scoped = rest
    (k_smem2, v_smem2, kid_smem2, q_smem, do_smem, f_smem, i_smem), bars = scoped
    kv_bars, q_bars, do_bars, lse_bars, dl_bars, lo_bars, hi_bars, q_free, *sched = bars
    bi, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    rng = [rng_ref[bi, tile, i] for i in range(10)]
    c0, c1 = rng[0], rng[1]
    span = c1 - c0

    @pl.when(wg < _WGS)
    def _consumer():
      plgpu.set_max_registers(232 if h <= 128 else 240, action="increase")
      k_smem, v_smem, kid_smem = k_smem2.at[wg], v_smem2.at[wg], kid_smem2.at[wg]
      row0 = tile * (bk * _WGS) + wg * bk
      rows = pl.ds(row0, bk)
      srcs = (
        (k_ref.at[bi, rows, kv_head], k_smem),
        (v_ref.at[bi, rows, kv_head], v_smem),
        (kid_ref.at[bi, rows], kid_smem),
      )
      for i, (src, dst) in enumerate(srcs):
        plgpu.copy_gmem_to_smem(src, dst, kv_bars.at[i * _WGS + wg])
      for i in range(len(srcs)):
        plgpu.barrier_wait(kv_bars.at[i * _WGS + wg])
      key = _vec(kid_smem, 1, p.interpret)
      w = [jnp.where(wg == 0, rng[2 + i], rng[6 + i]) for i in range(4)]
      shape = (bk, bq)
      wgmma = plgpu.Layout.WGMMA

      def turn(products):
        """Issue `products` in this consumer's turn ("pingpong") and hand the turn over."""
        if not turns:
          return _issue(products, lambda: None, p.interpret)
        plgpu.barrier_wait(sched[0].at[wg])
        return _issue(products, lambda: plgpu.barrier_arrive(sched[0].at[1 - wg]), p.interpret)

      def probabilities(st_, slot, mode):
        """P^T [keys, queries] float32 from the base-2 logits S^T: masked in boundary tiles,
        0 on rows without keys (lse2 = +inf there)."""
        if mode == "mask":
          kb = _bcast(key, shape, 0)
          lo_c = _bcast(_vec(i_smem.at[0, slot], 0, p.interpret), shape, 1)
          hi_c = _bcast(_vec(i_smem.at[1, slot], 0, p.interpret), shape, 1)
          st_ = jnp.where((lo_c <= kb) & (kb <= hi_c), st_, -jnp.inf)
        return jnp.exp2(st_ - _bcast(_vec(f_smem.at[0, slot], 0, p.interpret), shape, 1))

      def step(j, carry, own, pending, mode, gi):
        """One query tile, "pipelined" / "pingpong" (module docstring)."""
        dk, dv, ds_prev = carry
        t = gi * span + j - c0  # position in the stream of (head, query tile) stages
        slot, prev = lax.rem(t, st), lax.rem(t + st - 1, st)  # prev: only when pending
        for bar in (q_bars, do_bars, lse_bars, dl_bars, lo_bars, hi_bars):
          plgpu.barrier_wait(bar.at[slot])
        first = [(dk, ds_prev, q_smem.at[prev], False)] if pending else []
        if own:
          first.append((_zeros(shape, wgmma, p.interpret), k_smem, q_smem.at[slot], True))
        outs = turn(first)  # dK += dS^T_{t-1} Q_{t-1} and S^T_t = K Q_t^T, one wait
        if pending:
          dk = outs[0]
          plgpu.barrier_arrive(q_free.at[prev])  # Q_{t-1} read by its last product
        if not own:
          plgpu.barrier_arrive(q_free.at[slot])
          turn([])
          return dk, dv, ds_prev
        pt = probabilities(outs[-1] * c, slot, mode)
        do_t = do_smem.at[slot]
        zero = _zeros(shape, wgmma, p.interpret)
        dv, dpt = turn([(dv, pt.astype(dtype), do_t, False), (zero, v_smem, do_t, True)])
        dst = pt * (dpt - _bcast(_vec(f_smem.at[1, slot], 0, p.interpret), shape, 1))
        return dk, dv, dst.astype(dtype)  # Q_t's stage stays until dK's product (next step)

      def drain(_, carry, pending, gi):
        """The turn after a head's last tile: its dK product when that tile was this consumer's."""
        dk, dv, ds_prev = carry
        last = lax.rem(gi * span + span - 1, st)
        outs = turn([(dk, ds_prev, q_smem.at[last], False)] if pending else [])
        if pending:
          dk = outs[0]
          plgpu.barrier_arrive(q_free.at[last])
        return dk, dv, ds_prev

      def grouped_step(j, carry, mode, gi):
        """One query tile, "grouped": S^T and dP^T (operands in smem) issued together, then
        P^T and dS^T, then dV and dK (operands P^T, dS^T in registers) issued together."""
        dk, dv = carry
        slot = lax.rem(gi * span + j - c0, st)
        for bar in (q_bars, do_bars, lse_bars, dl_bars, lo_bars, hi_bars):
          plgpu.barrier_wait(bar.at[slot])
        if mode == "skip":
          plgpu.barrier_arrive(q_free.at[slot])
          turn([])
          turn([])
          return dk, dv
        q_t, do_t = q_smem.at[slot], do_smem.at[slot]
        zero = _zeros(shape, wgmma, p.interpret)
        st_, dpt = turn([(zero, k_smem, q_t, True), (zero, v_smem, do_t, True)])
        pt = probabilities(st_ * c, slot, mode)
        dst = pt * (dpt - _bcast(_vec(f_smem.at[1, slot], 0, p.interpret), shape, 1))
        dv, dk = turn([(dv, pt.astype(dtype), do_t, False), (dk, dst.astype(dtype), q_t, False)])
        plgpu.barrier_arrive(q_free.at[slot])
        return dk, dv

      def grouped_head_loop(gi, carry):
        return _run_range(c0, c1, w, functools.partial(grouped_step, gi=gi), carry)

      def head_loop(gi, carry):
        carry = _run_range_pipelined(c0, c1, w, functools.partial(step, gi=gi), carry)
        fin = ((w[0] < w[3]) & (w[3] == c1)).astype(jnp.int32)
        carry = lax.fori_loop(0, fin, functools.partial(drain, pending=True, gi=gi), carry)
        return lax.fori_loop(fin, 1, functools.partial(drain, pending=False, gi=gi), carry)

      if turns:
        pl.when(wg == 1)(lambda: plgpu.barrier_arrive(sched[0].at[0]))  # consumer 0 goes first
      zeros = _zeros((bk, h), wgmma, p.interpret)
      if grouped:
        dk, dv = lax.fori_loop(0, g, grouped_head_loop, (zeros, zeros))
      else:
        ds0 = _zeros(shape, wgmma, p.interpret).astype(dtype)
        dk, dv, _ = lax.fori_loop(0, g, head_loop, (zeros, zeros, ds0))
      if turns:
        pl.when(wg == 0)(lambda: plgpu.barrier_wait(sched[0].at[0]))  # consumer 1's last turn
      k_smem[...] = (dk * p.scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, rows, kv_head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, rows, kv_head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _WGS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def load(t, slot):
        gi = lax.div(t, jnp.maximum(span, 1))
        j = c0 + t - gi * span
        head = kv_head * g + gi
        rows = pl.ds(j * bq, bq)
        copies = (
          (q_ref.at[bi, rows, head], q_smem.at[slot], q_bars),
          (do_ref.at[bi, rows, head], do_smem.at[slot], do_bars),
          (lse_ref.at[bi, head, rows], f_smem.at[0, slot], lse_bars),
          (dl_ref.at[bi, head, rows], f_smem.at[1, slot], dl_bars),
          (lo_ref.at[bi, rows], i_smem.at[0, slot], lo_bars),
          (hi_ref.at[bi, rows], i_smem.at[1, slot], hi_bars),
        )
        for src, dst, bar in copies:
          plgpu.copy_gmem_to_smem(src, dst, bar.at[slot])

      _produce(jnp.int32(0), span * g, st, load, (q_free,))

  def entry(*refs):
    smem = (
      _tiled_smem((_WGS, bk, h), dtype),
      _tiled_smem((_WGS, bk, h), dtype),
      plgpu.SMEM((_WGS, bk), jnp.int32),
      _tiled_smem((st, bq, h), dtype),
      _tiled_smem((st, bq, h), dtype),
      plgpu.SMEM((2, st, bq), jnp.float32),
      plgpu.SMEM((2, st, bq), jnp.int32),
    )
    bars = (
      plgpu.Barrier(num_barriers=3 * _WGS),
      *(plgpu.Barrier(num_barriers=st) for _ in range(6)),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=st),
    )
    if turns:  # one one-way barrier per consumer: its turn to issue
      bars += (plgpu.Barrier(num_barriers=_WGS),)
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, collective_axes="wg")

  kv = jax.ShapeDtypeStruct(k.shape, dtype)
  name = f"lcv_hopper_dkv_{variant}"
  args = (ranges, q, k, v, do, lse2, delta, lo, hi, kid)
  return _launch(entry, name, (kv, kv), (kh, n_cta, b), "kv_seq", p)(*args)


def operands(p: _Plan, q, k, v, o, lse, do, q_lo, q_hi, k_idx, dlse=None):
  """The padded operands (q, k, v, do, lse2, delta, lo, hi, kid) of `dkv` and
  `flash_hopper._dkv`, prepared as `flash_hopper`'s backward prepares them."""
  delta = flash_gpu._delta(o, do, dlse)
  qp, kp, vp, lo, hi, kid = _prepare(p, q, k, v, q_lo, q_hi, k_idx)
  pad = flash_gpu._pad_axis
  dop = pad(do.astype(q.dtype), 1, p.t_pad)
  lse2 = flash_gpu._lse2(pad(lse.astype(jnp.float32), 2, p.t_pad, -jnp.inf))
  return qp, kp, vp, dop, lse2, pad(delta, 2, p.t_pad), lo, hi, kid


def backward_kv(
  q, k, v, o, lse, do, q_lo, q_hi, k_idx, *, variant, stages=None, scale=None, interpret=None
):
  """(dk, dv) [B, S, K, H] from the row's final (o, lse), as the dk, dv of
  `flash_hopper.backward`, with the dK/dV kernel of `variant` (and `stages`)."""
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, interpret, False)
  _check_options(p, variant, STAGES if stages is None else stages)  # before any tracing
  dk, dv = dkv(
    p, *operands(p, q, k, v, o, lse, do, q_lo, q_hi, k_idx), variant=variant, stages=stages
  )
  return dk[:, : p.s], dv[:, : p.s]
