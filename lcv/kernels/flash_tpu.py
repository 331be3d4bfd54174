"""Pallas TPU (Mosaic TPU) blockwise attention with interval masks, log-sum-exp and tile skipping.

Status: this kernel has NOT run on a real TPU. It is tested only in Pallas' TPU interpret mode on
CPU (`interpret=True` or a `pltpu.InterpretParams`), and its lowering to Mosaic TPU MLIR is checked
on CPU; the Mosaic compiler itself (libtpu) has never seen it. Treat TPU compilation and speed as
unverified; the `tpu`-marked test is the first thing to run on a TPU.

FlashAttention-2 (arXiv 2307.08691): Alg. 1 for the forward (online softmax over key tiles), Alg. 2
for the backward split into a dQ pass (one query tile at a time, over its key tiles) and a dK/dV
pass (one key tile at a time, over the query tiles of every query head of its GQA group, so dK/dV
come out summed over the group and K/V are never repeated). The backward recomputes
P = exp(scale * q.k - lse) from the *given* final lse and uses D = rowsum(dO * O), so a ring step
is exact with the row's merged (o, lse).

Masks are DESIGN.md section 2 intervals: query row i sees key j iff q_lo[i] <= k_idx[j] <= q_hi[i],
k_idx the global key indices (any order: zig-zag chunks work). Skipping follows TPU splash
attention's MaskInfo idea: outside the kernel `masks.tile_map` classifies every (query tile, key
tile) pair as SKIP / PARTIAL / FULL, and each row of tiles is compacted into the list of its live
(non-SKIP) tiles, which is scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`):
  * the K/V (forward, dQ) or Q/dO (dK/dV) index_map reads the list, so grid steps walk the live
    tiles only; steps past the end of a list repeat its last tile, whose block index does not
    change, so the pipeline issues no DMA for them, and `pl.when` skips their compute;
  * FULL tiles run without the mask arithmetic; PARTIAL tiles build it from the intervals.
SMEM holds B * (T / block_q) * (S / block_k) int32 words per pass: 256 KiB per batch row at 128K
tokens with 512-wide tiles. Calls needing more than 512 KiB (half of v4+'s SMEM) raise before
tracing; longer sequences go through ring attention in chunks. Like splash attention, the grid
keeps one step per (query tile, key tile) pair: steps past a list cost no DMA and no compute, only
the per-step overhead.

Layout: q/k/v/o stay [B, L, heads * H] in HBM (a free reshape of [B, L, heads, H]); a (tile, H)
block is addressed by the head index on the lane axis, so no transposes are paid. H is zero-padded
to a multiple of 128 lanes (exact: zero columns add nothing to q.k and give zero output columns).
The forward keeps scores as [block_q, block_k] (queries on sublanes); both backward passes work on
transposed scores [block_k, block_q] (keys on sublanes, as splash attention does), so lse and D
travel as [1, block_q] rows (4 bytes a row in HBM; the forward writes lse through one in-VMEM
transpose). The int32 intervals and key indices are laid out, as splash lays out segment ids,
repeated over 128 lanes where a tile reads them as a column and over 8 sublanes where it reads
them as a row.

Rows with no allowed key give o = 0 and lse = -inf, never NaN. Any T and S: padding is internal
(padded rows get the empty interval, padded keys the index `masks.NO_KEY`, which no interval holds).

Axis letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head
dim (Hp padded to lanes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcv import masks
from lcv.kernels import blockwise, with_vjp

_LANES = 128
_SUBLANES = 8
_NEG_INF = float("-inf")
# Budget for the scalar-prefetched tile lists: half of the 1 MiB SMEM of TPU v4 and later.
_SMEM_WORDS = 128 * 1024
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three passes, each a positive multiple of 128 (TPU lanes).

  block_q/block_k tile the forward, *_dq the dQ pass, *_dkv the dK/dV pass. Tiles longer than the
  sequence (rounded up to 128) are shrunk to it. 512 follows the TPU tuning reports (128-wide tiles
  leave v5e at a few percent of peak, jax issue #24633; 1024 helped splash on v6e).
  """

  block_q: int = 512
  block_k: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512

  def __post_init__(self):
    for f in dataclasses.fields(self):
      x = getattr(self, f.name)
      if not isinstance(x, int) or x < _LANES or x % _LANES:
        raise ValueError(f"BlockSizes.{f.name}={x} must be a positive multiple of {_LANES}")

  def fit(self, t: int, s: int) -> BlockSizes:
    """Shrink every tile to the query (t) or key (s) length rounded up to 128."""

    def cap(block, length):
      return min(block, -(-length // _LANES) * _LANES)

    return BlockSizes(
      block_q=cap(self.block_q, t),
      block_k=cap(self.block_k, s),
      block_q_dq=cap(self.block_q_dq, t),
      block_k_dq=cap(self.block_k_dq, s),
      block_q_dkv=cap(self.block_q_dkv, t),
      block_k_dkv=cap(self.block_k_dkv, s),
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: a jit static and custom_vjp nondiff argument)."""

  scale: float
  blocks: BlockSizes
  interpret: Any  # False on TPU, True or a pltpu.InterpretParams elsewhere


def _plan(q, k, scale, block_sizes, interpret) -> _Plan:
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a flash_tpu.BlockSizes or None; got {block_sizes!r}")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  b, t, _, h = q.shape
  blocks = block_sizes.fit(t, k.shape[1])
  if interpret is False:
    tiles = lambda bq, bk: b * -(-t // bq) * -(-k.shape[1] // bk)  # noqa: E731
    words = max(
      tiles(blocks.block_q, blocks.block_k),
      tiles(blocks.block_q_dq, blocks.block_k_dq),
      tiles(blocks.block_q_dkv, blocks.block_k_dkv),
    )
    if words > _SMEM_WORDS:
      raise ValueError(
        f"the tile lists need {words} SMEM words (B * T/block_q * S/block_k) > {_SMEM_WORDS}: "
        "use larger BlockSizes, a smaller batch per call, or ring attention over the sequence"
      )
  scale = float(h**-0.5 if scale is None else scale)
  return _Plan(scale, blocks, interpret)


# ----------------------------------------------------------------------------------------------
# Host-side preparation: padding, layouts and the compacted tile lists (plain jnp, outside kernels).


def _pad_axis(x, axis: int, multiple: int, value=0):
  pad = (-x.shape[axis]) % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _lanes_layout(x, multiple: int):
  """[B, L, heads, H] -> [B, L_pad, heads * Hp]: sequence padded to `multiple`, H to 128 lanes."""
  x = _pad_axis(_pad_axis(x, 3, _LANES), 1, multiple)
  b, length, heads, hp = x.shape
  return x.reshape(b, length, heads * hp)


def _unlanes(x, length: int, heads: int, h: int):
  """Inverse of `_lanes_layout`: [B, L_pad, heads * Hp] -> [B, length, heads, h]."""
  b = x.shape[0]
  return x.reshape(b, x.shape[1], heads, -1)[:, :length, :, :h]


def _rows(x, multiple: int, value):
  """float32[B, N, T] per-row statistic -> [B, N, 1, T_pad] (a lane-major row per tile)."""
  x = _pad_axis(x.astype(jnp.float32), 2, multiple, value)
  return x[:, :, None, :]


def _schedule(lo, hi, kid, block_q: int, block_k: int, by_key: bool):
  """Compacted live-tile lists for one pass, flattened for SMEM.

  Args:
    lo, hi: int32[B, T_pad]; kid: int32[B, S_pad] (padded as the kernels see them).
    block_q, block_k: the pass's tiles.
    by_key: list query tiles per key tile (dK/dV pass) instead of key tiles per query tile.

  Returns:
    count int32[B * R]: live tiles of each of the R rows of tiles;
    code int32[B * R * C]: per row, its live tiles in increasing order as 2 * tile + (FULL), the
      slots past `count` repeating the last live tile (tile 0 for a row with none), so their block
      index repeats and the pipeline fetches nothing for them.
  """
  kinds = masks.tile_map(lo, hi, kid, block_q, block_k)  # int8[B, nq, nk]
  if by_key:
    kinds = jnp.swapaxes(kinds, 1, 2)
  live = kinds != masks.SKIP
  cols = kinds.shape[-1]
  order = jnp.argsort(~live, axis=-1, stable=True).astype(jnp.int32)
  count = jnp.sum(live, axis=-1, dtype=jnp.int32)
  slot = jnp.minimum(jnp.arange(cols, dtype=jnp.int32), jnp.maximum(count - 1, 0)[..., None])
  tile = jnp.take_along_axis(order, slot, axis=-1)
  full = jnp.take_along_axis(kinds, tile, axis=-1) == masks.FULL
  code = 2 * tile + full.astype(jnp.int32)
  return count.reshape(-1), code.reshape(-1)


def _lane_column(x):
  """int32[B, L] -> [B, L, 128]: each value repeated over the lanes (read as a column)."""
  return jnp.broadcast_to(x[:, :, None], (*x.shape, _LANES))


def _sublane_row(x):
  """int32[B, L] -> [B, 8, L]: each value repeated over 8 sublanes (read as a row)."""
  return jnp.broadcast_to(x[:, None, :], (x.shape[0], _SUBLANES, x.shape[1]))


def _widen(x, width: int):
  """[rows, 128] lane-replicated values -> [rows, width] (width a multiple of 128)."""
  return x if width == _LANES else jnp.tile(x, (1, width // _LANES))


def _dot(a, b, dims):
  """float32 a @ b (dims _NN) or a @ b.T (_NT) in a.dtype's precision.

  float32 operands ask for full precision: the MXU's default would round them to bf16 passes.
  """
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _when_live(live, code, tile):
  """Run tile(masked=True) on a live PARTIAL tile, tile(masked=False) on a live FULL one."""
  pl.when(live & ((code & 1) == 0))(lambda: tile(True))
  pl.when(live & ((code & 1) == 1))(lambda: tile(False))


def _params(interpret, semantics):
  return dict(
    interpret=interpret,
    compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
  )


# ----------------------------------------------------------------------------------------------
# Forward: grid (B, N, query tiles, live key tiles); scores [block_q, block_k].


def _fwd_kernel(count_ref, code_ref, *refs, scale: float):
  q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  n_q, n_k = pl.num_programs(2), pl.num_programs(3)
  row = b * n_q + i
  code = code_ref[row * n_k + j]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def tile(masked: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    bk, hp = k.shape
    s = _dot(q, k, _NT) * scale
    if masked:
      kid = kid_ref[:1, :]  # [1, bk]
      s = jnp.where(
        (_widen(lo_ref[...], bk) <= kid) & (kid <= _widen(hi_ref[...], bk)), s, _NEG_INF
      )
    m_prev = m_sc[...]  # [bq, 128], lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row with no allowed key so far keeps m = -inf; shift by 0 there, since
    # exp(-inf - -inf) is NaN.
    m_safe = jnp.where(m_next == _NEG_INF, 0.0, m_next)
    p = jnp.exp(s - _widen(m_safe, bk))
    alpha = jnp.exp(m_prev - m_safe)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = _dot(p.astype(v.dtype), v, _NN)
    acc_sc[...] = _widen(alpha, hp) * acc_sc[...] + pv
    m_sc[...] = m_next

  _when_live(j < count_ref[row], code, tile)

  @pl.when(j == n_k - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_sc[...] * _widen(1.0 / l_safe, acc_sc.shape[1])).astype(o_ref.dtype)
    lse = jnp.where(seen, m_sc[...] + jnp.log(l_safe), _NEG_INF)  # [bq, 128]
    lse_ref[...] = jnp.transpose(lse)[:1, :]  # [1, bq]: lse stored lane-major, 4 bytes a row


@functools.partial(jax.jit, static_argnums=0)
def _forward(p: _Plan, q, k, v, q_lo, q_hi, k_idx):
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  bq, bk = p.blocks.block_q, p.blocks.block_k
  qx = _lanes_layout(q, bq)
  kx, vx = _lanes_layout(k, bk), _lanes_layout(v, bk)
  hp = qx.shape[-1] // n
  lo = _pad_axis(q_lo, 1, bq, 0)
  hi = _pad_axis(q_hi, 1, bq, -1)
  kid = _pad_axis(k_idx, 1, bk, masks.NO_KEY)
  count, code = _schedule(lo, hi, kid, bq, bk, by_key=False)
  n_q, n_k = qx.shape[1] // bq, kx.shape[1] // bk

  def kv_map(bi, ni, i, j, count_ref, code_ref):
    return bi, code_ref[(bi * n_q + i) * n_k + j] >> 1, jax.lax.div(ni, groups)

  q_map = lambda bi, ni, i, j, *_: (bi, i, ni)  # noqa: E731
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, n, n_q, n_k),
    in_specs=[
      pl.BlockSpec((None, bq, hp), q_map),
      pl.BlockSpec((None, bk, hp), kv_map),
      pl.BlockSpec((None, bk, hp), kv_map),
      pl.BlockSpec((None, bq, _LANES), lambda bi, ni, i, j, *_: (bi, i, 0)),
      pl.BlockSpec((None, bq, _LANES), lambda bi, ni, i, j, *_: (bi, i, 0)),
      pl.BlockSpec(
        (None, _SUBLANES, bk), lambda bi, ni, i, j, *r: (bi, 0, kv_map(bi, ni, i, j, *r)[1])
      ),
    ],
    out_specs=[
      pl.BlockSpec((None, bq, hp), q_map),
      pl.BlockSpec((None, None, 1, bq), lambda bi, ni, i, j, *_: (bi, ni, 0, i)),
    ],
    scratch_shapes=[
      pltpu.VMEM((bq, _LANES), jnp.float32),
      pltpu.VMEM((bq, _LANES), jnp.float32),
      pltpu.VMEM((bq, hp), jnp.float32),
    ],
  )
  o, lse = pl.pallas_call(
    functools.partial(_fwd_kernel, scale=p.scale),
    out_shape=[
      jax.ShapeDtypeStruct(qx.shape, q.dtype),
      jax.ShapeDtypeStruct((b, n, 1, qx.shape[1]), jnp.float32),
    ],
    grid_spec=grid_spec,
    name="lcv_flash_tpu_fwd",
    **_params(p.interpret, ("parallel", "parallel", "parallel", "arbitrary")),
  )(count, code, qx, kx, vx, _lane_column(lo), _lane_column(hi), _sublane_row(kid))
  return _unlanes(o, t, n, h), lse[:, :, 0, :t]


# ----------------------------------------------------------------------------------------------
# Backward: transposed tiles [block_k, block_q] (keys on sublanes, queries on lanes).


def _tile_grads(ins, masked: bool, scale: float):
  """P^T and dS^T of one tile, float32[bk, bq] each (FA2 Alg. 2 lines 11-14, transposed).

  ins: refs of q, k, v, dO [tile, Hp], lse, D [1, bq], lo, hi [8, bq] and key indices [bk, 128].

  lse is +inf on rows with no allowed key, so their P is exp(-inf) = 0.
  """
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, kid_ref = ins
  q, k, v, do, lse, delta = (r[...] for r in (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref))
  bq = q.shape[0]
  st = _dot(k, q, _NT) * scale
  pt = jnp.exp(st - lse)  # lse, delta: [1, bq]
  if masked:
    kid = _widen(kid_ref[...], bq)  # [bk, bq]
    pt = jnp.where((lo_ref[:1, :] <= kid) & (kid <= hi_ref[:1, :]), pt, 0.0)
  dpt = _dot(v, do, _NT)
  return pt, pt * (dpt - delta) * scale


def _dq_kernel(count_ref, code_ref, *refs, scale: float):
  ins, (dq_ref, dq_sc) = refs[:9], refs[9:]
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  n_q, n_k = pl.num_programs(2), pl.num_programs(3)
  row = b * n_q + i
  code = code_ref[row * n_k + j]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def tile(masked: bool):
    _, dst = _tile_grads(ins, masked, scale)
    k = ins[1][...]
    # dS @ K: transpose dS^T in float32 (a plain 2-D XLU transpose) before the bf16 cast.
    dq_sc[...] += _dot(jnp.transpose(dst).astype(k.dtype), k, _NN)

  _when_live(j < count_ref[row], code, tile)

  @pl.when(j == n_k - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(count_ref, code_ref, *refs, scale: float, n_q: int):
  ins, (dk_ref, dv_ref, dk_sc, dv_sc) = refs[:9], refs[9:]
  b, kt, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  n_kt, n_steps = pl.num_programs(2), pl.num_programs(3)
  row = b * n_kt + kt
  slot = jax.lax.rem(step, n_q)  # steps run over (query head of the group, live query tile)
  code = code_ref[row * n_q + slot]

  @pl.when(step == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def tile(masked: bool):
    pt, dst = _tile_grads(ins, masked, scale)
    q, do = ins[0][...], ins[3][...]
    dv_sc[...] += _dot(pt.astype(do.dtype), do, _NN)
    dk_sc[...] += _dot(dst.astype(q.dtype), q, _NN)

  _when_live(slot < count_ref[row], code, tile)

  @pl.when(step == n_steps - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _backward(p: _Plan, q, k, v, o, lse, do, dlse, q_lo, q_hi, k_idx):
  b, t, n, h = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
  groups = n // kv_heads
  blocks = p.blocks
  t_mult = math.lcm(blocks.block_q_dq, blocks.block_q_dkv)
  s_mult = math.lcm(blocks.block_k_dq, blocks.block_k_dkv)

  # D = rowsum(dO * O) (FA2 Alg. 2 line 4); the lse cotangent enters as dS += P * dlse.
  delta = jnp.einsum("BTNH,BTNH->BNT", do.astype(jnp.float32), o.astype(jnp.float32))
  if dlse is not None:
    delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
  lse = jnp.where(lse == _NEG_INF, jnp.inf, lse)  # P = 0 on rows with no allowed key

  qx, dox = _lanes_layout(q, t_mult), _lanes_layout(do.astype(q.dtype), t_mult)
  kx, vx = _lanes_layout(k, s_mult), _lanes_layout(v, s_mult)
  hp = qx.shape[-1] // n
  lse_r, delta_r = _rows(lse, t_mult, jnp.inf), _rows(delta, t_mult, 0.0)
  lo = _pad_axis(q_lo, 1, t_mult, 0)
  hi = _pad_axis(q_hi, 1, t_mult, -1)
  kid = _pad_axis(k_idx, 1, s_mult, masks.NO_KEY)
  inputs = (qx, kx, vx, dox, lse_r, delta_r, _sublane_row(lo), _sublane_row(hi), _lane_column(kid))
  semantics = ("parallel", "parallel", "parallel", "arbitrary")

  def specs(bq, bk, q_head, q_tile, k_head, k_tile):
    """BlockSpecs of `inputs` given index functions of the grid (and scalar-prefetch refs)."""
    qm = lambda *g: (g[0], q_tile(*g), q_head(*g))  # noqa: E731
    km = lambda *g: (g[0], k_tile(*g), k_head(*g))  # noqa: E731
    rm = lambda *g: (g[0], q_head(*g), 0, q_tile(*g))  # noqa: E731
    return [
      pl.BlockSpec((None, bq, hp), qm),
      pl.BlockSpec((None, bk, hp), km),
      pl.BlockSpec((None, bk, hp), km),
      pl.BlockSpec((None, bq, hp), qm),
      pl.BlockSpec((None, None, 1, bq), rm),
      pl.BlockSpec((None, None, 1, bq), rm),
      pl.BlockSpec((None, _SUBLANES, bq), lambda *g: (g[0], 0, q_tile(*g))),
      pl.BlockSpec((None, _SUBLANES, bq), lambda *g: (g[0], 0, q_tile(*g))),
      pl.BlockSpec((None, bk, _LANES), lambda *g: (g[0], k_tile(*g), 0)),
    ]

  # dQ pass: grid (B, N, query tiles, live key tiles).
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  n_q, n_k = qx.shape[1] // bq, kx.shape[1] // bk
  count, code = _schedule(lo, hi, kid, bq, bk, by_key=False)

  def dq_k_tile(bi, ni, i, j, count_ref, code_ref):
    return code_ref[(bi * n_q + i) * n_k + j] >> 1

  dq = pl.pallas_call(
    functools.partial(_dq_kernel, scale=p.scale),
    out_shape=jax.ShapeDtypeStruct(qx.shape, q.dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, n, n_q, n_k),
      in_specs=specs(
        bq,
        bk,
        q_head=lambda bi, ni, *_: ni,
        q_tile=lambda bi, ni, i, *_: i,
        k_head=lambda bi, ni, *_: jax.lax.div(ni, groups),
        k_tile=dq_k_tile,
      ),
      out_specs=pl.BlockSpec((None, bq, hp), lambda bi, ni, i, *_: (bi, i, ni)),
      scratch_shapes=[pltpu.VMEM((bq, hp), jnp.float32)],
    ),
    name="lcv_flash_tpu_dq",
    **_params(p.interpret, semantics),
  )(count, code, *inputs)

  # dK/dV pass: grid (B, K, key tiles, G x live query tiles).
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  n_q, n_k = qx.shape[1] // bq, kx.shape[1] // bk
  count, code = _schedule(lo, hi, kid, bq, bk, by_key=True)

  def dkv_q_tile(bi, hk, kt, step, count_ref, code_ref):
    return code_ref[(bi * n_k + kt) * n_q + jax.lax.rem(step, n_q)] >> 1

  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, scale=p.scale, n_q=n_q),
    out_shape=[
      jax.ShapeDtypeStruct(kx.shape, k.dtype),
      jax.ShapeDtypeStruct(vx.shape, v.dtype),
    ],
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kv_heads, n_k, groups * n_q),
      in_specs=specs(
        bq,
        bk,
        q_head=lambda bi, hk, kt, step, *_: hk * groups + jax.lax.div(step, n_q),
        q_tile=dkv_q_tile,
        k_head=lambda bi, hk, *_: hk,
        k_tile=lambda bi, hk, kt, *_: kt,
      ),
      out_specs=[
        pl.BlockSpec((None, bk, hp), lambda bi, hk, kt, *_: (bi, kt, hk)),
        pl.BlockSpec((None, bk, hp), lambda bi, hk, kt, *_: (bi, kt, hk)),
      ],
      scratch_shapes=[pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, hp), jnp.float32)],
    ),
    name="lcv_flash_tpu_dkv",
    **_params(p.interpret, semantics),
  )(count, code, *inputs)
  return (
    _unlanes(dq, t, n, h),
    _unlanes(dk, s_len, kv_heads, h),
    _unlanes(dv, s_len, kv_heads, h),
  )


# ----------------------------------------------------------------------------------------------
# Public API (docs/internals.md).


def _check(q, k, v, q_lo, q_hi, k_idx):
  blockwise.check_inputs(q, k, v, q_lo, q_hi, k_idx)
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q, k, v must be floating point (bf16, fp16, fp32); got {q.dtype}")


def _ints(*xs):
  return tuple(jnp.asarray(x, jnp.int32) for x in xs)


def forward(q, k, v, q_lo, q_hi, k_idx, *, scale=None, block_sizes=None, interpret=None):
  """Attention forward with its log-sum-exp; no VJP (ring steps call this and merge).

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0; one floating dtype.
    q_lo, q_hi: int32[B, T] interval of allowed global key indices per query row.
    k_idx: int32[B, S] global index of every key (any order).
    scale: softmax scale; default H ** -0.5.
    block_sizes: `BlockSizes` (default 512 everywhere, shrunk to short sequences).
    interpret: run in Pallas TPU interpret mode (True or a `pltpu.InterpretParams`); default:
      off on TPU, on elsewhere.

  Returns:
    o: [B, T, N, H] in q.dtype (zeros on rows with no allowed key);
    lse: float32[B, N, T], natural log of sum_j exp(scale * q.k_j) over allowed keys (-inf if none).
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, block_sizes, interpret)
  return _forward(p, q, k, v, *_ints(q_lo, q_hi, k_idx))


def backward(
  q, k, v, o, lse, do, q_lo, q_hi, k_idx, *, scale=None, block_sizes=None, interpret=None
):
  """Gradients from the row's *final* (o, lse), as FA2 Alg. 2 (exact for one ring step).

  Args:
    q, k, v, q_lo, q_hi, k_idx, scale, block_sizes, interpret: as in `forward`.
    o: [B, T, N, H] final output; lse: float32[B, N, T] final log-sum-exp; do: [B, T, N, H].

  Returns:
    dq [B, T, N, H], dk, dv [B, S, K, H] (summed over each GQA group), in the input dtypes.
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  if o.shape != q.shape or do.shape != q.shape:
    raise ValueError(f"{o.shape=} and {do.shape=} must equal {q.shape=}")
  if lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
    raise ValueError(f"{lse.shape=} must be [B, N, T] = {(q.shape[0], q.shape[2], q.shape[1])}")
  p = _plan(q, k, scale, block_sizes, interpret)
  return _backward(p, q, k, v, o, lse, do, None, *_ints(q_lo, q_hi, k_idx))


_attention = with_vjp(_forward, _backward)


def attention(q, k, v, q_lo, q_hi, k_idx, *, scale=None, block_sizes=None, interpret=None):
  """Differentiable attention (custom VJP w.r.t. q, k, v and the lse output).

  Same arguments and results as `forward`; the backward runs the dQ and dK/dV kernels with the
  saved (o, lse).
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, block_sizes, interpret)
  return _attention(q, k, v, *_ints(q_lo, q_hi, k_idx), p)


def flash_tpu_reference(q, k, v, q_lo, q_hi, k_idx, *, scale=None):
  """Dense jnp twin of `attention` for tests: materialises the [B, N, T, S] scores.

  Same (o, lse) contract, differentiable by ordinary autodiff; O(T * S) memory.
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  q_lo, q_hi, k_idx = _ints(q_lo, q_hi, k_idx)
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  scale = float(h**-0.5 if scale is None else scale)
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  allow = masks.allowed(q_lo, q_hi, k_idx)[:, None, None]
  s = jnp.where(allow, s, _NEG_INF)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", e / l_safe, v.astype(jnp.float32))
  lse = jnp.where(seen, m + jnp.log(l_safe), _NEG_INF)[..., 0].reshape(b, n, t)
  return o.reshape(b, t, n, h).astype(q.dtype), lse
