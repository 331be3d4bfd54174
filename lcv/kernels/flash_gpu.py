"""Pallas GPU blockwise attention (Triton lowering) with interval masks, log-sum-exp and skipping.

The portable GPU kernel of lcv: FlashAttention-2 (arXiv 2307.08691) Alg. 1 for the forward and
Alg. 2 for the backward, split into a dK/dV pass (one program per key tile) and a dQ pass (one
program per query tile). It runs on any CUDA GPU through `pl.pallas_call`'s Triton lowering and on
CPU with `interpret=True`.

Masks are DESIGN.md section 2 intervals: query row i sees key j iff q_lo[i] <= k_idx[j] <= q_hi[i],
with k_idx the *global* index of each key, so a ring step may call the kernel on any (query chunk,
key chunk) pair. Masked attention costs only the work it does, in all three passes:
  * each program loops only over the tiles that can meet its rows (forward and dQ: the key tiles
    of a query tile; dK/dV: the query tiles of a key tile), computed once per call from per-tile
    min / max of the intervals and key indices (`tile_ranges`); other tiles cost no loads and no
    FLOPs;
  * that range is split into boundary tiles, which build the elementwise mask, and a run of full
    tiles (every row allows every key), which do no mask arithmetic. Three branch-free loops, so
    Triton pipelines the tile loads of each.
Rows with no allowed key give o = 0 and lse = -inf, never NaN. Any T and S: padding is internal
(padded rows get the empty interval, padded keys the index `masks.NO_KEY`, which no interval holds).

Axis letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head
dim. Softmax runs in base 2 (exp2 with log2(e) folded into the scale); lse is returned in natural
log, float32 [B, N, T], as docs/internals.md requires.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from lcv import masks
from lcv.kernels import with_vjp

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_BIG = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16) and Triton launch parameters of the three passes.

  block_q/block_k tile the forward, *_dkv the dK/dV pass, *_dq the dQ pass. Tiles larger than the
  (padded) sequence are shrunk to it. num_warps (forward) and num_warps_bwd: None picks 4 for
  H <= 64, else 8. The field defaults are tuned for H <= 128; a call that passes no block sizes
  takes `default_block_sizes(H)` (smaller tiles above 128, which fit in shared memory).
  """

  block_q: int = 128
  block_k: int = 128
  block_q_dkv: int = 128
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 128
  num_warps: int | None = None
  num_stages: int = 3
  num_warps_bwd: int | None = None
  num_stages_bwd: int = 2

  def __post_init__(self):
    for f in dataclasses.fields(self)[:6]:
      x = getattr(self, f.name)
      if x < 16 or x & (x - 1):
        raise ValueError(f"BlockSizes.{f.name}={x} must be a power of two >= 16")


# ----------------------------------------------------------------------------------------------
# Host-side preparation (plain jnp, O(T + S + T/bq * S/bk) work).


def _pow2(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


def _pad_axis(x, axis: int, length: int, value=0):
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def tile_ranges(lo, hi, k_idx, block_q: int, block_k: int):
  """Tile ranges that each program visits, split into boundary (masked) and full (unmasked) parts.

  A (query tile, key tile) pair *meets* when min lo (valid rows) <= max key (real keys) and
  max hi >= min key: conservative (never drops an allowed pair) and exact for sorted keys. It is
  *full* when max lo <= min key and min hi >= max key over all rows and keys, i.e. every row allows
  every key (padded rows and keys make a tile non-full). For sorted keys (contiguous chunks,
  zig-zag pairs) both sets are contiguous runs of tiles; otherwise the full run is dropped and
  every met tile is treated as a boundary tile (correct, only slower).

  Args:
    lo, hi: int32[B, T_pad], T_pad a multiple of block_q; empty rows have lo > hi.
    k_idx: int32[B, S_pad], S_pad a multiple of block_k; padded keys hold masks.NO_KEY.

  Returns:
    k_range int32[B, T_pad // block_q, 4]: per query tile (first, first full, end full, end) key
    tiles; q_range int32[B, S_pad // block_k, 4]: the same per key tile over query tiles.
  """
  b = lo.shape[0]
  lo_t = lo.reshape(b, -1, block_q)
  hi_t = hi.reshape(b, -1, block_q)
  valid = lo_t <= hi_t
  lo_min = jnp.where(valid, lo_t, _BIG).min(-1)[:, :, None]
  hi_max = jnp.where(valid, hi_t, -1).max(-1)[:, :, None]
  lo_max, hi_min = lo_t.max(-1)[:, :, None], hi_t.min(-1)[:, :, None]
  k_t = k_idx.reshape(b, -1, block_k)
  real = k_t != masks.NO_KEY
  k_min = k_t.min(-1)[:, None, :]  # NO_KEY is the largest int32: padding never lowers the min
  k_max_real = jnp.where(real, k_t, -1).max(-1)[:, None, :]
  k_max = k_t.max(-1)[:, None, :]  # NO_KEY when any key is padding: such tiles are never full
  meets = (lo_min <= k_max_real) & (hi_max >= k_min)
  full = (lo_max <= k_min) & (hi_min >= k_max)

  def ranges(m, f):  # bool[B, rows, cols] x2 -> int32[B, rows, 4]
    cols = m.shape[-1]
    j = jnp.arange(cols, dtype=jnp.int32)
    first = jnp.min(jnp.where(m, j, cols), axis=-1)
    end = jnp.maximum(jnp.max(jnp.where(m, j + 1, 0), axis=-1), first)
    first = jnp.minimum(first, end)
    f0 = jnp.min(jnp.where(f, j, cols), axis=-1)
    f1 = jnp.max(jnp.where(f, j + 1, 0), axis=-1)
    run = (f1 > f0) & (jnp.sum(f, axis=-1) == f1 - f0)
    f0, f1 = jnp.where(run, f0, first), jnp.where(run, f1, first)
    return jnp.stack([first, f0, f1, end], axis=-1).astype(jnp.int32)

  return ranges(meets, full), ranges(jnp.swapaxes(meets, 1, 2), jnp.swapaxes(full, 1, 2))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call: padded lengths, tiles, dtypes, launch parameters."""

  t: int
  s: int
  h: int
  t_pad: int
  s_pad: int
  h_pad: int
  groups: int
  bq: int
  bk: int
  bq_dkv: int
  bk_dkv: int
  bq_dq: int
  bk_dq: int
  scale: float
  interpret: bool
  params: object
  params_bwd: object


# Defaults for head dims above 128, measured on an H200 (H = 256, benchmarks/NOTES.md): the
# H <= 128 tiles ask for 449 KB of shared memory there (227 KB on an H100 / H200). 128 x 64
# forward tiles on 2 stages and 64 x 64 backward tiles are the fastest that fit.
WIDE_HEAD_BLOCK_SIZES = BlockSizes(block_k=64, block_q_dkv=64, block_k_dq=64, num_stages=2)


def default_block_sizes(h: int) -> BlockSizes:
  """The tiles a call with head dim h takes when it passes none."""
  return BlockSizes() if _pow2(h) <= 128 else WIDE_HEAD_BLOCK_SIZES


def _plan(q, k, scale, block_sizes: BlockSizes | None, interpret) -> _Plan:
  bs = block_sizes or default_block_sizes(q.shape[-1])
  _, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  h_pad = max(16, _pow2(h))

  def fit(block, length):  # shrink a tile to the padded length of short sequences
    return min(block, max(16, _pow2(length)))

  bq, bq_dkv, bq_dq = (fit(x, t) for x in (bs.block_q, bs.block_q_dkv, bs.block_q_dq))
  bk, bk_dkv, bk_dq = (fit(x, s) for x in (bs.block_k, bs.block_k_dkv, bs.block_k_dq))
  mq, mk = max(bq, bq_dkv, bq_dq), max(bk, bk_dkv, bk_dq)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  warps = 4 if h_pad <= 64 else 8
  return _Plan(
    t=t,
    s=s,
    h=h,
    t_pad=pl.cdiv(t, mq) * mq,
    s_pad=pl.cdiv(s, mk) * mk,
    h_pad=h_pad,
    groups=n // kh,
    bq=bq,
    bk=bk,
    bq_dkv=bq_dkv,
    bk_dkv=bk_dkv,
    bq_dq=bq_dq,
    bk_dq=bk_dq,
    scale=float(h**-0.5 if scale is None else scale),
    interpret=bool(interpret),
    params=plgpu_triton.CompilerParams(num_warps=bs.num_warps or warps, num_stages=bs.num_stages),
    params_bwd=plgpu_triton.CompilerParams(
      num_warps=bs.num_warps_bwd or warps, num_stages=bs.num_stages_bwd
    ),
  )


def _check(q, k, v, q_lo, q_hi, k_idx) -> None:
  """Shape and dtype checks, before tracing, with messages naming the value and the fix."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"q, k, v must be [B, T, N, H], [B, S, K, H], [B, S, K, H]; got {q.shape=}, {k.shape=}, "
      f"{v.shape=}"
    )
  b, t, n, h = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"k and v must be [B={b}, S, K, H={h}]; got {k.shape=}, {v.shape=}")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]} (GQA)")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share one dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"{q.dtype=} must be float32, bfloat16 or float16")
  if h > 256:
    raise ValueError(f"head dim H={h} must be <= 256 (one tile row holds a whole head)")
  for name, x, want in (
    ("q_lo", q_lo, (b, t)),
    ("q_hi", q_hi, (b, t)),
    ("k_idx", k_idx, (b, k.shape[1])),
  ):
    if tuple(x.shape) != want:
      raise ValueError(f"{name}.shape={tuple(x.shape)} must be {want}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must hold integer global key indices; got {x.dtype}")


def _prepare(p: _Plan, q, k, v, q_lo, q_hi, k_idx):
  """Pad every operand to the plan's lengths (padded rows empty, padded keys NO_KEY)."""
  q = _pad_axis(_pad_axis(q, 1, p.t_pad), 3, p.h_pad)
  k = _pad_axis(_pad_axis(k, 1, p.s_pad), 3, p.h_pad)
  v = _pad_axis(_pad_axis(v, 1, p.s_pad), 3, p.h_pad)
  lo = _pad_axis(q_lo.astype(jnp.int32), 1, p.t_pad, 0)
  hi = _pad_axis(q_hi.astype(jnp.int32), 1, p.t_pad, -1)
  kid = _pad_axis(k_idx.astype(jnp.int32), 1, p.s_pad, masks.NO_KEY)
  return q, k, v, lo, hi, kid


# ----------------------------------------------------------------------------------------------
# Tile arithmetic shared by the kernels.


def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b, float32 accumulation, optional transposes (Triton folds them into the MMA operands).

  Default precision: float32 inputs run tf32 products on the GPU (Triton's default; exact-fp32
  dots did not finish the GPU tests, benchmarks/NOTES.md) and exact float32 in interpret mode.
  """
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(lo, hi, kid):
  return (lo[:, None] <= kid[None, :]) & (kid[None, :] <= hi[:, None])


def _loops(rng_ref, step, carry):
  """Run step(j, carry, masked) over a program's tile range: boundary, full, boundary parts.

  Three plain loops, no branches: Triton software-pipelines the tile loads of each loop, which it
  would not do inside a `lax.cond`; only the boundary loops build the elementwise mask.
  """
  masked = lambda j, c: step(j, c, True)
  carry = jax.lax.fori_loop(rng_ref[0], rng_ref[1], masked, carry)
  carry = jax.lax.fori_loop(rng_ref[1], rng_ref[2], lambda j, c: step(j, c, False), carry)
  return jax.lax.fori_loop(rng_ref[2], rng_ref[3], masked, carry)


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(rng_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, kid_ref, o_ref, lse_ref, *, p):
  bq, bk = p.bq, p.bk
  q = q_ref[...]
  lo, hi = lo_ref[...], hi_ref[...]
  c = p.scale * _LOG2E

  def step(j, carry, masked):
    m, l, acc = carry
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s = _dot(q, k, trans_b=True) * c
    if masked:
      s = jnp.where(_mask(lo, hi, kid_ref[pl.ds(j * bk, bk)]), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row with no key yet keeps m = -inf: shift it by 0, not by -inf (full tiles never leave one).
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m - shift)
    e = jnp.exp2(s - shift[:, None])
    l = l * alpha + jnp.sum(e, axis=1)
    acc = acc * alpha[:, None] + _dot(e.astype(v.dtype), v)
    return m_new, l, acc

  init = (
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
    jnp.zeros((bq, p.h_pad), jnp.float32),
  )
  m, l, acc = _loops(rng_ref, step, init)
  some = l > 0.0
  l_safe = jnp.where(some, l, 1.0)
  o_ref[...] = jnp.where(some[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(some, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)


def _forward(p: _Plan, q, k, v, lo, hi, kid):
  """Padded operands -> (o [B, T_pad, N, H_pad], lse float32[B, N, T_pad])."""
  b, _, n, _ = q.shape
  g, bq = p.groups, p.bq
  k_range, _ = tile_ranges(lo, hi, kid, bq, p.bk)
  kernel = functools.partial(_fwd_kernel, p=p)
  return pl.pallas_call(
    kernel,
    grid=(p.t_pad // bq, b, n),
    in_specs=[
      pl.BlockSpec((None, None, 4), lambda i, b, n: (b, i, 0)),
      pl.BlockSpec((None, bq, None, p.h_pad), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, p.s_pad, None, p.h_pad), lambda i, b, n: (b, 0, n // g, 0)),
      pl.BlockSpec((None, p.s_pad, None, p.h_pad), lambda i, b, n: (b, 0, n // g, 0)),
      pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
      pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
      pl.BlockSpec((None, p.s_pad), lambda i, b, n: (b, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, bq, None, p.h_pad), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, n, p.t_pad), jnp.float32),
    ],
    compiler_params=p.params,
    interpret=p.interpret,
    name="lcv_flash_fwd",
  )(k_range, q, k, v, lo, hi, kid)


# ----------------------------------------------------------------------------------------------
# Backward: dK/dV per key tile (looping over the GQA group and its query-tile range), dQ per query
# tile. delta = rowsum(dO * O) - dlse folds the lse cotangent in: d lse / d s = P.


def _tile_grads(q, k, v, do, lse2, delta, lo, hi, kid, masked, p):
  """P and dS of one tile (float32 [bq, bk]); lse2 is the base-2 lse with +inf for empty rows."""
  s = _dot(q, k, trans_b=True) * (p.scale * _LOG2E)
  pr = jnp.exp2(s - lse2[:, None])
  if masked:
    pr = jnp.where(_mask(lo, hi, kid), pr, 0.0)
  dp = _dot(do, v, trans_b=True)
  return pr, pr * (dp - delta[:, None])


def _lse2(lse):
  # exp2(s - inf) = 0: rows with no key anywhere contribute nothing, without NaN.
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)


def _dkv_kernel(
  rng_ref,
  q_ref,
  do_ref,
  lse_ref,
  dl_ref,
  lo_ref,
  hi_ref,
  k_ref,
  v_ref,
  kid_ref,
  dk_ref,
  dv_ref,
  *,
  p,
):
  bq = p.bq_dkv
  k, v, kid = k_ref[...], v_ref[...], kid_ref[...]

  def step(gi, i, carry, masked):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, gi, :], do_ref[rows, gi, :]
    lse2, delta = _lse2(lse_ref[gi, rows]), dl_ref[gi, rows]
    pr, ds = _tile_grads(q, k, v, do, lse2, delta, lo_ref[rows], hi_ref[rows], kid, masked, p)
    dv = dv + _dot(pr.astype(do.dtype), do, trans_a=True)
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros((p.bk_dkv, p.h_pad), jnp.float32)
  carry = (zeros, zeros)
  # The GQA group is unrolled into flat loops (the form that passed the GPU tests; a loop nest was
  # only tried together with exact-fp32 dots, which did not finish there: benchmarks/NOTES.md).
  for gi in range(p.groups):
    carry = _loops(rng_ref, functools.partial(step, gi), carry)
  dk, dv = carry
  dk_ref[...] = (dk * p.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
  rng_ref, q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, k_ref, v_ref, kid_ref, dq_ref, *, p
):
  bk = p.bk_dq
  q, do = q_ref[...], do_ref[...]
  lse2, delta = _lse2(lse_ref[...]), dl_ref[...]
  lo, hi = lo_ref[...], hi_ref[...]

  def step(j, dq, masked):
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    _, ds = _tile_grads(q, k, v, do, lse2, delta, lo, hi, kid_ref[keys], masked, p)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _loops(rng_ref, step, jnp.zeros((p.bq_dq, p.h_pad), jnp.float32))
  dq_ref[...] = (dq * p.scale).astype(dq_ref.dtype)


def _backward(p: _Plan, q, k, v, do, lse, delta, lo, hi, kid):
  """Padded operands -> (dq, dk, dv), padded like q, k, v."""
  b, _, n, _ = q.shape
  kh, g, hp = k.shape[2], p.groups, p.h_pad
  _, q_range = tile_ranges(lo, hi, kid, p.bq_dkv, p.bk_dkv)
  bk = p.bk_dkv
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, p=p),
    grid=(p.s_pad // bk, b, kh),
    in_specs=[
      pl.BlockSpec((None, None, 4), lambda j, b, h: (b, j, 0)),
      pl.BlockSpec((None, p.t_pad, g, hp), lambda j, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, p.t_pad, g, hp), lambda j, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, g, p.t_pad), lambda j, b, h: (b, h, 0)),
      pl.BlockSpec((None, g, p.t_pad), lambda j, b, h: (b, h, 0)),
      pl.BlockSpec((None, p.t_pad), lambda j, b, h: (b, 0)),
      pl.BlockSpec((None, p.t_pad), lambda j, b, h: (b, 0)),
      pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0)),
      pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0)),
      pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
    ],
    out_specs=[
      pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0)),
      pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0)),
    ],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=p.params_bwd,
    interpret=p.interpret,
    name="lcv_flash_dkv",
  )(q_range, q, do, lse, delta, lo, hi, k, v, kid)

  k_range, _ = tile_ranges(lo, hi, kid, p.bq_dq, p.bk_dq)
  bq = p.bq_dq
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, p=p),
    grid=(p.t_pad // bq, b, n),
    in_specs=[
      pl.BlockSpec((None, None, 4), lambda i, b, n: (b, i, 0)),
      pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
      pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
      pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
      pl.BlockSpec((None, p.s_pad, None, hp), lambda i, b, n: (b, 0, n // g, 0)),
      pl.BlockSpec((None, p.s_pad, None, hp), lambda i, b, n: (b, 0, n // g, 0)),
      pl.BlockSpec((None, p.s_pad), lambda i, b, n: (b, 0)),
    ],
    out_specs=pl.BlockSpec((None, bq, None, hp), lambda i, b, n: (b, i, n, 0)),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=p.params_bwd,
    interpret=p.interpret,
    name="lcv_flash_dq",
  )(k_range, q, do, lse, delta, lo, hi, k, v, kid)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Public API (docs/internals.md).


def _forward_trimmed(p, q, k, v, q_lo, q_hi, k_idx):
  o, lse = _forward(p, *_prepare(p, q, k, v, q_lo, q_hi, k_idx))
  return o[:, : p.t, :, : p.h], lse[:, :, : p.t]


def forward(q, k, v, q_lo, q_hi, k_idx, *, scale=None, block_sizes=None, interpret=None):
  """Masked attention forward, no VJP (ring steps call this).

  Args:
    q: [B, T, N, H] float32 / bfloat16 / float16.
    k, v: [B, S, K, H], same dtype, N % K == 0.
    q_lo, q_hi: int[B, T] interval of allowed global key indices per query row.
    k_idx: int[B, S] global index of every key.
    scale: softmax scale, default H ** -0.5.
    block_sizes: `BlockSizes`; interpret: run the Pallas interpreter (default: off a GPU).

  Returns:
    (o [B, T, N, H] in q.dtype, lse float32[B, N, T] natural log; -inf and o = 0 on empty rows).
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, block_sizes, interpret)
  return _forward_trimmed(p, q, k, v, q_lo, q_hi, k_idx)


def _delta(o, do, dlse):
  """rowsum(dO * O) - dlse, float32 [B, N, T]: the lse cotangent folded in (d lse / d s = P).

  Elementwise, not a dot: a float32 dot may run in tf32 on GPUs.
  """
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  return delta if dlse is None else delta - dlse.astype(jnp.float32)


def _backward_impl(p, q, k, v, o, lse, do, dlse, q_lo, q_hi, k_idx):
  delta = _delta(o, do, dlse)
  qp, kp, vp, lo, hi, kid = _prepare(p, q, k, v, q_lo, q_hi, k_idx)
  dop = _pad_axis(_pad_axis(do.astype(q.dtype), 1, p.t_pad), 3, p.h_pad)
  lse = _pad_axis(lse.astype(jnp.float32), 2, p.t_pad, -jnp.inf)
  delta = _pad_axis(delta, 2, p.t_pad)
  dq, dk, dv = _backward(p, qp, kp, vp, dop, lse, delta, lo, hi, kid)
  return dq[:, : p.t, :, : p.h], dk[:, : p.s, :, : p.h], dv[:, : p.s, :, : p.h]


def backward(
  q, k, v, o, lse, do, q_lo, q_hi, k_idx, *, scale=None, block_sizes=None, interpret=None
):
  """Gradients of masked attention from the row's *final* (o, lse) (exact for ring steps).

  Args:
    q, k, v, q_lo, q_hi, k_idx: as in `forward`.
    o: [B, T, N, H] output of the whole row (after any ring merge); lse: float32[B, N, T] likewise.
    do: [B, T, N, H] cotangent of o.

  Returns:
    (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H]) in the input dtypes; dk/dv summed over the
    GQA group.
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, block_sizes, interpret)
  return _backward_impl(p, q, k, v, o, lse, do, None, q_lo, q_hi, k_idx)


_attention = with_vjp(_forward_trimmed, _backward_impl)


def attention(q, k, v, q_lo, q_hi, k_idx, *, scale=None, block_sizes=None, interpret=None):
  """Differentiable masked attention: `forward` with a custom VJP (`backward`, lse cotangent too).

  Shapes and dtypes as in `forward`; returns (o, lse).
  """
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = _plan(q, k, scale, block_sizes, interpret)
  return _attention(q, k, v, q_lo, q_hi, k_idx, p)


def attention_reference(q, k, v, q_lo, q_hi, k_idx, *, scale=None):
  """Dense float32 twin of `attention` (O(T * S) memory; tests and small inputs only).

  Returns (o [B, T, N, H] in q.dtype, lse float32[B, N, T]).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  scale = h**-0.5 if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
  hp = jax.lax.Precision.HIGHEST  # float32 products on every backend (GPU default is tf32)
  s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=hp) * scale
  allow = masks.allowed(q_lo, q_hi, k_idx)[:, None, None]
  s = jnp.where(allow, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  pr = jnp.where(allow, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  o = jnp.einsum("bkgts,bskh->btkgh", pr, v.astype(jnp.float32), precision=hp)
  o = o.reshape(b, t, n, h)
  return o.astype(q.dtype), lse.reshape(b, n, t)
