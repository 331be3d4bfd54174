"""Blockwise attention in plain jnp: online softmax with log-sum-exp, O(S * block) memory.

The `xla` implementation of `lcv.attention.attend`, the CPU path of ring attention and the oracle
the Pallas kernels are tested against. FlashAttention-2 (arXiv 2307.08691) Alg. 1 for the forward:
a map over query blocks, each scanning the key blocks with a running (max, sum, accumulator) in
float32. Alg. 2 for the backward: P is recomputed per tile from the *given* lse, and
dS = P * (dP - rowsum(dO * O)), so a ring step can be differentiated with the row's final (o, lse)
after all merges. No [T, S] array is ever formed; tiles that the mask forbids entirely are skipped
with `lax.cond`.

Masks arrive as intervals (`lcv.masks`): query row i sees the keys whose global index j satisfies
q_lo[i] <= j <= q_hi[i]; k_idx holds the global index of every key. Rows with no allowed key give
o = 0, lse = -inf and zero gradients.

Axis letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query
heads per kv head (GQA, never materialised as repeated keys), H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcv import masks
from lcv.kernels import name_residuals

_NEG_INF = float("-inf")


def check_inputs(q, k, v, q_lo, q_hi, k_idx) -> None:
  """Shape and dtype checks of the backend contract, with messages that name the value and the fix.

  Shared by every backend and by `lcv.attention.attend`; needs only static shapes, so it runs
  before tracing.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"q, k, v must be [B, T, N, H], [B, S, K, H], [B, S, K, H]; got {q.shape=}, {k.shape=}, "
      f"{v.shape=}"
    )
  b, t, n, h = q.shape
  if t < 1 or k.shape[1] < 1:
    raise ValueError(f"query length T={t} and key length S={k.shape[1]} must be >= 1")
  if k.shape != v.shape:
    raise ValueError(f"{k.shape=} must equal {v.shape=}")
  if k.shape[0] != b:
    raise ValueError(f"batch of q ({b}) must equal batch of k/v ({k.shape[0]})")
  if k.shape[3] != h:
    raise ValueError(f"head dim of q ({h}) must equal head dim of k/v ({k.shape[3]})")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]} (GQA)")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  for name, x, want in (  # jnp.shape/jnp.result_type accept arrays, numpy and lists alike
    ("q_lo", q_lo, (b, t)),
    ("q_hi", q_hi, (b, t)),
    ("k_idx", k_idx, k.shape[:2]),
  ):
    shape, dtype = jnp.shape(x), jnp.result_type(x)
    if tuple(shape) != tuple(want):
      raise ValueError(
        f"{name}.shape={tuple(shape)} must be [B, {'S' if name == 'k_idx' else 'T'}]"
        f" = {tuple(want)}"
      )
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array (global key indices); got {dtype}")


def _check(q, k, v, q_lo, q_hi, k_idx, block_q, block_k) -> None:
  check_inputs(q, k, v, q_lo, q_hi, k_idx)
  if block_q < 1 or block_k < 1:
    raise ValueError(f"{block_q=} and {block_k=} must be positive")


def _blocks(x, block: int, value):
  """Pad axis 1 of x to a multiple of `block`; move the block index first: [nb, B, block, ...]."""
  pad = (-x.shape[1]) % block
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    x = jnp.pad(x, widths, constant_values=value)
  nb = x.shape[1] // block
  x = x.reshape(x.shape[0], nb, block, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unblock(x, length: int):
  """Inverse of `_blocks` along the row axis: [nb, B, block, ...] -> [B, length, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  x = x.reshape(x.shape[0], -1, *x.shape[3:])
  return x[:, :length]


def _tile_mask(lo, hi, kidx):
  """bool[B, 1, 1, bq, bk] for one tile, broadcast over (K, G)."""
  m = (lo[:, :, None] <= kidx[:, None, :]) & (kidx[:, None, :] <= hi[:, :, None])
  return m[:, None, None]


def _layout(q, k, v, q_lo, q_hi, k_idx, block_q, block_k):
  """Block everything: q [nq, B, bq, K, G, H], k/v [nk, B, bk, K, H], intervals/indices int32."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  bq, bk = min(block_q, t), min(block_k, k.shape[1])
  qb = _blocks(q.reshape(b, t, kv_heads, n // kv_heads, h), bq, 0)
  # Padded query rows get the empty interval, padded keys an index no interval contains.
  lo = _blocks(jnp.asarray(q_lo, jnp.int32), bq, 0)
  hi = _blocks(jnp.asarray(q_hi, jnp.int32), bq, -1)
  kb, vb = _blocks(k, bk, 0), _blocks(v, bk, 0)
  kidx = _blocks(jnp.asarray(k_idx, jnp.int32), bk, masks.NO_KEY)
  return qb, kb, vb, lo, hi, kidx


def _forward(q, k, v, q_lo, q_hi, k_idx, scale, block_q, block_k):
  b, t, n, h = q.shape
  qb, kb, vb, lo, hi, kidx = _layout(q, k, v, q_lo, q_hi, k_idx, block_q, block_k)

  def one_query_block(args):
    q_i, lo_i, hi_i = args  # [B, bq, K, G, H], [B, bq], [B, bq]
    bq, kv_heads, groups = q_i.shape[1:4]
    init = (
      jnp.full((b, kv_heads, groups, bq), _NEG_INF, jnp.float32),  # running max m
      jnp.zeros((b, kv_heads, groups, bq), jnp.float32),  # running sum l
      jnp.zeros((b, kv_heads, groups, bq, h), jnp.float32),  # running numerator
    )

    def step(carry, tile):
      k_j, v_j, kidx_j = tile
      mask = _tile_mask(lo_i, hi_i, kidx_j)

      def update(carry):
        m, l, acc = carry
        s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32)
        s = jnp.where(mask, s * scale, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # A row with nothing allowed so far keeps m = -inf; shift by 0 there so that
        # exp(-inf - -inf) never appears (it is NaN).
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
          "BKGTS,BSKH->BKGTH", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
        )
        return m_new, l, alpha[..., None] * acc + pv

      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kidx))
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _NEG_INF)
    return jnp.einsum("BKGTH->BTKGH", o).astype(q.dtype), lse

  o, lse = jax.lax.map(one_query_block, (qb, lo, hi))  # [nq, B, bq, K, G, H], [nq, B, K, G, bq]
  o = _unblock(o, t).reshape(b, t, n, h)
  lse = _unblock(jnp.moveaxis(lse, -1, 2), t).reshape(b, t, n)
  return o, jnp.einsum("BTN->BNT", lse)


def _backward(q, k, v, o, lse, do, dlse, q_lo, q_hi, k_idx, scale, block_q, block_k):
  """FA2 backward. dlse (float32[B, N, T] or None) is the cotangent of lse, for the custom VJP."""
  b, t, n, h = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
  groups = n // kv_heads
  qb, kb, vb, lo, hi, kidx = _layout(q, k, v, q_lo, q_hi, k_idx, block_q, block_k)

  def rows(x):  # [B, N, T] float32 -> [nq, B, K, G, bq]
    x = jnp.einsum("BNT->BTN", x).reshape(b, t, kv_heads, groups)
    return jnp.moveaxis(_blocks(x, qb.shape[2], 0.0), 2, -1)

  # D = rowsum(dO * O) (FA2 Alg. 2 line 4); the lse cotangent enters as dS += P * dlse.
  delta = jnp.einsum("BTNH,BTNH->BNT", do.astype(jnp.float32), o.astype(jnp.float32))
  if dlse is not None:
    delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
  delta = rows(delta)
  # Rows with no allowed key have lse = -inf; +inf there makes P = exp(s - inf) = 0.
  lse_b = rows(jnp.where(lse == _NEG_INF, jnp.inf, lse.astype(jnp.float32)))
  dob = _blocks(do.astype(q.dtype).reshape(b, t, kv_heads, groups, h), qb.shape[2], 0)

  def one_key_block(dq_acc, tile):
    k_j, v_j, kidx_j = tile  # [B, bk, K, H], [B, bk, K, H], [B, bk]
    init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))

    def step(carry, row_block):
      q_i, do_i, lse_i, delta_i, lo_i, hi_i, dq_i = row_block
      mask = _tile_mask(lo_i, hi_i, kidx_j)

      def update(operands):
        (dk, dv), dq_i = operands
        s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32)
        p = jnp.where(mask, jnp.exp(s * scale - lse_i[..., None]), 0.0)
        dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_i, v_j, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
        p = p.astype(q.dtype)
        dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p, do_i, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, q_i, preferred_element_type=jnp.float32)
        dq_i = dq_i + jnp.einsum("BKGTS,BSKH->BTKGH", ds, k_j, preferred_element_type=jnp.float32)
        return (dk, dv), dq_i

      carry, dq_i = jax.lax.cond(jnp.any(mask), update, lambda x: x, (carry, dq_i))
      return carry, dq_i

    (dk, dv), dq_acc = jax.lax.scan(step, init, (qb, dob, lse_b, delta, lo, hi, dq_acc))
    return dq_acc, (dk, dv)

  dq0 = jnp.zeros(qb.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, (kb, vb, kidx))
  dq = _unblock(dq, t).reshape(b, t, n, h).astype(q.dtype)
  return dq, _unblock(dk, s_len).astype(k.dtype), _unblock(dv, s_len).astype(v.dtype)


def _ints(*xs):
  """Mask arguments as int32 arrays, after `check_inputs` has vetted their dtypes."""
  return tuple(jnp.asarray(x, jnp.int32) for x in xs)


def _scale(scale, h: int) -> float:
  return float(h**-0.5 if scale is None else scale)


def forward(q, k, v, q_lo, q_hi, k_idx, *, scale=None, block_q=512, block_k=512):
  """Attention forward with its log-sum-exp; no VJP (ring steps call this and merge).

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0; one floating dtype.
    q_lo, q_hi: int32[B, T] interval of allowed global key indices per query row.
    k_idx: int32[B, S] global index of every key.
    scale: softmax scale; default H ** -0.5.
    block_q, block_k: tile sizes (clamped to T and S; T, S need not be multiples).

  Returns:
    o: [B, T, N, H] in q.dtype (zeros on rows with no allowed key);
    lse: float32[B, N, T], natural log of sum_j exp(scale * q.k_j) over allowed keys (-inf if none).
  """
  _check(q, k, v, q_lo, q_hi, k_idx, block_q, block_k)
  q_lo, q_hi, k_idx = _ints(q_lo, q_hi, k_idx)
  return _forward(q, k, v, q_lo, q_hi, k_idx, _scale(scale, q.shape[-1]), block_q, block_k)


def backward(q, k, v, o, lse, do, q_lo, q_hi, k_idx, *, scale=None, block_q=512, block_k=512):
  """Gradients of attention from the row's *final* (o, lse), as FA2 Alg. 2.

  Exact for one key chunk of a ring: P = exp(scale * q.k - lse) with the merged lse, and
  D = rowsum(dO * O) with the merged o, so summing dq over chunks and taking each chunk's dk/dv
  gives the full gradient.

  Args:
    q, k, v, q_lo, q_hi, k_idx, scale, block_q, block_k: as in `forward`.
    o: [B, T, N, H] final output; lse: float32[B, N, T] final log-sum-exp; do: [B, T, N, H].

  Returns:
    dq [B, T, N, H], dk, dv [B, S, K, H] (summed over each GQA group), in the input dtypes.
  """
  _check(q, k, v, q_lo, q_hi, k_idx, block_q, block_k)
  q_lo, q_hi, k_idx = _ints(q_lo, q_hi, k_idx)
  if o.shape != q.shape or do.shape != q.shape:
    raise ValueError(f"{o.shape=} and {do.shape=} must equal {q.shape=}")
  if lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
    raise ValueError(f"{lse.shape=} must be [B, N, T] = {(q.shape[0], q.shape[2], q.shape[1])}")
  h = q.shape[-1]
  return _backward(q, k, v, o, lse, do, None, q_lo, q_hi, k_idx, _scale(scale, h), block_q, block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, q_lo, q_hi, k_idx, scale, block_q, block_k):
  return _forward(q, k, v, q_lo, q_hi, k_idx, scale, block_q, block_k)


def _attention_fwd(q, k, v, q_lo, q_hi, k_idx, scale, block_q, block_k):
  o, lse = name_residuals(*_forward(q, k, v, q_lo, q_hi, k_idx, scale, block_q, block_k))
  return (o, lse), (q, k, v, o, lse, q_lo, q_hi, k_idx)


def _attention_bwd(scale, block_q, block_k, res, cotangents):
  q, k, v, o, lse, q_lo, q_hi, k_idx = res
  do, dlse = cotangents
  dq, dk, dv = _backward(q, k, v, o, lse, do, dlse, q_lo, q_hi, k_idx, scale, block_q, block_k)
  # Integer mask arguments take float0 cotangents.
  zeros = tuple(np.zeros(x.shape, jax.dtypes.float0) for x in (q_lo, q_hi, k_idx))
  return (dq, dk, dv, *zeros)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, q_lo, q_hi, k_idx, *, scale=None, block_q=512, block_k=512):
  """Differentiable blockwise attention (custom VJP w.r.t. q, k, v and the lse output).

  Same arguments and results as `forward`; the backward is `backward` with the saved (o, lse).
  """
  _check(q, k, v, q_lo, q_hi, k_idx, block_q, block_k)
  q_lo, q_hi, k_idx = _ints(q_lo, q_hi, k_idx)
  return _attention(q, k, v, q_lo, q_hi, k_idx, _scale(scale, q.shape[-1]), block_q, block_k)


def attention_reference(q, k, v, q_lo, q_hi, k_idx, *, scale=None):
  """Dense twin of `attention` for tests: materialises the [B, N, T, S] scores. Same results."""
  _check(q, k, v, q_lo, q_hi, k_idx, 1, 1)
  q_lo, q_hi, k_idx = _ints(q_lo, q_hi, k_idx)
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
  mask = masks.allowed(q_lo, q_hi, k_idx)[:, None, None]
  s = jnp.where(mask, s * _scale(scale, h), _NEG_INF)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", p / l_safe, v.astype(jnp.float32))
  lse = jnp.where(seen, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_safe), _NEG_INF)
  lse = lse[..., 0].reshape(b, n, t)
  return o.reshape(b, t, n, h).astype(q.dtype), lse
