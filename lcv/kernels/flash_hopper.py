"""Hopper (sm_90) attention with interval masks: wgmma + TMA + warp specialization.

The fast path of `lcv.kernels.flash_gpu` on H100 / H200, with the same contract (q [B, T, N, H],
k/v [B, S, K, H], DESIGN.md section 2 intervals `q_lo <= k_idx <= q_hi`, lse natural-log float32
[B, N, T], o = 0 and lse = -inf on rows with no key). The design is FlashAttention-3's
(arXiv 2407.08608, section 3): one CTA holds 128 query rows as two *consumer* warpgroups of 64
rows each plus one *producer* warpgroup that streams K/V tiles into a ring of shared-memory
stages with the bulk tensor copy engine (TMA); the consumers run their matmuls as wgmma and take
turns on the tensor cores (the "ping-pong" schedule barrier, section 3.1) so one warpgroup's
softmax overlaps the other's matmuls.

What lcv adds is the mask. Every CTA gets its key-tile range from `flash_gpu.tile_ranges`
(computed once per call in plain jnp outside the kernels, O(T/64 * S/bk) work): the producer loads
only the tiles in the CTA's range, so skipped tiles cost no loads and no FLOPs; each consumer
splits its own part of that range into boundary tiles (elementwise mask from the row intervals
and the tile's key indices) and a run of full tiles (no mask arithmetic), as five loops with the
mode fixed per loop. Tiles of the CTA range outside a warpgroup's own range are stepped over with
the same barrier traffic but no math, so the two warpgroups stay in lockstep on the shared
stages and the schedule barrier.

The backward follows the same scheme in one of two forms (`fused_dq=`, default `FUSED_DQ`):
- two kernels (FlashAttention-2 Alg. 2 split, as in `flash_gpu`): the dQ kernel streams K/V tiles
  over a query tile's range, the dK/dV kernel streams (q, dO, lse, delta, lo, hi) tiles over a key
  tile's range and loops over the GQA group inside; S and P are computed in both (7 products per
  tile pair);
- one kernel (FlashAttention-3's backward, appendix B): the dK/dV kernel also forms
  dQ_partial = dS K for every (query tile, key tile) pair it visits and adds it into a float32 dQ
  in global memory with a TMA reduce-add; dQ is scaled and cast outside (5 products per pair).

Only bf16 / fp16 inputs and head dims 64 / 128 run here (`supported`); everything else goes to the
portable kernel. On a CPU backend the kernels run in Mosaic GPU's interpreter (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcv import masks
from lcv.kernels import flash_gpu, with_vjp

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_ROWS = 64  # query rows (forward, dQ) or key rows (dK/dV) of one consumer warpgroup
_WGS = 2  # consumer warpgroups per CTA
# Head dims compiled and checked on an H200. 256 is left to the portable kernel: its first GPU
# test did not finish within its time limit (benchmarks/NOTES.md) although the same kernels pass
# at H = 256 in the interpreter, so the protocol is sound and the compiled form (registers:
# a 64 x 256 float32 accumulator per warpgroup) is the suspect; not yet diagnosed.
HEAD_DIMS = (64, 128)
# The backward's form when a call does not choose (`fused_dq=`): False runs the dQ and the dK/dV
# kernels (each recomputes S and P: 7 products per tile pair); True runs one dK/dV kernel that
# also reduce-adds dQ (5 products, FlashAttention-3 appendix B). Both pass the interpreter and
# the GPU tests; on an H200 the fused form is the slower one (fwd + bwd 408-416 against 491-508
# TFLOP/s at 16K-64K, benchmarks/NOTES.md): its reduce-add sits on the consumers' critical path.
FUSED_DQ = False


def supported(q, k) -> bool:
  """Whether these operands can take the Hopper kernels (dtype, head dim, a sm_90 device)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] not in HEAD_DIMS:
    return False
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call (padded lengths, tiles) for the Mosaic GPU kernels."""

  t: int
  s: int
  t_pad: int
  s_pad: int
  h: int
  groups: int
  bk: int  # key tile of the forward and dQ kernels
  bq_dkv: int  # query tile of the dK/dV kernel
  stages: int
  scale: float
  interpret: object
  fused_dq: bool  # backward: one kernel with dQ reduce-added (True) or the dQ + dK/dV kernels
  schedule: str = "rendezvous"  # forward: the consumers' schedule, one of SCHEDULES
  fold_scale: bool = False  # forward: the softmax scale folded into exp2's argument
  lean_sync: bool = False  # forward: K and its key indices on one barrier; read-only final wait


def _plan(q, k, scale, interpret, fused_dq=None) -> _Plan:
  _, t, n, h = q.shape
  s = k.shape[1]
  bk = 128 if h <= 128 else 64
  rows = _ROWS * _WGS
  tile = max(rows, bk)
  scale = float(h**-0.5 if scale is None else scale)
  if interpret is None and jax.default_backend() != "gpu":
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    interpret = InterpretGPUParams()
  return _Plan(
    t=t,
    s=s,
    t_pad=pl.cdiv(t, tile) * tile,
    s_pad=pl.cdiv(s, tile) * tile,
    h=h,
    groups=n // k.shape[2],
    bk=bk,
    bq_dkv=64,
    stages=2,
    scale=scale,
    interpret=interpret or None,
    fused_dq=FUSED_DQ if fused_dq is None else bool(fused_dq),
    schedule=FWD_SCHEDULE,
    fold_scale=FOLD_SCALE and scale > 0,  # folding needs a positive scale (max commutes)
    lean_sync=LEAN_SYNC,
  )


def _prepare(p: _Plan, q, k, v, q_lo, q_hi, k_idx):
  pad = flash_gpu._pad_axis
  q = pad(q, 1, p.t_pad)
  k, v = pad(k, 1, p.s_pad), pad(v, 1, p.s_pad)
  lo = pad(q_lo.astype(jnp.int32), 1, p.t_pad, 0)
  hi = pad(q_hi.astype(jnp.int32), 1, p.t_pad, -1)
  kid = pad(k_idx.astype(jnp.int32), 1, p.s_pad, masks.NO_KEY)
  return q, k, v, lo, hi, kid


def _cta_ranges(r):
  """Per-warpgroup tile ranges [B, tiles, 4] -> per-CTA int32[B, tiles // 2, 10].

  Row layout: (cta first, cta end, then (first, full first, full end, end) of warpgroup 0 and 1),
  every warpgroup value clipped into the CTA range so the five loops of a consumer partition
  exactly the tiles the producer loads; a warpgroup with no tiles gets an empty range.
  """
  b = r.shape[0]
  r = r.reshape(b, -1, _WGS, 4)
  empty = r[..., 0] >= r[..., 3]
  big = jnp.iinfo(jnp.int32).max
  c0 = jnp.min(jnp.where(empty, big, r[..., 0]), axis=-1)
  c1 = jnp.max(jnp.where(empty, 0, r[..., 3]), axis=-1)
  none = jnp.all(empty, axis=-1)
  c0, c1 = jnp.where(none, 0, c0), jnp.where(none, 0, c1)
  w = jnp.where(empty[..., None], c0[..., None, None], r)
  w = jnp.clip(w, c0[..., None, None], c1[..., None, None])
  return jnp.concatenate([c0[..., None], c1[..., None], w.reshape(b, -1, 8)], -1).astype(jnp.int32)


def _vec(ref, axis: int, interpret):
  """Load a smem vector laid out as one value per accumulator row (axis 1) or column (axis 0).

  Mosaic GPU's interpreter has no layouts (and no `plgpu.load`): a plain read there.
  """
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def _zeros(shape, layout, interpret, fill=0.0):
  """A float32 register array in a wgmma layout (plain array in the interpreter)."""
  x = jnp.full(shape, fill, jnp.float32)
  return x if interpret else plgpu.layout_cast(x, layout)


def _mma(acc, a, b, interpret, during=None, trans_b=False, trans_a=False):
  """acc + op(a) @ op(b) on the tensor cores (op: transpose where asked): wgmma, float32
  accumulator in registers.

  a: register array or smem ref (trans_a only for a ref), b: smem ref. `during` runs after the
  wgmma is issued and before its result is awaited (overlap with the next tile's barrier wait).
  Mosaic GPU's interpreter supports neither transposed wgmma operands nor accumulator updates, so
  there the product is a plain float32 dot of the same operands: the interpreter checks the
  pipeline (barriers, slots, ranges, masks, softmax), the GPU tests check the wgmma forms.
  """
  if interpret:
    av = a[...] if hasattr(a, "shape") and not isinstance(a, jax.Array) else a
    av = av.T if trans_a else av
    bv = b[...].T if trans_b else b[...]
    out = acc + jnp.dot(av.astype(jnp.float32), bv.astype(jnp.float32))
    if during is not None:
      during()
    return out
  a = plgpu.transpose_ref(a, (1, 0)) if trans_a else a
  b = plgpu.transpose_ref(b, (1, 0)) if trans_b else b

  def body(ref):
    plgpu.wgmma(ref, a, b)
    if during is not None:
      during()

  return pl.run_state(body)(plgpu.ACC.init(acc))


_PAIRED = True  # issue independent backward products together, one wait (tuning switch)


def _mma2(acc1, a1, b1, acc2, a2, b2, interpret, trans_b=(False, False)):
  """Two independent products issued back to back with a single wait (fewer pipeline drains)."""
  if interpret or not _PAIRED:
    return (
      _mma(acc1, a1, b1, interpret, trans_b=trans_b[0]),
      _mma(acc2, a2, b2, interpret, trans_b=trans_b[1]),
    )
  t = [plgpu.transpose_ref(b, (1, 0)) if tb else b for b, tb in zip((b1, b2), trans_b)]

  def body(refs):
    plgpu.wgmma(refs[0], a1, t[0])
    plgpu.wgmma(refs[1], a2, t[1])

  return pl.run_state(body)((plgpu.ACC.init(acc1), plgpu.ACC.init(acc2)))


def _mma_sum(acc, pairs, interpret):
  """acc + sum of a^T @ b over (a, b) in pairs() (smem refs), issued together, one wait.

  pairs is called where the refs are used: views with static indices closed over by the wgmma
  body would enter it as constants, which Mosaic GPU's lowering does not take.
  """
  if interpret:
    for a, b in pairs():
      acc = _mma(acc, a, b, interpret, trans_a=True)
    return acc

  def body(ref):
    for a, b in pairs():
      plgpu.wgmma(ref, plgpu.transpose_ref(a, (1, 0)), b)

  return pl.run_state(body)(plgpu.ACC.init(acc))


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def _tiled_smem(shape, dtype):
  swizzle = 128 if shape[-1] * jnp.dtype(dtype).itemsize >= 128 else 64
  return plgpu.SMEM(
    shape,
    dtype,
    transforms=(
      plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
      plgpu.SwizzleTransform(swizzle),
    ),
  )


# ----------------------------------------------------------------------------------------------
# Forward.
#
# The consumers' schedule on the tensor cores (`schedule=`, default `FWD_SCHEDULE`); each keeps
# the results exact and differs only in which waits sit between the products:
# - "rendezvous": one two-party barrier, met twice per tile (after the QK^T issue and before the
#   PV issue); consumer 1 starts one meeting late, so the two take turns.
# - "handoff": FlashAttention-3's ping-pong (section 3.1) as two one-way barriers: a consumer
#   hands the tensor cores over right after issuing QK^T and waits for its own turn only before
#   PV, so its softmax never waits for the other consumer's.
# - "paired": the handoff with PV of tile j - 1 and QK^T of tile j issued back to back in one
#   turn and awaited together, so the tensor cores get both products of a consumer's turn
#   without the wait-and-reissue gap between them (P and V of tile j - 1 stay live one tile longer).
# - "overlap": "paired" plus FlashAttention-3's intra-warpgroup overlap (section 3.2): QK^T of
#   tile j is awaited alone and its softmax runs while PV of tile j - 1 is still on the tensor
#   cores (more live registers: S, O and two P tiles).
SCHEDULES = ("rendezvous", "handoff", "paired", "overlap")
FWD_SCHEDULE = "paired"
# True: the softmax scale (with log2 e) multiplies the row max and enters exp2's argument as one
# fused multiply-add, s * c - m, instead of a separate pass s * c over the tile (needs scale > 0).
FOLD_SCALE = True
# True: a K tile and its key indices land on one barrier (two copies, one wait per tile instead
# of two), and a consumer's last wait on its output stores covers only their reads of smem.
LEAN_SYNC = True
_SMEM_BYTES = 227 * 1024  # shared memory one CTA may take on sm_90


def _forward_smem_bytes(h: int, bk: int, stages: int, itemsize: int = 2) -> int:
  """Shared memory of the forward kernel: Q of both consumers, K / V / key-index stages, rows."""
  return _WGS * _ROWS * h * itemsize + stages * bk * (2 * h * itemsize + 4) + 3 * _WGS * _ROWS * 4


def _forward(p: _Plan, q, k, v, lo, hi, kid):
  """Padded operands -> (o [B, T_pad, N, H], lse float32[B, N, T_pad])."""
  b, _, n, h = q.shape
  bq, bk, st, dtype = _ROWS, p.bk, p.stages, q.dtype
  k_range, _ = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = _cta_ranges(k_range)
  n_cta = p.t_pad // (bq * _WGS)
  c = p.scale * _LOG2E
  turns = p.schedule != "rendezvous"  # one-way barriers, one per consumer
  paired = p.schedule in ("paired", "overlap")

  def kernel(rng_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref, scoped):
    (q_smem2, k_smem, v_smem, kid_smem, lo_smem2, hi_smem2, lse_smem2), bars = scoped
    q_bars, lo_bars, hi_bars, k_bars, v_bars, kid_bars, k_free, v_free, sched = bars
    if p.lean_sync:
      kid_bars = k_bars  # two arrivals: K's copy and the key indices' copy
    bi = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = n_cta - 1 - lax.axis_index("q_seq")  # longest (causal) rows first: a shorter tail
    wg = lax.axis_index("wg")
    rng = [rng_ref[bi, tile, i] for i in range(10)]
    c0, c1 = rng[0], rng[1]

    def sched_sync():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    def hand_over():  # "handoff" / "paired": the other consumer's turn may begin
      plgpu.barrier_arrive(sched.at[1 - wg])

    def take_turn():  # ... and this one waits for its own
      plgpu.barrier_wait(sched.at[wg])

    def wait_turn():  # before PV: the turn ("handoff") or the second meeting ("rendezvous")
      if turns:
        take_turn()
      else:
        plgpu.barrier_wait(sched)

    @pl.when(wg < _WGS)
    def _consumer():
      plgpu.set_max_registers(232 if h <= 128 else 240, action="increase")
      q_smem, lo_smem, hi_smem, lse_smem = (
        q_smem2.at[wg],
        lo_smem2.at[wg],
        hi_smem2.at[wg],
        lse_smem2.at[wg],
      )
      row0 = tile * (bq * _WGS) + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), head], q_smem, q_bars.at[wg])
      plgpu.copy_gmem_to_smem(lo_ref.at[bi, pl.ds(row0, bq)], lo_smem, lo_bars.at[wg])
      plgpu.copy_gmem_to_smem(hi_ref.at[bi, pl.ds(row0, bq)], hi_smem, hi_bars.at[wg])
      for bar in (q_bars, lo_bars, hi_bars):
        plgpu.barrier_wait(bar.at[wg])
      row_lo, row_hi = _vec(lo_smem, 1, p.interpret), _vec(hi_smem, 1, p.interpret)
      w = [jnp.where(wg == 0, rng[2 + i], rng[6 + i]) for i in range(4)]

      wgmma = plgpu.Layout.WGMMA
      row = wgmma.reduce(1)
      acc = _zeros((bq, h), wgmma, p.interpret)
      m = _zeros((bq,), row, p.interpret, -jnp.inf)
      l = _zeros((bq,), row, p.interpret)

      def wait_k(j):
        slot = lax.rem(j - c0, st)
        plgpu.barrier_wait(k_bars.at[slot])
        if not p.lean_sync:
          plgpu.barrier_wait(kid_bars.at[slot])

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
          key = _bcast(_vec(kid_smem.at[slot], 0, p.interpret), (bq, bk), 1)
          ok = (_bcast(row_lo, (bq, bk), 0) <= key) & (key <= _bcast(row_hi, (bq, bk), 0))
          s = jnp.where(ok, s, -jnp.inf)
        plgpu.barrier_arrive(k_free.at[slot])
        return s

      def softmax(s, m, l, mode, acc=None):
        """Online softmax of one tile in base 2: (acc * alpha, m, l, alpha, P in the input dtype).

        s: the product QK^T already times c (`fold_scale` off) or raw (on), masked. acc: None
        where the caller rescales it later (the paired schedules); else rescaled here, in the
        order of operations the default kernel was measured with.
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
          pr = jnp.exp2(s * c - _bcast(m_use, s.shape, 0))
        else:
          pr = jnp.exp2(s - _bcast(m_use, s.shape, 0))
        if acc is not None:
          acc = acc * _bcast(alpha, acc.shape, 0)
        l = l * alpha + pr.sum(axis=1)
        return acc, m_new, l, alpha, pr.astype(dtype)

      def scaled(s):
        return s if p.fold_scale else s * c

      def step(j, carry, mode):
        """One key tile, "rendezvous" or "handoff": QK^T, softmax, PV."""
        acc, m, l = carry
        slot = lax.rem(j - c0, st)
        if mode == "skip":
          if turns:
            hand_over()
          else:
            sched_sync()
          plgpu.barrier_arrive(k_free.at[slot])
          if not turns:
            plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(v_bars.at[slot])
          wait_turn()
          plgpu.barrier_arrive(v_free.at[slot])
          prefetch_wait(j)
          return acc, m, l

        zero = _zeros((bq, bk), wgmma, p.interpret)
        after_issue = hand_over if turns else sched_sync
        s = _mma(zero, q_smem, k_smem.at[slot], p.interpret, after_issue, trans_b=True)
        s = masked(scaled(s), slot, mode)
        acc, m_new, l, _, p16 = softmax(s, m, l, mode, acc)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        if not turns:
          plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bars.at[slot])
        wait_turn()
        acc = _mma(acc, p16, v_smem.at[slot], p.interpret, lambda: prefetch_wait(j))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      def paired_step(j, carry, own, pending, mode):
        """One key tile, "paired" / "overlap": in one turn, PV of the previous tile (`pending`:
        it was this consumer's) and QK^T of this one (`own`); its PV goes with the next turn."""
        acc, m, l, p_prev = carry
        slot, prev = lax.rem(j - c0, st), lax.rem(j - 1 - c0 + st, st)  # prev: when pending
        if pending:
          plgpu.barrier_wait(v_bars.at[prev])
        take_turn()

        def issued():
          hand_over()
          prefetch_wait(j)

        if own:
          s, acc, (m, l, alpha, p_new) = _qk_pv(
            p,
            q_smem,
            k_smem.at[slot],
            acc,
            p_prev if pending else None,
            v_smem.at[prev],
            issued,
            lambda s: softmax(masked(scaled(s), slot, mode), m, l, mode)[1:],
            (m, l, m, p_prev),
          )
          acc = acc * _bcast(alpha, acc.shape, 0)
          p_prev = p_new
        elif pending:
          acc = _mma(acc, p_prev, v_smem.at[prev], p.interpret, issued)
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
          acc = _mma(acc, p_prev, v_smem.at[last], p.interpret, hand_over)
          plgpu.barrier_arrive(v_free.at[last])
        else:
          hand_over()
        return acc, m, l, p_prev

      if paired:
        pl.when(wg == 1)(hand_over)  # consumer 0 takes the first turn
        p16 = _zeros((bq, bk), wgmma, p.interpret).astype(dtype)
        carry = _run_range_paired(c0, c1, w, paired_step, (acc, m, l, p16))
        fin = ((w[0] < w[3]) & (w[3] == c1)).astype(jnp.int32)
        carry = lax.fori_loop(0, fin, functools.partial(final_turn, pending=True), carry)
        carry = lax.fori_loop(fin, 1, functools.partial(final_turn, pending=False), carry)
        acc, m, l, _ = carry
        pl.when(wg == 0)(take_turn)  # consumer 1's last hand-over
      else:
        pl.when(wg == 1)(take_turn if turns else sched_sync)
        acc, m, l = _run_range(c0, c1, w, step, (acc, m, l))
        pl.when(wg == 0)(hand_over if turns else sched_sync)

      some = l > 0.0
      inv = jnp.where(some, 1.0 / jnp.where(some, l, 1.0), 0.0)
      q_smem[...] = (acc * _bcast(inv, acc.shape, 0)).astype(dtype)
      lse_smem[...] = jnp.where(some, (m + jnp.log2(jnp.where(some, l, 1.0))) * _LN2, -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(row0, bq), head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, pl.ds(row0, bq)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=p.lean_sync)

    @pl.when(wg == _WGS)
    def _producer():
      kv = ((k_ref, k_smem, k_bars), (kid_ref, kid_smem, kid_bars), (v_ref, v_smem, v_bars))
      kv_head = lax.div(head, jnp.int32(p.groups))
      if paired:
        _produce_kv_split(bi, kv_head, bk, c0, c1, st, kv, (k_free, v_free))
      else:
        _produce_kv(bi, kv_head, bk, c0, c1, st, kv, (k_free, v_free))

  def entry(rng_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref):
    smem = (
      _tiled_smem((_WGS, bq, h), dtype),
      _tiled_smem((st, bk, h), dtype),
      _tiled_smem((st, bk, h), dtype),
      plgpu.SMEM((st, bk), jnp.int32),
      plgpu.SMEM((_WGS, bq), jnp.int32),
      plgpu.SMEM((_WGS, bq), jnp.int32),
      plgpu.SMEM((_WGS, bq), jnp.float32),
    )
    bars = (
      plgpu.Barrier(num_barriers=_WGS),
      plgpu.Barrier(num_barriers=_WGS),
      plgpu.Barrier(num_barriers=_WGS),
      plgpu.Barrier(num_arrivals=2 if p.lean_sync else 1, num_barriers=st),
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_barriers=st),  # key indices (unused with lean_sync)
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=st),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=st),
      # Turns: one one-way barrier per consumer; else one two-party barrier.
      plgpu.Barrier(num_barriers=_WGS) if turns else plgpu.Barrier(num_arrivals=_WGS),
    )
    pl.run_scoped(
      lambda *scoped: kernel(
        rng_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref, scoped
      ),
      smem,
      bars,
      collective_axes="wg",
    )

  return _launch(
    entry,
    "lcv_hopper_fwd",
    (
      jax.ShapeDtypeStruct(q.shape, dtype),
      jax.ShapeDtypeStruct((b, n, p.t_pad), jnp.float32),
    ),
    (n, n_cta, b),
    "q_seq",
    p,
  )(ranges, q, k, v, lo, hi, kid)


def _qk_pv(p: _Plan, q_smem, k_smem, acc, p_prev, v_smem, issued, softmax, state):
  """One turn of the paired schedules: S = Q K^T (and acc += p_prev V when p_prev is given)
  issued back to back; `issued` runs once both are on the tensor cores, then
  softmax(S) -> state (m, l, alpha, P). Returns (S, acc, state).

  "paired" awaits both products, then runs the softmax. "overlap" issues QK^T first, awaits it
  alone and runs the softmax while PV is still in flight (FlashAttention-3 section 3.2); the
  state then passes through refs of the same shapes (`state`: initial values).
  In the interpreter both are the same sequence of plain float32 dots.
  """
  bq, bk = q_smem.shape[0], k_smem.shape[0]
  zero = _zeros((bq, bk), plgpu.Layout.WGMMA, p.interpret)
  if p.interpret:
    s = _mma(zero, q_smem, k_smem, p.interpret, trans_b=True)
    if p_prev is not None:
      acc = _mma(acc, p_prev, v_smem, p.interpret)
    issued()
    return s, acc, softmax(s)
  k_t = plgpu.transpose_ref(k_smem, (1, 0))
  if p.schedule == "paired" or p_prev is None:

    def body(refs):
      acc_ref, s_ref = refs
      if p_prev is not None:
        plgpu.wgmma(acc_ref, p_prev, v_smem)
      plgpu.wgmma(s_ref, q_smem, k_t)
      issued()

    acc, s = pl.run_state(body)((plgpu.ACC.init(acc), plgpu.ACC.init(zero)))
    return s, acc, softmax(s)

  def body_overlap(refs):
    acc_ref, s_ref, *state_refs = refs
    plgpu.wgmma(s_ref, q_smem, k_t)
    plgpu.wgmma(acc_ref, p_prev, v_smem)
    issued()
    s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # QK^T done, PV may still run
    for ref, x in zip(state_refs, softmax(s)):
      ref[...] = x

  acc, s, *state = pl.run_state(body_overlap)((plgpu.ACC.init(acc), plgpu.ACC.init(zero), *state))
  return s, acc, tuple(state)


def _run_range_paired(c0, c1, w, step, carry):
  """`_run_range` for the paired schedules: seven loops with (own, pending, mode) fixed per loop.

  A tile's PV runs in the next tile's turn, so the warpgroup's first tile has none pending (it
  is masked even when full: the same values) and the tile after its range carries its last PV
  (when its range ends at c1, the final turn does).
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
    body = functools.partial(step, own=own, pending=pending, mode=mode)
    carry = lax.fori_loop(lo, hi, body, carry)
  return carry


def _produce_kv_split(bi, kv_head, bk, c0, c1, stages, kv, free_bars):
  """`_produce_kv` that waits for a stage's K slot and V slot separately.

  The paired schedules free V of tile j only in the turn of tile j + 1, after they have waited
  for K of tile j + 1: that K must not wait for the V slot too.
  """
  plgpu.set_max_registers(40, action="decrease")
  k_free, v_free = free_bars

  def copy(j, slot, parts):
    rows = pl.ds(j * bk, bk)
    for gmem, smem, bars in parts:
      src = gmem.at[bi, rows] if len(gmem.shape) == 2 else gmem.at[bi, rows, kv_head]
      plgpu.copy_gmem_to_smem(src, smem.at[slot], bars.at[slot])

  for i in range(stages):

    @pl.when(c0 + i < c1)
    def _(i=i):
      copy(c0 + i, i, kv)

  @pl.loop(c0 + stages, jnp.maximum(c1, c0 + stages))
  def _(j):
    slot = lax.rem(j - c0, stages)
    plgpu.barrier_wait(k_free.at[slot])
    copy(j, slot, kv[:2])  # K and its key indices
    plgpu.barrier_wait(v_free.at[slot])
    copy(j, slot, kv[2:])

  for i in range(stages):  # drain, as in `_produce`
    j = c1 - stages + i

    @pl.when(j >= c0)
    def _(j=j):
      for bar in free_bars:
        plgpu.barrier_wait(bar.at[lax.rem(j - c0, stages)])


def _forward_options(p: _Plan, schedule, fold_scale, block_kv, stages, lean_sync=None) -> _Plan:
  """The plan with the forward's variants of one call (None keeps the plan's), checked."""
  schedule = p.schedule if schedule is None else schedule
  fold_scale = p.fold_scale if fold_scale is None else bool(fold_scale)
  lean_sync = p.lean_sync if lean_sync is None else bool(lean_sync)
  bk = p.bk if block_kv is None else block_kv
  st = p.stages if stages is None else stages
  if schedule not in SCHEDULES:
    raise ValueError(f"{schedule=} must be one of {SCHEDULES}")
  if bk not in (64, 128):
    raise ValueError(f"{block_kv=} must be 64 or 128 (the forward's key tile)")
  if not isinstance(st, int) or st < 2:
    raise ValueError(f"{stages=} must be an int >= 2 (a tile's K is awaited while another loads)")
  if fold_scale and not p.scale > 0:
    raise ValueError(f"fold_scale=True needs scale > 0 (got {p.scale}); pass fold_scale=False")
  need = _forward_smem_bytes(p.h, bk, st)
  if need > _SMEM_BYTES - 4096:  # barriers, reduction scratch and alignment take the rest
    raise ValueError(
      f"{stages=} stages of {bk}-key tiles at H={p.h} need {need} bytes of shared memory, more "
      f"than the {_SMEM_BYTES - 4096} left per CTA: use fewer stages or block_kv=64"
    )
  return dataclasses.replace(
    p, schedule=schedule, fold_scale=fold_scale, lean_sync=lean_sync, bk=bk, stages=st
  )


# ----------------------------------------------------------------------------------------------
# Backward: dQ (K/V tiles streamed over a query tile's range) and dK/dV (query-side tiles streamed
# over a key tile's range, for every head of the GQA group). delta = rowsum(dO * O) - dlse, lse2
# the base-2 lse with +inf on empty rows (so P = 0 there), as in `flash_gpu`.


def _dq(p: _Plan, q, k, v, do, lse2, delta, lo, hi, kid):
  """Padded operands -> dq [B, T_pad, N, H] (scaled)."""
  b, _, n, h = q.shape
  bq, bk, st, dtype = _ROWS, p.bk, p.stages, q.dtype
  k_range, _ = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = _cta_ranges(k_range)
  n_cta = p.t_pad // (bq * _WGS)
  c = p.scale * _LOG2E

  def kernel(
    rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, kid_ref, dq_ref, scoped
  ):
    (q_smem2, do_smem2, f_smem, i_smem, k_smem, v_smem, kid_smem), bars = scoped
    row_bars, k_bars, v_bars, kid_bars, k_free, v_free = bars
    bi, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = n_cta - 1 - lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    rng = [rng_ref[bi, tile, i] for i in range(10)]
    c0, c1 = rng[0], rng[1]

    @pl.when(wg < _WGS)
    def _consumer():
      plgpu.set_max_registers(232 if h <= 128 else 240, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      lse_smem, dl_smem, lo_smem, hi_smem = (
        f_smem.at[0, wg],
        f_smem.at[1, wg],
        i_smem.at[0, wg],
        i_smem.at[1, wg],
      )
      row0 = tile * (bq * _WGS) + wg * bq
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
        plgpu.copy_gmem_to_smem(src, dst, row_bars.at[i * _WGS + wg])
      for i in range(len(srcs)):
        plgpu.barrier_wait(row_bars.at[i * _WGS + wg])
      lse_r, dl_r = _vec(lse_smem, 1, p.interpret), _vec(dl_smem, 1, p.interpret)
      row_lo, row_hi = _vec(lo_smem, 1, p.interpret), _vec(hi_smem, 1, p.interpret)
      w = [jnp.where(wg == 0, rng[2 + i], rng[6 + i]) for i in range(4)]
      dq = _zeros((bq, h), plgpu.Layout.WGMMA, p.interpret)
      shape = (bq, bk)

      def step(j, dq, mode):
        slot = lax.rem(j - c0, st)
        for bar in (k_bars, kid_bars, v_bars):
          plgpu.barrier_wait(bar.at[slot])
        if mode == "skip":
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
          return dq
        k_t = k_smem.at[slot]
        zero = _zeros(shape, plgpu.Layout.WGMMA, p.interpret)
        s, dp = _mma2(
          zero, q_smem, k_t, zero, do_smem, v_smem.at[slot], p.interpret, trans_b=(True, True)
        )
        s = s * c
        if mode == "mask":
          key = _bcast(_vec(kid_smem.at[slot], 0, p.interpret), shape, 1)
          ok = (_bcast(row_lo, shape, 0) <= key) & (key <= _bcast(row_hi, shape, 0))
          s = jnp.where(ok, s, -jnp.inf)
        pr = jnp.exp2(s - _bcast(lse_r, shape, 0))
        plgpu.barrier_arrive(v_free.at[slot])
        ds = pr * (dp - _bcast(dl_r, shape, 0))
        dq = _mma(dq, ds.astype(dtype), k_t, p.interpret)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      dq = _run_range(c0, c1, w, step, dq)
      q_smem[...] = (dq * p.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _WGS)
    def _producer():
      kv = ((k_ref, k_smem, k_bars), (kid_ref, kid_smem, kid_bars), (v_ref, v_smem, v_bars))
      _produce_kv(bi, lax.div(head, jnp.int32(p.groups)), bk, c0, c1, st, kv, (k_free, v_free))

  def entry(*refs):
    smem = (
      _tiled_smem((_WGS, bq, h), dtype),
      _tiled_smem((_WGS, bq, h), dtype),
      plgpu.SMEM((2, _WGS, bq), jnp.float32),
      plgpu.SMEM((2, _WGS, bq), jnp.int32),
      _tiled_smem((st, bk, h), dtype),
      _tiled_smem((st, bk, h), dtype),
      plgpu.SMEM((st, bk), jnp.int32),
    )
    bars = (
      plgpu.Barrier(num_barriers=6 * _WGS),
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_barriers=st),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=st),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=st),
    )
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, collective_axes="wg")

  return _launch(
    entry, "lcv_hopper_dq", jax.ShapeDtypeStruct(q.shape, dtype), (n, n_cta, b), "q_seq", p
  )(ranges, q, k, v, do, lse2, delta, lo, hi, kid)


def _dkv(p: _Plan, q, k, v, do, lse2, delta, lo, hi, kid, fused: bool = False):
  """Padded operands -> (dk, dv) [B, S_pad, K, H], summed over the GQA group (dk scaled).

  fused: also dQ (FlashAttention-3, arXiv 2407.08608, appendix B), returning (dq float32
  [B, T_pad, N, H] unscaled, dk, dv). Each consumer puts its dS^T tile [64 keys, 64 queries]
  in smem, where the dQ product reads it transposed (wgmma's M must be the query rows), and adds
  dQ_partial = dS K into a float32 buffer in global memory with a TMA reduce-add (bulk
  `cp.reduce.async.bulk .add`, atomic per element in L2). At H = 128 the two consumers share the
  work as FA3 does: after a barrier on both dS^T tiles, consumer w forms columns
  [w H/2, (w+1) H/2) of dQ over the CTA's 128 keys, so each (query tile, CTA) pair costs one
  float32 [64, H] reduce in total and a [64, H/2] accumulator per consumer; a consumer that skips
  the tile contributes a zero dS^T. At H = 64 (half a column block would be narrower than the
  128-byte swizzle) each consumer adds its own [64, H] partial over its 64 keys.
  Mosaic GPU's interpreter has no TMA reductions: there every consumer stores its partials into
  its own slice of a [key tiles, ...] buffer (it visits each query tile of a head at most once)
  and the slices are summed outside; the products and the staging are the same.
  """
  b, _, n, h = q.shape
  kh, g = k.shape[2], p.groups
  bk, bq, st, dtype = _ROWS, p.bq_dkv, p.stages, q.dtype
  _, q_range = flash_gpu.tile_ranges(lo, hi, kid, bq, bk)
  ranges = _cta_ranges(q_range)
  n_cta = p.s_pad // (bk * _WGS)
  c = p.scale * _LOG2E
  split = h % (64 * _WGS) == 0  # dQ columns split between the consumers (64-column blocks)
  hc = h // _WGS if split else h  # dQ columns per consumer

  def kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, kid_ref, *rest):
    *rest, scoped = rest
    dq_ref, dk_ref, dv_ref = rest if fused else (None, *rest)
    (k_smem2, v_smem2, kid_smem2, q_smem, do_smem, f_smem, i_smem, *dq_smem) = scoped[0]
    ds_smem2, dq_smem2 = dq_smem if fused else (None, None)
    kv_bars, q_bars, do_bars, lse_bars, dl_bars, lo_bars, hi_bars, q_free, *ds_bar = scoped[1]
    ds_ready = ds_bar[0] if ds_bar else None
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
      other = [jnp.where(wg == 0, rng[6 + i], rng[2 + i]) for i in (0, 3)]  # its tiles [first, end)
      shape = (bk, bq)
      wgmma = plgpu.Layout.WGMMA

      def add_dq(gi, j, slot):
        """dQ_partial of query tile j (head gi of the group) into the float32 buffer."""
        dq_smem, at = dq_smem2.at[wg], (bi, pl.ds(j * bq, bq), kv_head * g + gi)

        def product(pairs, cols):
          dq = _mma_sum(_zeros((bq, hc), wgmma, p.interpret), pairs, p.interpret)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store has read dq_smem
          dq_smem[...] = dq
          plgpu.commit_smem()
          if p.interpret:
            plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[(tile * _WGS + wg, *at, cols)])
          else:
            plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[(*at, cols)], reduction_op="add")

        if not split:
          product(lambda: [(ds_smem2.at[slot, wg], k_smem)], slice(None))
          return
        for cw in range(_WGS):  # static column blocks: one branch per consumer
          cols = pl.ds(cw * hc, hc)
          pairs = lambda c=cols: [(ds_smem2.at[slot, u], k_smem2.at[u, :, c]) for u in range(_WGS)]  # noqa: E731
          pl.when(wg == cw)(functools.partial(product, pairs, cols))

      def share_ds(ds, slot):
        """This consumer's dS^T into smem for the dQ products; `sync` waits for the other's."""
        ds_smem2.at[slot, wg][...] = ds
        plgpu.commit_smem()  # visible to the tensor cores (async proxy)

      def sync():
        plgpu.barrier_arrive(ds_ready)
        plgpu.barrier_wait(ds_ready)

      def step(j, carry, mode, gi):
        dk, dv = carry
        slot = lax.rem(gi * span + j - c0, st)
        for bar in (q_bars, do_bars, lse_bars, dl_bars, lo_bars, hi_bars):
          plgpu.barrier_wait(bar.at[slot])
        if mode == "skip":
          plgpu.barrier_arrive(q_free.at[slot])
          if fused and split:  # the other consumer's dQ columns still need a (zero) dS^T here
            share_ds(_zeros(shape, wgmma, p.interpret).astype(dtype), slot)
            sync()
            pl.when((other[0] <= j) & (j < other[1]))(lambda: add_dq(gi, j, slot))
          return dk, dv
        q_t, do_t = q_smem.at[slot], do_smem.at[slot]
        zero = _zeros(shape, wgmma, p.interpret)
        st_ = _mma(zero, k_smem, q_t, p.interpret, trans_b=True) * c  # S^T [keys, queries]
        if mode == "mask":
          kb = _bcast(key, shape, 0)
          lo_c = _bcast(_vec(i_smem.at[0, slot], 0, p.interpret), shape, 1)
          hi_c = _bcast(_vec(i_smem.at[1, slot], 0, p.interpret), shape, 1)
          st_ = jnp.where((lo_c <= kb) & (kb <= hi_c), st_, -jnp.inf)
        pt = jnp.exp2(st_ - _bcast(_vec(f_smem.at[0, slot], 0, p.interpret), shape, 1))
        dv, dpt = _mma2(dv, pt.astype(dtype), do_t, zero, v_smem, do_t, p.interpret, (False, True))
        dst = pt * (dpt - _bcast(_vec(f_smem.at[1, slot], 0, p.interpret), shape, 1))
        dst = dst.astype(dtype)
        if fused:
          share_ds(dst, slot)
        # dK += dS^T Q; the wait for the other consumer's dS^T overlaps it.
        dk = _mma(dk, dst, q_t, p.interpret, during=sync if fused and split else None)
        plgpu.barrier_arrive(q_free.at[slot])
        if fused:
          add_dq(gi, j, slot)
        return dk, dv

      def head_loop(gi, carry):
        carry = _run_range(c0, c1, w, functools.partial(step, gi=gi), carry)
        return carry

      zeros = _zeros((bk, h), wgmma, p.interpret)
      dk, dv = lax.fori_loop(0, g, head_loop, (zeros, zeros))
      if fused and split:
        sync()  # the other consumer's last dQ product has read our K tile: now it may take dK
      k_smem[...] = (dk * p.scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, rows, kv_head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, rows, kv_head])
      plgpu.wait_smem_to_gmem(0)  # also the last dQ reduce-adds

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
    if fused:  # dS^T per stage and consumer (bf16), dQ partial per consumer (float32)
      smem += (_tiled_smem((st, _WGS, bk, bq), dtype), _tiled_smem((_WGS, bq, hc), jnp.float32))
    bars = (
      plgpu.Barrier(num_barriers=3 * _WGS),
      *(plgpu.Barrier(num_barriers=st) for _ in range(6)),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=st),
    )
    if fused and split:
      bars += (plgpu.Barrier(num_arrivals=_WGS),)  # both dS^T tiles of a step are in smem
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, collective_axes="wg")

  kv = jax.ShapeDtypeStruct(k.shape, dtype)
  args = (ranges, q, k, v, do, lse2, delta, lo, hi, kid)
  if not fused:
    return _launch(entry, "lcv_hopper_dkv", (kv, kv), (kh, n_cta, b), "kv_seq", p)(*args)
  parts = (n_cta * _WGS,) if p.interpret else ()

  @jax.jit  # a Ref in a memory space exists only under jit (also when called eagerly)
  def fused_call(*args):
    dq = jax.new_ref(jnp.zeros((*parts, *q.shape), jnp.float32), memory_space=plgpu.GMEM)
    dk, dv = _launch(entry, "lcv_hopper_dkv_dq", (kv, kv), (kh, n_cta, b), "kv_seq", p, refs=True)(
      *args, dq
    )
    dq = dq[...]
    return (dq.sum(0) if p.interpret else dq), dk, dv

  return fused_call(*args)


def _launch(entry, name: str, out_type, grid, tile_axis: str, p: _Plan, refs: bool = False):
  """One CTA per (head, tile, batch): two consumer warpgroups and a producer ("wg" axis).

  name: the kernel's name in profiles (each of the kernels has its own).
  refs: some operands are `jax.Ref`s the kernel writes in place (the fused backward's dQ
  buffer). `plgpu.kernel` wraps its body in a batching rule that does not take Ref operands, so
  these launch through `pl.kernel` on the same Mosaic GPU mesh.
  """
  mesh = dict(
    grid=grid,
    grid_names=("heads", tile_axis, "batch"),
    num_threads=_WGS + 1,
    thread_name="wg",
    kernel_name=name,
  )
  params = plgpu.CompilerParams(approx_math=True)
  if refs:
    return pl.kernel(
      entry,
      out_type=out_type,
      mesh=plgpu.Mesh(**mesh),
      compiler_params=params,
      interpret=p.interpret or False,
      name=name,
    )
  return plgpu.kernel(
    entry, out_type=out_type, compiler_params=params, interpret=p.interpret, **mesh
  )


def _run_range(c0, c1, w, step, carry):
  """A consumer's pass over its CTA's tile range [c0, c1): five loops, the mode fixed per loop.

  w = (first, full first, full end, end) of the warpgroup's own tiles, inside [c0, c1]: tiles
  outside them are stepped over ("skip": barrier traffic only), boundary tiles are masked, the run
  of full tiles does no mask arithmetic.
  """
  bounds = (c0, *w, c1)
  for i, mode in enumerate(("skip", "mask", "full", "mask", "skip")):
    carry = lax.fori_loop(bounds[i], bounds[i + 1], functools.partial(step, mode=mode), carry)
  return carry


def _produce_kv(bi, kv_head, bk, c0, c1, stages, kv, free_bars):
  """Producer of the forward and dQ kernels: K, key indices and V tiles c0..c1-1 of one kv head.

  kv: ((gmem, smem, loaded barriers) for K, key indices, V); the key-index gmem is [B, S].
  """
  plgpu.set_max_registers(40, action="decrease")

  def load(j, slot):
    rows = pl.ds(j * bk, bk)
    for gmem, smem, bars in kv:
      src = gmem.at[bi, rows] if len(gmem.shape) == 2 else gmem.at[bi, rows, kv_head]
      plgpu.copy_gmem_to_smem(src, smem.at[slot], bars.at[slot])

  _produce(c0, c1, stages, load, free_bars)


def _produce(c0, c1, stages, load, free_bars):
  """Producer warpgroup: tiles c0..c1-1 into a ring of `stages` slots, waiting for free slots."""
  for i in range(stages):

    @pl.when(c0 + i < c1)
    def _(i=i):
      load(c0 + i, i)

  @pl.loop(c0 + stages, jnp.maximum(c1, c0 + stages))
  def _(j):
    slot = lax.rem(j - c0, stages)
    for bar in free_bars:
      plgpu.barrier_wait(bar.at[slot])
    load(j, slot)

  # Drain: wait for the consumers to free the last stages too, so every phase of every barrier
  # is observed (the interpreter checks this) and no copy can target smem after the kernel ends.
  for i in range(stages):
    j = c1 - stages + i

    @pl.when(j >= c0)
    def _(j=j):
      for bar in free_bars:
        plgpu.barrier_wait(bar.at[lax.rem(j - c0, stages)])


# ----------------------------------------------------------------------------------------------
# Public API: the contract of `flash_gpu` (docs/internals.md).


def _check(q, k, v, q_lo, q_hi, k_idx) -> None:
  flash_gpu._check(q, k, v, q_lo, q_hi, k_idx)
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"{q.dtype=} must be bfloat16 or float16 for the Hopper kernels")
  if q.shape[-1] not in HEAD_DIMS:
    raise ValueError(
      f"head dim H={q.shape[-1]} must be one of {HEAD_DIMS} for the Hopper kernels (other head "
      "dims run the portable kernel, lcv.kernels.flash_gpu)"
    )


def _forward_trimmed(p, q, k, v, q_lo, q_hi, k_idx):
  o, lse = _forward(p, *_prepare(p, q, k, v, q_lo, q_hi, k_idx))
  return o[:, : p.t], lse[:, :, : p.t]


def forward(
  q,
  k,
  v,
  q_lo,
  q_hi,
  k_idx,
  *,
  scale=None,
  interpret=None,
  schedule=None,
  fold_scale=None,
  block_kv=None,
  stages=None,
  lean_sync=None,
):
  """Masked attention forward, no VJP; arguments and results as `flash_gpu.forward`.

  The kernel's variants (same results; for measuring): schedule, one of `SCHEDULES` (None:
  `FWD_SCHEDULE`); fold_scale, lean_sync (None: `FOLD_SCALE`, `LEAN_SYNC`); block_kv, the key
  tile (64 or 128) and stages, the depth of the K/V ring (None: 128 and 2, as the backward's).
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, interpret)
  p = _forward_options(p, schedule, fold_scale, block_kv, stages, lean_sync)
  return _forward_trimmed(p, q, k, v, q_lo, q_hi, k_idx)


def _backward_impl(p, q, k, v, o, lse, do, dlse, q_lo, q_hi, k_idx):
  delta = flash_gpu._delta(o, do, dlse)
  qp, kp, vp, lo, hi, kid = _prepare(p, q, k, v, q_lo, q_hi, k_idx)
  pad = flash_gpu._pad_axis
  dop = pad(do.astype(q.dtype), 1, p.t_pad)
  lse2 = flash_gpu._lse2(pad(lse.astype(jnp.float32), 2, p.t_pad, -jnp.inf))
  delta = pad(delta, 2, p.t_pad)
  args = (qp, kp, vp, dop, lse2, delta, lo, hi, kid)
  if p.fused_dq:
    dq, dk, dv = _dkv(p, *args, fused=True)
    dq = (dq[:, : p.t] * p.scale).astype(q.dtype)  # the float32 sum, scaled and cast once
  else:
    from lcv.kernels import hopper_dkv  # builds on this module's helpers

    dq = _dq(p, *args)[:, : p.t]
    # The pipelined dK/dV schedule: 4.5-7.5% faster than `_dkv` on an H200 (NOTES.md).
    dk, dv = hopper_dkv.dkv(p, *args, variant="pipelined")
  return dq, dk[:, : p.s], dv[:, : p.s]


def backward(q, k, v, o, lse, do, q_lo, q_hi, k_idx, *, scale=None, interpret=None, fused_dq=None):
  """Gradients from the row's final (o, lse); arguments and results as `flash_gpu.backward`.

  fused_dq: the single-kernel backward (True) or the dQ + dK/dV pair (False); None takes
  `FUSED_DQ`.
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, interpret, fused_dq)
  return _backward_impl(p, q, k, v, o, lse, do, None, q_lo, q_hi, k_idx)


_attention = with_vjp(_forward_trimmed, _backward_impl)


def attention(q, k, v, q_lo, q_hi, k_idx, *, scale=None, interpret=None, fused_dq=None):
  """Differentiable masked attention (custom VJP, lse cotangent too); as `flash_gpu.attention`.

  fused_dq picks the backward as in `backward`.
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, interpret, fused_dq)
  return _attention(q, k, v, q_lo, q_hi, k_idx, p)


def attention_reference(q, k, v, q_lo, q_hi, k_idx, *, scale=None):
  """Dense float32 twin of `attention` (the same as `flash_gpu.attention_reference`)."""
  return flash_gpu.attention_reference(q, k, v, q_lo, q_hi, k_idx, scale=scale)
