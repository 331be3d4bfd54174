"""The warp-specialized pipeline that the Hopper attention kernels share (Mosaic GPU, sm_90).

Every kernel of `flash_hopper` has FlashAttention-3's structure (arXiv 2407.08608, section 3):
one CTA holds 128 rows (query rows in the forward and dQ kernels, key rows in the dK/dV kernel)
as two *consumer* warpgroups of 64 rows each (the forward at H = 64: three, 192 rows; the dQ
kernel at H = 256: one), plus one *producer* warpgroup that streams the other side's tiles into
a ring of shared-memory stages with the bulk tensor copy engine (TMA), each stage guarded by a
"loaded" and a "free" barrier. This module holds what they share:

- `Plan`, the static facts of one call, and `prepare`, the padded operands;
- `cta_ranges`: the per-CTA tile ranges from `flash_gpu.tile_ranges`, and `run_range` /
  `run_range_carried`, a consumer's pass over them as loops with the tile mode fixed per loop;
- `produce` / `produce_kv` / `drain` / `copy_kv`: the producer warpgroup's loop over the ring
  of stages, and `one_warp`, which runs a producer in one warp of its warpgroup;
- `mma` / `issue`: wgmma with a float32 accumulator in registers (plain dots in the interpreter),
  `vec` / `zeros` / `bcast` for values in wgmma layouts, `tiled_smem` for swizzled tiles;
- `launch`: one CTA per (head, tile, batch) with the three warpgroups.

On a CPU backend the kernels run in Mosaic GPU's interpreter, which has no layouts, no transposed
wgmma operands and no accumulator updates: there the products are plain float32 dots of the same
operands. The interpreter checks the pipeline (barriers, slots, ranges, masks, softmax); the
lowering for a CUDA target and the GPU tests check the wgmma forms.
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
from lcv.kernels import flash_gpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROWS = 64  # query rows (forward, dQ) or key rows (dK/dV) of one consumer warpgroup
WGS = 2  # consumer warpgroups per CTA
# Registers per thread: the producer only issues copies and gives most of its share to the
# consumers' accumulators (FA3 section 3.1, `setmaxnreg`). Two splits of the 64K registers of
# an SM among 3 x 128 threads, each kernel taking the one measured faster on an H200
# (benchmarks/NOTES.md, "Eighth round"): 232 / 40 for the forward and the pipelined dK/dV
# schedule; FA3's 240 / 24 for the dQ kernel and the fused backward (whose schedule, serial in
# each consumer, was 2-4% faster with it in the split dK/dV kernel it grew from; the dQ kernel
# 4-5% with it and its overlap together; the other two 0-3% slower).
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
WIDE_REGISTERS = (240, 24)  # (consumer, producer)
# A CTA of one consumer and the producer (the dQ kernel at H = 256, 2 x 128 threads) has room
# for setmaxnreg's ceiling, 256, per consumer thread. That kernel spills either way (ptxas: 592
# bytes of spill stores at 240, 344 at 256); 256 made it 3-6% faster on an H200, bitwise equal
# (benchmarks/NOTES.md, "Tenth round").
SOLO_REGISTERS = (256, 24)
# Three consumers and the producer (the forward at H <= 64, `Plan.fwd_consumers`): 4 x 128
# threads share the 64K registers, FA3's split for its three-consumer forward.
TRIO_REGISTERS = (160, 32)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static facts of one call (padded lengths, tiles, ring depths) for the Mosaic GPU kernels."""

  t: int
  s: int
  fwd_consumers: int  # consumer warpgroups (64 query rows each) of a forward CTA
  t_pad: int
  s_pad: int
  h: int
  groups: int  # query heads per kv head (GQA)
  bk: int  # key tile of the forward and dQ kernels
  stages: int  # K/V ring of the forward and dQ kernels
  stages_dkv: int  # query-side ring of the dK/dV kernel (holds a tile one step longer)
  scale: float
  interpret: object

  @property
  def fold_scale(self) -> bool:
    """Whether the forward folds the softmax scale into exp2's argument: only for scale > 0,
    where the row max commutes with the scaling."""
    return self.scale > 0

  @property
  def fused_backward(self) -> bool:
    """Whether the backward runs as one kernel (`hopper_fused_backward`, 5 products per tile
    pair) instead of the dQ and dK/dV kernels (7): at H = 64 (on an H100 4-7% faster than the
    split pair without GQA, 9-14% with it) and at H = 128 without GQA (2-5% faster on an H200;
    with GQA the split pair's pipelined dK/dV schedule was level to 5% faster, and with the
    fused kernel's merged query barrier fwd+bwd still read 0.98-1.04x the split pair's; with its
    one-warp producer the fused kernel alone is 4-5% faster there, fwd+bwd not yet compared).
    H = 256 has no fused form (benchmarks/NOTES.md, "Thirteenth", "Sixteenth", "Seventeenth",
    "Twenty-second round")."""
    return self.h == 64 or (self.h == 128 and self.groups == 1)

  @property
  def dq_consumers(self) -> int:
    """Consumer warpgroups of the dQ kernel: two, or one at H = 256, where two consumers' Q and
    dO tiles (128 KB) and a 2-stage K/V ring of 64-key tiles (128 KB) would not fit in the
    227 KB of shared memory of an H100 / H200 SM."""
    return WGS if self.h <= 128 else 1


def plan(q, k, scale, interpret, fwd_consumers: int | None = None) -> Plan:
  """The plan of a call on q [B, T, N, H], k [B, S, K, H] (H in 64, 128, 256: `flash_hopper`).

  A forward CTA has two consumer warpgroups, three at H = 64 (FA3's 192-row tile there): a
  consumer then holds O [64, 64], S [64, 128] and P in 160 registers, and a third one keeps the
  tensor cores busy while two run their softmax. On an H200 that forward ran 8-15% faster
  than with two (benchmarks/NOTES.md, "Twelfth round"). T is padded to whole CTAs of both
  passes (384 rows at H = 64). In Mosaic GPU's interpreter the default stays two: there each
  warpgroup is a thread running its own XLA CPU computation, and with one CPU device on a
  2-core host a CTA of four threads stalled in its barrier waits (8 devices ran it).
  `fwd_consumers` overrides the default (2 or 3; tests run both in the interpreter).

  Key tiles are 128 wide, 64 at H = 256, where a forward consumer holds O [64, 256] in float32
  (128 registers per thread) and S of a 128-key tile would take 64 more (H200: 659-691 TFLOP/s
  at 16K causal with 64-key tiles, 1.06-1.11x cuDNN, benchmarks/NOTES.md). The backward's
  query tiles (the dK/dV and fused kernels stream them past 128 key rows) are 64 rows."""
  _, t, n, h = q.shape
  s = k.shape[1]
  bk = 128 if h <= 128 else 64
  tile = max(ROWS * WGS, bk)
  if interpret is None and jax.default_backend() != "gpu":
    # Mosaic GPU's interpreter parameters live in a private module: imported only off GPU.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    interpret = InterpretGPUParams()
  if fwd_consumers is None:
    fwd_consumers = 3 if h <= 64 and not interpret else WGS
  if fwd_consumers not in (WGS, 3) or (fwd_consumers == 3 and h > 64):
    raise ValueError(f"{fwd_consumers=} must be 2, or 3 at head dim 64 ({h=})")
  # Query rows: whole forward CTAs and whole backward query tiles (384 at H = 64).
  q_tile = math.lcm(tile, ROWS * fwd_consumers)
  return Plan(
    t=t,
    s=s,
    fwd_consumers=fwd_consumers,
    t_pad=pl.cdiv(t, q_tile) * q_tile,
    s_pad=pl.cdiv(s, tile) * tile,
    h=h,
    groups=n // k.shape[2],
    bk=bk,
    stages=2,
    stages_dkv=3,
    scale=float(h**-0.5 if scale is None else scale),
    interpret=interpret or None,
  )


def prepare(p: Plan, q, k, v, q_lo, q_hi, k_idx):
  """Operands padded to the plan's lengths: padding rows get an empty interval (lo 0, hi -1),
  padding keys the index `masks.NO_KEY`, so neither contributes."""
  pad = flash_gpu._pad_axis
  q = pad(q, 1, p.t_pad)
  k, v = pad(k, 1, p.s_pad), pad(v, 1, p.s_pad)
  lo = pad(q_lo.astype(jnp.int32), 1, p.t_pad, 0)
  hi = pad(q_hi.astype(jnp.int32), 1, p.t_pad, -1)
  kid = pad(k_idx.astype(jnp.int32), 1, p.s_pad, masks.NO_KEY)
  return q, k, v, lo, hi, kid


def cta_ranges(r, wgs: int = WGS):
  """Per-warpgroup tile ranges [B, tiles, 4] -> per-CTA int32[B, tiles // wgs, 2 + 4 * wgs].

  Row layout: (cta first, cta end, then (first, full first, full end, end) of each of the `wgs`
  consumer warpgroups, at `own_column`), every warpgroup value clipped into the CTA range so the
  loops of a consumer partition exactly the tiles the producer loads; a warpgroup with no tiles
  gets an empty range.
  """
  b = r.shape[0]
  r = r.reshape(b, -1, wgs, 4)
  empty = r[..., 0] >= r[..., 3]
  big = jnp.iinfo(jnp.int32).max
  c0 = jnp.min(jnp.where(empty, big, r[..., 0]), axis=-1)
  c1 = jnp.max(jnp.where(empty, 0, r[..., 3]), axis=-1)
  none = jnp.all(empty, axis=-1)
  c0, c1 = jnp.where(none, 0, c0), jnp.where(none, 0, c1)
  w = jnp.where(empty[..., None], c0[..., None, None], r)
  w = jnp.clip(w, c0[..., None, None], c1[..., None, None]).reshape(b, -1, 4 * wgs)
  return jnp.concatenate([c0[..., None], c1[..., None], w], -1).astype(jnp.int32)


def own_column(wg, i: int):
  """The column of a `cta_ranges` row that holds value i of (first, full first, full end, end)
  of consumer `wg` (an int or a traced index)."""
  return 2 + 4 * wg + i


def own_range(rng, wg, wgs: int = WGS):
  """Consumer `wg`'s (first, full first, full end, end) from its CTA's `cta_ranges` row `rng`
  (a list of scalars)."""
  out = [rng[own_column(wgs - 1, i)] for i in range(4)]
  for other in range(wgs - 2, -1, -1):
    out = [jnp.where(wg == other, rng[own_column(other, i)], x) for i, x in enumerate(out)]
  return out


def run_range(c0, c1, w, step, carry):
  """A consumer's pass over its CTA's tile range [c0, c1): five loops, the mode fixed per loop.

  w = (first, full first, full end, end) of the warpgroup's own tiles, inside [c0, c1]: tiles
  outside them are stepped over ("skip": barrier traffic only, so both consumers stay in
  lockstep on the shared stages), boundary tiles are masked, the run of full tiles does no mask
  arithmetic. step(j, carry, mode) -> carry.
  """
  bounds = (c0, *w, c1)
  for i, mode in enumerate(("skip", "mask", "full", "mask", "skip")):
    carry = lax.fori_loop(bounds[i], bounds[i + 1], functools.partial(step, mode=mode), carry)
  return carry


def run_range_carried(c0, c1, w, step, carry, first_full: bool = False):
  """`run_range` for schedules that carry one product of a tile into the next tile's step (the
  forward's PV, the dK/dV kernel's dK): seven loops (eight with `first_full`), (own, pending,
  mode) fixed per loop.

  own: the tile is in the warpgroup's range; pending: the previous tile was, and its carried
  product runs in this step. The first own tile has nothing pending and the tile after the range
  carries its last product; when the range ends at c1, that product is left to the caller.
  step(j, carry, own, pending, mode) -> carry.

  The first own tile is masked even when it is full (the same values, one step body less)
  unless `first_full`: then a full first tile (a causal row's key tile 0) runs unmasked. The
  forward asks for it; the dK/dV kernel's first query tile is the diagonal on causal rows.
  """
  w0, w1, w2, w3 = w
  w0p = jnp.minimum(w0 + 1, w3)
  w1p, w2p = jnp.maximum(w1, w0p), jnp.maximum(w2, w0p)
  w3p = w3 + ((w0 < w3) & (w3 < c1)).astype(jnp.int32)
  w0m = jnp.where((w1 <= w0) & (w0 < w2), w0, w0p) if first_full else w0p
  first_full_loop = ((w0m, w0p, True, False, "full"),) if first_full else ()
  loops = (
    (c0, w0, False, False, "skip"),
    (w0, w0m, True, False, "mask"),
    *first_full_loop,
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


def produce(c0, c1, stages, load, free_bars):
  """Producer warpgroup: tiles c0..c1-1 into a ring of `stages` slots, waiting for free slots.

  load(j, slot) starts the copies of tile j into `slot`; free_bars: the barriers (one per slot)
  on which the consumers release a slot.
  """
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

  drain(c0, c1, stages, free_bars)


def drain(c0, c1, stages, free_bars):
  """The producer's last waits: the consumers free the last stages too, so every phase of every
  barrier is observed (the interpreter checks this) and no copy can target smem after the kernel
  ends."""
  for i in range(stages):
    j = c1 - stages + i

    @pl.when(j >= c0)
    def _(j=j):
      for bar in free_bars:
        plgpu.barrier_wait(bar.at[lax.rem(j - c0, stages)])


def copy_kv(bi, kv_head, bk, j, slot, kv):
  """TMA copies of key tile j into `slot`: kv = ((gmem, smem, loaded barriers), ...) for K, the
  key indices (gmem [B, S]) and V, in that order."""
  rows = pl.ds(j * bk, bk)
  for gmem, smem, bars in kv:
    src = gmem.at[bi, rows] if len(gmem.shape) == 2 else gmem.at[bi, rows, kv_head]
    plgpu.copy_gmem_to_smem(src, smem.at[slot], bars.at[slot])


def produce_kv(bi, kv_head, bk, c0, c1, stages, kv, free_bars, registers):
  """Producer of the dQ kernel: K, key indices and V tiles c0..c1-1 of one kv head; `registers`
  per producer thread (`setmaxnreg`)."""
  plgpu.set_max_registers(registers, action="decrease")
  produce(c0, c1, stages, lambda j, slot: copy_kv(bi, kv_head, bk, j, slot, kv), free_bars)


def one_warp(p: Plan, body, head_dims: tuple[int, ...]) -> None:
  """Runs a producer's `body()` in the first warp of its warpgroup at the head dims given (the
  other three warps exit; tokamax's forward producer does this), else in the whole warpgroup:
  32 threads poll and arrive on the stage barriers, not 128. Every copy, barrier wait and
  arrival has a warp form in Mosaic GPU (an arrival of one warp counts as its warpgroup's). Its
  interpreter runs no `warp_map`: there the warpgroup runs `body`."""
  if p.interpret or p.h not in head_dims:
    body()
  else:
    plgpu.warp_map(lambda warp: pl.when(warp == 0)(body))


def vec(ref, axis: int, interpret):
  """Load a smem vector laid out as one value per accumulator row (axis 1) or column (axis 0).

  Mosaic GPU's interpreter has no layouts (and no `plgpu.load`): a plain read there.
  """
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def zeros(shape, layout, interpret, fill=0.0):
  """A float32 register array in a wgmma layout (plain array in the interpreter)."""
  x = jnp.full(shape, fill, jnp.float32)
  return x if interpret else plgpu.layout_cast(x, layout)


def bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def mma(acc, a, b, interpret, during=None, trans_b=False):
  """acc + a @ op(b) on the tensor cores (op: transpose where asked): wgmma, float32 accumulator
  in registers.

  a: register array or smem ref, b: smem ref. `during` runs after the wgmma is issued and before
  its result is awaited (overlap with the next tile's barrier wait or a turn handed over).
  """
  if interpret:
    av = a[...] if hasattr(a, "shape") and not isinstance(a, jax.Array) else a
    bv = b[...].T if trans_b else b[...]
    out = acc + jnp.dot(av.astype(jnp.float32), bv.astype(jnp.float32))
    if during is not None:
      during()
    return out
  b = plgpu.transpose_ref(b, (1, 0)) if trans_b else b

  def body(ref):
    plgpu.wgmma(ref, a, b)
    if during is not None:
      during()

  return pl.run_state(body)(plgpu.ACC.init(acc))


def issue(products, interpret):
  """acc + a @ op(b) for each (acc, a, b, trans_b) of `products`, issued back to back as wgmma
  with one wait for all (fewer pipeline drains than a wait per product). Returns the tuple of
  results; a: register array (bf16 / fp16) or smem ref; b: smem ref (transposed where trans_b).
  """
  if interpret:
    outs = []
    for acc, a, b, trans_b in products:
      av = a if isinstance(a, jax.Array) else a[...]
      bv = b[...].T if trans_b else b[...]
      outs.append(acc + jnp.dot(av.astype(jnp.float32), bv.astype(jnp.float32)))
    return tuple(outs)
  if not products:
    return ()
  bs = [plgpu.transpose_ref(b, (1, 0)) if tb else b for _, _, b, tb in products]

  def body(refs):
    for ref, (_, a, _, _), b in zip(refs, products, bs):
      plgpu.wgmma(ref, a, b)

  return tuple(pl.run_state(body)(tuple(plgpu.ACC.init(x[0]) for x in products)))


def tiled_smem(shape, dtype):
  """Shared memory for a wgmma operand tile: 8-row tiles, swizzled by 128 bytes (64 for rows of
  64 bytes), the layout TMA writes and wgmma reads without bank conflicts."""
  swizzle = 128 if shape[-1] * jnp.dtype(dtype).itemsize >= 128 else 64
  return plgpu.SMEM(
    shape,
    dtype,
    transforms=(
      plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
      plgpu.SwizzleTransform(swizzle),
    ),
  )


def launch(entry, name: str, out_type, grid, tile_axis: str, p: Plan, consumers: int = WGS):
  """One CTA per (head, tile, batch): `consumers` consumer warpgroups and a producer ("wg" axis,
  the producer last).

  name: the kernel's name in profiles (each kernel has its own).
  """
  return plgpu.kernel(
    entry,
    out_type=out_type,
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=p.interpret,
    grid=grid,
    grid_names=("heads", tile_axis, "batch"),
    num_threads=consumers + 1,
    thread_name="wg",
    kernel_name=name,
  )
